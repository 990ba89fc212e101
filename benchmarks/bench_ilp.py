"""Bit-allocation ILP time vs number of singular indices (CVXPY + HiGHS), per matrix and global.

Error tables are realistic: ``e[i, b] = σ_i² · d(b)`` with ``σ_i ~ i^-1`` and ``d(b) ~ 4^-b`` times a
per-index jitter; costs are byte-exact for an ``r x r`` matrix. ``global`` solves one ILP over ``--matrices``
tables of r indices each under the summed budget (errors normalised per matrix).

    python benchmarks/bench_ilp.py --indices 128 256 512 1024 2048 4096
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from prinmix_jax import CompressionConfig, allocate_bits, index_cost_bits  # noqa: E402


def table(r: int, widths, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    sig2 = (np.arange(1, r + 1) ** -1.0) ** 2
    d = np.array([1.0 if b == 0 else 4.0 ** -b for b in widths])
    return sig2[:, None] * d[None, :] * rng.uniform(0.7, 1.3, size=(r, len(widths)))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--indices", type=int, nargs="+", default=(128, 256, 512, 1024, 2048, 4096))
    ap.add_argument("--ratio", type=float, default=1 / 16)
    ap.add_argument("--matrices", type=int, default=7, help="tables in the global ILP")
    ap.add_argument("--solver", default="HIGHS")
    ap.add_argument("--no-global", action="store_true")
    args = ap.parse_args(argv)
    cfg = CompressionConfig(ratio=args.ratio)
    widths = cfg.bits
    print(f"# widths {widths}, ratio {args.ratio:g}, solver {args.solver}; {platform.machine()}, "
          f"{os.cpu_count()} cpus")
    print("| scope | indices per matrix | matrices | binary variables | solve s | wall s |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in args.indices:
        cost = index_cost_bits(r, r, widths, cfg.group_size)
        budget = cfg.budget_bits(r, r)
        e = table(r, widths, r)
        t = time.perf_counter()
        a = allocate_bits(e, cost, budget, widths, solver=args.solver)
        wall = time.perf_counter() - t
        print(f"| matrix | {r} | 1 | {e.size} | {a.seconds:.3f} | {wall:.3f} |", flush=True)
        if args.no_global:
            continue
        from prinmix_jax.allocation import allocate_bits_global

        tabs = [table(r, widths, r + j) for j in range(args.matrices)]
        t = time.perf_counter()
        _, ga = allocate_bits_global(tabs, [cost] * len(tabs), budget * len(tabs), widths, solver=args.solver)
        wall = time.perf_counter() - t
        print(f"| global | {r} | {args.matrices} | {sum(x.size for x in tabs)} | {ga.seconds:.3f} | {wall:.3f} |",
              flush=True)


if __name__ == "__main__":
    main()
