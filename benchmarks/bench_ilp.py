"""Bit-allocation time and proven gap: the special-purpose MCKP solver (default) against the 0/1 MILP (old path).

Error tables are synthetic with the structure of the library's own (checked against ``error_tables`` of
``long_tailed_delta`` at 512² and 1024²): ``σ_i² = i⁻² +`` a Marchenko–Pastur noise floor (15% of the energy),
times the measured per-width error of a unit row (V + U side: 1, 0.506, 0.093, 0.020, 7e-5 for widths
0, 2, 3, 4, 8) with a per-row jitter of ``1.67/√n`` correlated across widths (**data-free**: near-ties
everywhere), or additionally ``V_i H V_iᵀ`` spread over two decades and a 25% per-row jitter (**calibrated**).
Costs are byte-exact, budgets are ``CompressionConfig()``'s (1/16), the gap is its ``ilp_gap`` (1e-4).

- ``matrix``: one ``allocate_bits`` per shape (``--shapes``), as ``compress_matrix`` does.
- ``7b``: one ``allocate_bits_global`` over the 224 block linears of Llama-2-7B (4096² q/k/v/o, 11008×4096
  gate/up, 4096×11008 down, × ``--layers`` 32 = 917,504 indices), normalised per matrix as the global scope does.

Each row: method, seconds, MILP pairs, proven gap, objective relative to the best found in the row's group.
The old path (``method="milp"``) runs with ``--old-limit`` seconds as HiGHS's time limit; hitting it is an
error, reported as such.

    python benchmarks/bench_ilp.py                  # 4096² and 11008×4096 matrices, whole 7B, old and new
    python benchmarks/bench_ilp.py --quick          # 4 layers, old path limited to 60 s
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from functools import partial

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from prinmix_jax import CompressionConfig, allocate_bits, index_cost_bits  # noqa: E402
from prinmix_jax.allocation import allocate_bits_global  # noqa: E402

Q = {0: 1.0, 2: 0.5056, 3: 0.0929, 4: 0.02025, 8: 7.0e-5}
SHAPES_7B = [(4096, 4096)] * 4 + [(11008, 4096)] * 2 + [(4096, 11008)]


def _mp_quantiles(r: int, y: float) -> np.ndarray:
    """r descending quantiles of the Marchenko–Pastur law of ratio y (mean 1)."""
    a, b = (1 - np.sqrt(y)) ** 2, (1 + np.sqrt(y)) ** 2
    x = np.linspace(a, b, 20001)
    dens = np.sqrt(np.maximum((b - x) * (x - a), 0)) / np.maximum(x, 1e-12)
    cdf = np.concatenate([[0], np.cumsum(0.5 * (dens[1:] + dens[:-1]) * np.diff(x))])
    return np.interp((np.arange(r) + 0.5) / r, cdf / cdf[-1], x)[::-1]


def table(m: int, n: int, widths, seed: int, calibrated: bool = False) -> np.ndarray:
    """A synthetic error table (module docstring)."""
    rng = np.random.default_rng(seed)
    r = min(m, n)
    s2 = np.arange(1, r + 1, dtype=np.float64) ** -2
    s2 = np.sort(s2 + 0.15 * s2.sum() / r * _mp_quantiles(r, r / max(m, n)))[::-1]
    z, w = rng.standard_normal((r, 1)), rng.standard_normal((r, len(widths)))
    nz = np.asarray(widths) > 0
    jit = 1 + 1.67 / np.sqrt(n) * (0.9 * z + 0.44 * w)
    e = s2[:, None] * np.array([Q[b] for b in widths]) * np.where(nz, jit, 1.0)
    if calibrated:
        h = np.exp(0.8 * rng.standard_normal(r))
        spread = np.exp(0.25 * (0.7 * rng.standard_normal((r, 1)) + 0.71 * rng.standard_normal((r, len(widths)))))
        e = e * h[:, None] * np.where(nz, spread, 1.0)
    return e


def run(fn, label):
    t = time.perf_counter()
    try:
        a = fn()
        a = a[1] if isinstance(a, tuple) and len(a) == 2 and isinstance(a[0], list) else a
    except ValueError as exc:
        return {"label": label, "seconds": time.perf_counter() - t, "error": str(exc).split(":")[-1].strip()}
    return {"label": label, "seconds": time.perf_counter() - t, "alloc": a}


def rows(group, results):
    best = min((r["alloc"].objective for r in results if "alloc" in r), default=np.nan)
    for r in results:
        if "error" in r:
            print(f"| {group} | {r['label']} | {r['seconds']:.2f} | | | failed: {r['error']} | |", flush=True)
            continue
        a = r["alloc"]
        print(f"| {group} | {r['label']} | {r['seconds']:.2f} | {a.solver} | {a.milp_pairs} | {a.gap:.1e} | "
              f"{a.objective / best - 1:+.1e} |", flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="*", default=["4096x4096", "11008x4096"], help="single-matrix shapes, MxN")
    ap.add_argument("--layers", type=int, default=32, help="layers of the 7B global problem (0: skip)")
    ap.add_argument("--seeds", type=int, default=2, help="tables per single-matrix shape")
    ap.add_argument("--old-limit", type=float, default=600.0, help="HiGHS time limit of the old path, seconds")
    ap.add_argument("--no-old", action="store_true", help="skip the old path")
    ap.add_argument("--quick", action="store_true", help="4 layers, old path limited to 60 s")
    args = ap.parse_args(argv)
    if args.quick:
        args.layers, args.old_limit = min(args.layers, 4), min(args.old_limit, 60.0)
    cfg = CompressionConfig()
    widths = cfg.bits
    print(f"# widths {widths}, ratio {cfg.ratio:g}, ilp_gap {cfg.ilp_gap:g}, backend {cfg.solver}; "
          f"old path time limit {args.old_limit:g} s; {platform.machine()}, {os.cpu_count()} cpus")
    print("| problem | method | seconds | solver | MILP pairs | proven gap | objective vs best |")
    print("|---|---|---:|---|---:|---:|---:|")
    kw = {"max_widths": cfg.max_widths, "solver": cfg.solver, "mip_rel_gap": cfg.ilp_gap}
    methods = [("new (mckp)", "mckp", None)] + ([] if args.no_old else [("old (milp)", "milp", args.old_limit)])
    for shape in args.shapes:
        m, n = (int(x) for x in shape.lower().split("x"))
        cost = index_cost_bits(m, n, widths, cfg.group_size, scale_bits=cfg.scale_bits)
        for seed in range(args.seeds):
            e = table(m, n, widths, seed)
            results = [run(partial(allocate_bits, e, cost, cfg.budget_bits(m, n), widths, time_limit=lim,
                                   method=meth, **kw), label) for label, meth, lim in methods]
            rows(f"{m}×{n} data-free, seed {seed}", results)
    if args.layers > 0:
        for kind in ("data-free", "calibrated"):
            t = time.perf_counter()
            tabs, costs, budget = [], [], 0
            for layer in range(args.layers):
                for j, (m, n) in enumerate(SHAPES_7B):
                    tabs.append(table(m, n, widths, 1000 * layer + j, kind == "calibrated"))
                    costs.append(index_cost_bits(m, n, widths, cfg.group_size, scale_bits=cfg.scale_bits))
                    budget += cfg.budget_bits(m, n)
            nidx = sum(len(x) for x in tabs)
            print(f"# 7B {kind}: {len(tabs)} matrices, {nidx} indices, tables built in "
                  f"{time.perf_counter() - t:.1f} s", flush=True)
            results = [run(partial(allocate_bits_global, tabs, costs, budget, widths, time_limit=lim, method=meth,
                                   **kw), label) for label, meth, lim in methods]
            rows(f"7B ({args.layers} layers) {kind}, {nidx} indices", results)


if __name__ == "__main__":
    main()
