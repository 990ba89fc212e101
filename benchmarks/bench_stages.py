"""Compile and run time of each core program of PrinMix for one matrix shape (not a timed test).

The stages of ``compress_matrix(..., method="prinmix")`` (method.md §1–4), each compiled ahead of time
(``jit(...).lower(...).compile()``, so compile and run are timed apart) and run ``--reps`` times
(``block_until_ready``; the best run is reported): the SVD, the error table (GPTQ of V at every
width), the ILP (CVXPY + HiGHS, host), RTC, the U Hessian and the GPTQ of U.

    python benchmarks/bench_stages.py --shape 4096 4096
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from prinmix_jax import CompressionConfig, allocate_bits, index_cost_bits  # noqa: E402
from prinmix_jax.compress import gptq_kw, max_kept_rank, padded_u_inputs, rank_bucket  # noqa: E402
from prinmix_jax.core.error_table import error_table, select_rows  # noqa: E402
from prinmix_jax.core.gptq import gptq_quantize  # noqa: E402
from prinmix_jax.core.rtc import rtc_target, u_hessian  # noqa: E402
from prinmix_jax.core.svd import thin_svd  # noqa: E402


def _timed(name, fn, args, kwargs, reps, rows):
    """Compiles ``fn`` for ``args`` and runs it ``reps`` times; returns the output of the last run."""
    t = time.perf_counter()
    compiled = jax.jit(fn, static_argnames=tuple(kwargs)).lower(*args, **kwargs).compile()
    compile_s = time.perf_counter() - t
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        out = jax.block_until_ready(compiled(*args))
        best = min(best, time.perf_counter() - t)
    rows.append((name, compile_s, best))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", type=int, nargs=2, default=(1024, 1024), metavar=("M", "N"))
    ap.add_argument("--ratio", type=float, default=1 / 16)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args(argv)
    m, n = args.shape
    rng = np.random.default_rng(0)
    # A long-tailed delta (σ_i ~ 1/i plus noise) and a correlated Hessian, made cheaply at any size.
    r = min(m, n)
    s = np.arange(1, r + 1) ** -1.0
    a = np.linalg.qr(rng.standard_normal((m, r)).astype(np.float32))[0]
    b = np.linalg.qr(rng.standard_normal((n, r)).astype(np.float32))[0]
    delta = ((a * s) @ b.T + 0.02 * s[0] / np.sqrt(n) * rng.standard_normal((m, n))).astype(np.float32)
    x = (rng.standard_normal((n, 2 * n)) * (np.arange(1, n + 1) ** -0.5)[:, None]).astype(np.float32)
    h = (x @ x.T / x.shape[1]).astype(np.float32)
    cfg = CompressionConfig(ratio=args.ratio)
    kw = gptq_kw(cfg)
    d, hh = jax.device_put(delta), jax.device_put(h)
    rows = []
    u, sigma, v = _timed("SVD", thin_svd, (d,), {}, args.reps, rows)
    e, passes = _timed("error table (GPTQ of V, every width)", error_table, (v, sigma, hh, np.float32(cfg.damp)),
                       dict(widths=cfg.bits, **kw), args.reps, rows)
    t = time.perf_counter()
    alloc = allocate_bits(np.asarray(e, np.float64), index_cost_bits(m, n, cfg.bits, cfg.group_size,
                                                                       scale_bits=cfg.scale_bits),
                          cfg.budget_bits(m, n), cfg.bits, max_widths=cfg.max_widths, mip_rel_gap=cfg.ilp_gap)
    rows.append(("ILP (CVXPY + HiGHS, host)", 0.0, time.perf_counter() - t))
    keep = np.nonzero(alloc.widths > 0)[0]
    k, kb = keep.size, rank_bucket(max(keep.size, max_kept_rank(m, n, cfg)))    # as compress_matrix pads
    v_rows = select_rows(jax.tree.map(np.asarray, passes), cfg.bits, keep, alloc.widths[keep])
    sig, v_hat, valid, bits = padded_u_inputs(np.asarray(sigma)[keep], v_rows.q, alloc.widths[keep], kb)
    target, _ = _timed("RTC target", rtc_target, (d, hh, v_hat, sig, np.float32(cfg.rtc_damp), valid), {},
                       args.reps, rows)
    g = _timed("U Hessian", u_hessian, (v_hat, sig, hh, valid), {}, args.reps, rows)
    _timed("GPTQ of U", gptq_quantize, (target, g, bits, np.float32(cfg.damp)), dict(scale_axis="col", **kw),
           args.reps, rows)
    dev = jax.devices()[0]
    print(f"# {m}x{n}, ratio {args.ratio:g}, kept rank {k} (padded to {kb}); jax {jax.__version__} on "
          f"{dev.platform} ({getattr(dev, 'device_kind', '')}), {os.cpu_count()} cpus; best of {args.reps}")
    print("| stage | compile s | run s |")
    print("|---|---:|---:|")
    for name, c, rs in rows:
        print(f"| {name} | {c:.2f} | {rs:.3f} |")
    print(f"| total | {sum(c for _, c, _ in rows):.2f} | {sum(rs for *_, rs in rows):.3f} |", flush=True)


if __name__ == "__main__":
    main()
