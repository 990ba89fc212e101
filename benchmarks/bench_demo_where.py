"""Where a low budget loses the demo pair's skill (issue 12): compress the pair's delta with the default PrinMix
configuration (the demo's steps: global scope, parallel calibration), then put one part of the model back to
the fine-tuned weights at a time ("exact") or keep only that part compressed ("only this compressed"), and
score the task each time.

    python benchmarks/bench_demo_where.py --ratio 1/32

Prints one Markdown table (part, accuracy with it exact, accuracy with only it compressed).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def parts(num_layers: int) -> dict:
    """``{name: predicate on a parameter path string}``."""
    out = {"embedding": lambda k: "embed_tokens" in k, "head": lambda k: "lm_head" in k,
           "attention": lambda k: "self_attn" in k, "MLP": lambda k: "mlp" in k}
    for i in range(num_layers):
        out[f"block {i}"] = (lambda i: lambda k: f"['layers'][{i}]" in k)(i)
    for name in LINEARS:
        out[name] = (lambda name: lambda k: f"['{name}']" in k)(name)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ratio", default="1/32")
    ap.add_argument("--num-test", type=int, default=300)
    args = ap.parse_args(argv)

    from prinmix_jax import demo as Dm
    from prinmix_jax.apply import apply_delta
    from prinmix_jax.config import CompressionConfig, parse_ratio
    from prinmix_jax.evaluation import byte_tokenizer, exact_match
    from prinmix_jax.models import ModelConfig, load_hf_params
    from prinmix_jax.pipeline import compress_model
    from prinmix_jax.sft import FULL, make_sft_pair

    pair = make_sft_pair(FULL, progress=False, log=None)
    cfg = ModelConfig.from_pretrained_dir(pair.finetuned)
    base_p, ft_p = load_hf_params(pair.base), load_hf_params(pair.finetuned)
    tok = byte_tokenizer()
    test, calib, _ = Dm._data(FULL, args.num_test, 64, 32, 128)

    def acc(params):
        return exact_match(params, cfg, test, tok)["accuracy"]

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "delta")
        compress_model(pair.base, pair.finetuned, out, calib=calib, config=CompressionConfig(ratio=parse_ratio(args.ratio)),
                       method="prinmix", calibration_mode="parallel", seq_len=128, overwrite=True, progress=False,
                       scope="global")
        merged = apply_delta(base_p, out)
    flat, treedef = jax.tree_util.tree_flatten_with_path(merged)
    ft_leaves = jax.tree_util.tree_leaves(ft_p)

    def mix(exact):
        return jax.tree_util.tree_unflatten(treedef, [f if exact(jax.tree_util.keystr(k)) else v
                                                      for (k, v), f in zip(flat, ft_leaves)])

    print(f"\nratio {args.ratio}, default PrinMix: {acc(merged):.1%}; fine-tuned {acc(ft_p):.1%}, base {acc(base_p):.1%}\n")
    print("| part | accuracy with it exact | accuracy with only it compressed |")
    print("|---|---:|---:|")
    for name, pred in parts(cfg.num_layers).items():
        print(f"| {name} | {acc(mix(pred)):.1%} | {acc(mix(lambda k, p=pred: not p(k))):.1%} |", flush=True)


if __name__ == "__main__":
    main()
