"""The serving benchmark's demo-size pair (docs/benchmarks.md, "Serving"): a random Llama base (4 blocks, hidden
128, intermediate 384, heads 4/2, vocab 264, untied; ``tests/hf_fixtures.random_torch_model``, seed 0), four
synthetic fine-tunes of it (a rank-4 change plus noise: ``tests/pipeline_fixtures.make_finetuned``, seeds
10-13) and their PrinMix deltas at 1/16 (``compress_model`` defaults).

    python benchmarks/make_serving_pair.py DIR     # then: bench_serving.py --base DIR/base --delta d0=DIR/delta0 ...

Not a test; run from the repository root (it uses the test fixtures).
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", help="folder for base/, ft0..3/ and delta0..3/")
    args = ap.parse_args()
    import transformers as tf
    from hf_fixtures import random_torch_model, save_checkpoint
    from pipeline_fixtures import make_finetuned

    from prinmix_jax import CompressionConfig, compress_model

    cfg = tf.LlamaConfig(vocab_size=264, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                         tie_word_embeddings=False)
    base = os.path.join(args.out, "base")
    save_checkpoint(random_torch_model(cfg, 0), base)
    for i in range(4):
        ft = make_finetuned(base, os.path.join(args.out, f"ft{i}"), seed=10 + i)
        compress_model(base, ft, os.path.join(args.out, f"delta{i}"), config=CompressionConfig(ratio=1 / 16))
    print(f"wrote {args.out}/base, ft0..3, delta0..3")


if __name__ == "__main__":
    main()
