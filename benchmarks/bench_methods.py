"""Per-matrix compression time vs matrix size for every method (synthetic long-tailed deltas with a correlated
calibration Hessian), at one budget. Prints a Markdown table: warm time (second call; XLA compilation
excluded), cold time (first call at that shape), bytes / budget and relative output error.

    python benchmarks/bench_methods.py --sizes 256 512 1024
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

from prinmix_jax import METHODS, CompressionConfig, compress_matrix  # noqa: E402
from prinmix_jax.synthetic import long_tailed_delta  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=(256, 512, 1024), help="square matrix sizes")
    ap.add_argument("--ratio", type=float, default=1 / 16)
    ap.add_argument("--methods", default=",".join(METHODS))
    args = ap.parse_args(argv)
    cfg = CompressionConfig(ratio=args.ratio)
    methods = args.methods.split(",")
    print(f"# ratio {args.ratio:g}; jax {jax.__version__} on {jax.devices()[0].platform} "
          f"({len(jax.devices())} device(s)), {platform.machine()}, {os.cpu_count()} cpus")
    print("| size | method | warm s | cold s | bytes/budget | rel. output error | ILP s |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for size in args.sizes:
        delta, hess = long_tailed_delta(size, size, seed=size, tokens=max(2048, 2 * size))
        budget = cfg.budget_bits(size, size) // 8
        for method in methods:
            t = time.perf_counter()
            compress_matrix(delta, hess, cfg, method)
            cold = time.perf_counter() - t
            t = time.perf_counter()
            cm, info = compress_matrix(delta, hess, cfg, method, return_info=True)
            warm = time.perf_counter() - t
            ilp = info.get("allocation_seconds")
            print(f"| {size} | {method} | {warm:.2f} | {cold:.2f} | {cm.nbytes / budget:.3f} | "
                  f"{info['rel_output_error']:.4f} | {'-' if ilp is None else f'{ilp:.2f}'} |", flush=True)


if __name__ == "__main__":
    main()
