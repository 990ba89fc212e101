"""Compression variants on the demo's SFT pair (issue 12's ablation): each variant compresses the pair's delta
with the demo's own steps (global scope for PrinMix, parallel calibration), applies it and scores the task.
Prints one JSON line per (ratio, variant) and a Markdown table at the end.

    python benchmarks/bench_demo_variants.py --ratios 1/16 1/32 1/64
    python benchmarks/bench_demo_variants.py --ratios 1/32 --calibration task-mix
    python benchmarks/bench_demo_variants.py --pair 855k     # the earlier, larger demo pair (issue 12's)

``--calibration text`` is the demo's (64 held-out stdlib windows); ``task-mix`` replaces half of them with
windows of task examples from another seed than the test prompts (a user calibrating on fine-tuning data);
``task`` takes 64 windows of task examples. A distillation row compresses with the default, then runs
``distill_delta`` as ``prinmix demo --distill`` does (its defaults: 400 Adam steps at lr 3e-3, 8 windows per
step, codes moved at 0.01 grid steps per step; "codes fixed" re-fits σ, scales and norm deltas only, in 200
steps) on the same calibration windows; ``before`` is its accuracy before distillation, and the layer error
is the compression's.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from prinmix_jax.sft.data import task_windows  # noqa: E402  (task-mix: half of the demo's task windows)

#: (label, method, CompressionConfig overrides); "before" is the configuration before issue 12; the "+" rows add
#: one idea each to the row above (1-bit widths only below 1/16 in the default).
VARIANTS = (
    ("PrinMix before", "prinmix", dict(grid="minmax", bits=(0, 2, 3, 4, 8), index_metadata="full")),
    ("+ least-squares grids", "prinmix", dict(bits=(0, 2, 3, 4, 8), index_metadata="full")),
    ("+ 1-bit widths", "prinmix", dict(bits=(0, 1, 2, 3, 4, 8), index_metadata="full")),
    ("+ lean index metadata (default)", "prinmix", {}),
    ("default + sigma refit", "prinmix", dict(refit_sigma=True)),
    ("default + whitened SVD", "prinmix", dict(whiten=True)),
    ("default + one group per vector", "prinmix", dict(group_size=None)),
    ("default + refinement 1 round", "prinmix", dict(refine_rounds=1)),
    ("default + refinement 2 rounds", "prinmix", dict(refine_rounds=2)),
    ("uniform (default grids)", "uniform", {}),
    ("uniform (before)", "uniform", dict(grid="minmax", bits=(0, 2, 3, 4, 8), index_metadata="full")),
    ("Delta-CoMe", "deltacome", {}),
    ("default + distillation", "prinmix", dict(distill=400)),
    ("uniform + distillation", "uniform", dict(distill=400)),
    ("default + distillation, codes fixed, 200 steps", "prinmix",
     dict(distill=200, distill_kw=dict(refit_codes=False))),
    ("uniform + distillation, codes fixed, 200 steps", "uniform",
     dict(distill=200, distill_kw=dict(refit_codes=False))),
)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ratios", nargs="+", default=("1/16", "1/32", "1/64"))
    ap.add_argument("--variants", default=None, help="comma-separated labels (default: all)")
    ap.add_argument("--calibration", choices=("text", "task-mix", "task"), default="text")
    ap.add_argument("--num-test", type=int, default=300)
    ap.add_argument("--pair", choices=("demo", "855k"), default="demo",
                    help="the demo's pair (457k parameters), or the earlier demo pair (hidden 128, intermediate 384) "
                         "on which issue 12 was filed")
    args = ap.parse_args(argv)

    from prinmix_jax import demo as Dm
    from prinmix_jax.config import parse_ratio
    from prinmix_jax.evaluation import byte_tokenizer, exact_match, token_metrics
    from prinmix_jax.models import ModelConfig, load_hf_params
    from prinmix_jax.sft import FULL, make_sft_pair

    s = FULL if args.pair == "demo" else dataclasses.replace(FULL, hidden=128, intermediate=384)
    pair = make_sft_pair(s, progress=False, log=None)
    cfg = ModelConfig.from_pretrained_dir(pair.finetuned)
    base_p, ft_p = load_hf_params(pair.base), load_hf_params(pair.finetuned)
    tok = byte_tokenizer()
    test, calib, eval_ids = Dm._data(s, args.num_test, 64, 32, 128, "task" if args.calibration == "task" else "text")
    if args.calibration == "task-mix":
        calib = np.concatenate([calib[:32], task_windows(s, 32, 128, s.seed + Dm.TASK_CALIB_SEED).astype(calib.dtype)])

    def evaluate(params):
        return exact_match(params, cfg, test, tok)["accuracy"], token_metrics(ft_p, params, cfg, eval_ids)

    base_acc = exact_match(base_p, cfg, test, tok)["accuracy"]
    ft_acc = exact_match(ft_p, cfg, test, tok)["accuracy"]
    chosen = [v for v in VARIANTS if args.variants is None or v[0] in args.variants.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        os.makedirs(os.path.join(tmp, "deltas"))
        for text in args.ratios:
            for label, method, over in chosen:
                over = dict(over)
                steps = over.pop("distill", None)
                dkw = over.pop("distill_kw", {})
                r = Dm._compress_and_score(pair, method, parse_ratio(text), tmp, calib, 128, evaluate, base_p,
                                           scope="global", calibration_mode="parallel", overrides=over, extra={})
                before = None
                if steps:
                    before = r["accuracy"]
                    d = Dm._distill_and_score(pair, r, tmp, calib, 128, evaluate, base_p, steps=steps, kwargs=dkw)
                    r = dict(d, layer_error=r["layer_error"])     # the compression's (docs/benchmarks.md)
                row = dict(ratio=text, variant=label, calibration=args.calibration, accuracy=r["accuracy"],
                           before=before,
                           gain_kept=(r["accuracy"] - base_acc) / (ft_acc - base_acc), layer_error=r["layer_error"],
                           kl=r["kl"], bytes=r["bytes"], seconds=r["seconds"])
                rows.append(row)
                print(json.dumps(row), flush=True)
    print(f"\n{args.pair} pair: fine-tuned {ft_acc:.1%}, base {base_acc:.1%}, {args.num_test} prompts, "
          f"calibration {args.calibration}\n")
    print("| ratio | variant | task acc | gain kept | layer err | KL to ft | bytes | time s | acc before distillation |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        b = "" if r["before"] is None else f"{r['before']:.1%}"
        print(f"| {r['ratio']} | {r['variant']} | {r['accuracy']:.1%} | {r['gain_kept']:.0%} | {r['layer_error']:.4f} "
              f"| {r['kl']:.4f} | {r['bytes']} | {r['seconds']:.1f} | {b} |")


if __name__ == "__main__":
    main()
