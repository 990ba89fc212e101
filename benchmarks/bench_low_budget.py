"""Below one bit (issue 12): relative output error of PrinMix variants and the baselines at 1/16, 1/32 and 1/64
on synthetic long-tailed deltas with correlated calibration Hessians. Prints one Markdown table per ratio
(error of each variant per shape, its mean ratio to the default at that ratio, bytes / budget, warm seconds).

    python benchmarks/bench_low_budget.py --shapes 256x256 704x256 512x1024 --ratios 1/16 1/32 1/64

"PrinMix before" is the configuration before issue 12 (min–max grids, widths 0,2,3,4,8, full index metadata);
each "+" row adds one idea to the row above (the default has 1-bit widths only below 1/16).
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from prinmix_jax import CompressionConfig, compress_matrix  # noqa: E402
from prinmix_jax.config import parse_ratio  # noqa: E402
from prinmix_jax.synthetic import long_tailed_delta  # noqa: E402

#: (label, method, CompressionConfig overrides)
VARIANTS = (
    ("PrinMix before (min-max, no 1-bit)", "prinmix", dict(grid="minmax", bits=(0, 2, 3, 4, 8), index_metadata="full")),
    ("+ least-squares grids", "prinmix", dict(bits=(0, 2, 3, 4, 8), index_metadata="full")),
    ("+ 1-bit widths", "prinmix", dict(bits=(0, 1, 2, 3, 4, 8), index_metadata="full")),
    ("+ lean index metadata (default)", "prinmix", {}),
    ("default + sigma refit", "prinmix", dict(refit_sigma=True)),
    ("default + whitened SVD", "prinmix", dict(whiten=True)),
    ("default + one group per vector", "prinmix", dict(group_size=None)),
    ("default + refinement 1 round", "prinmix", dict(refine_rounds=1)),
    ("default + refinement 2 rounds", "prinmix", dict(refine_rounds=2)),
    ("uniform (default grids)", "uniform", {}),
    ("Delta-CoMe", "deltacome", {}),
)
#: The row the others are compared with ("mean / default").
DEFAULT_ROW = 3


def run(shapes, ratio, decay):
    """Rows ``(label, [error per shape], bytes/budget max, warm seconds total)``."""
    data = [long_tailed_delta(m, n, seed=m + n, decay=decay, tokens=max(2048, 2 * n)) for m, n in shapes]
    rows = []
    for label, method, over in VARIANTS:
        cfg = CompressionConfig(ratio=ratio, **over)
        errs, fill, secs = [], 0.0, 0.0
        for (m, n), (d, h) in zip(shapes, data):
            compress_matrix(d, h, cfg, method)                     # compile
            t = time.perf_counter()
            cm, info = compress_matrix(d, h, cfg, method, return_info=True)
            secs += time.perf_counter() - t
            errs.append(info["rel_output_error"])
            fill = max(fill, cm.nbytes / (cfg.budget_bits(m, n) // 8))
        rows.append((label, errs, fill, secs))
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=("256x256", "704x256", "512x1024"))
    ap.add_argument("--ratios", nargs="+", default=("1/16", "1/32", "1/64"))
    ap.add_argument("--decay", type=float, default=1.0, help="singular value decay exponent")
    args = ap.parse_args(argv)
    shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes]
    print(f"# jax {jax.__version__} on {jax.devices()[0].platform}, {platform.machine()}, {os.cpu_count()} cpus; "
          f"long-tailed deltas (decay {args.decay}), correlated Hessians")
    for text in args.ratios:
        ratio = parse_ratio(text)
        rows = run(shapes, ratio, args.decay)
        ref = np.asarray(rows[DEFAULT_ROW][1])
        print(f"\n## ratio {text}\n")
        print("| variant | " + " | ".join(f"{m}x{n}" for m, n in shapes) + " | mean / default | bytes/budget | warm s |")
        print("|---|" + "---:|" * (len(shapes) + 3))
        for label, errs, fill, secs in rows:
            rel = float(np.mean(np.asarray(errs) / ref))
            print(f"| {label} | " + " | ".join(f"{e:.4f}" for e in errs) + f" | {rel:.3f} | {fill:.3f} | {secs:.2f} |")


if __name__ == "__main__":
    main()
