"""What one step of GPTQ's column loop costs on this backend, and whether it grows with the rows it updates.

GPTQ quantises one column at a time (each column's rounding error is fed into the columns after it), so a pass
over ``c`` columns is ``c`` sequential steps of a ``lax.fori_loop``. On the CPU a step's cost grows with the rows
it updates. On an accelerator a step of small kernels may cost a fixed floor instead (kernel launches and the
loop condition's round trip to the host): the time then grows with the columns and hardly with the rows. On the
H200 (2026-12-04) it is a floor, but a small one: ~0.026 ms a column on the U side from 1024 to 8192 rows
(x1.12 for 8x the rows), so GPTQ of a 1202-column U takes ~0.03 s (docs/benchmarks.md, H200 section). This
script tells the two apart in well under a minute:

- **U side** (``scale_axis="col"``, the U step): a ``rows × cols`` U under a ``cols × cols`` Hessian;
- **V side** (``scale_axis="row"``, the calibrated error tables and V step): a ``rows × cols`` V̂ under a
  ``cols × cols`` Hessian.

For each it prints the time of a warm call (the best of ``--reps``, after a compiling call) and the
milliseconds per column, over a grid of rows and columns, and then the per-column cost at the largest and
smallest row counts: a ratio near 1 means a fixed per-step floor, a ratio near the rows' ratio means work that
scales. Default settings of ``CompressionConfig`` (group 128, act-order, the ``"mse"`` grids).

    python benchmarks/bench_gptq_loop.py                      # whatever JAX's default backend is
    python benchmarks/bench_gptq_loop.py --rows 1024,4096 --cols 256,1024 --reps 2
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from prinmix_jax import CompressionConfig  # noqa: E402
from prinmix_jax.core.gptq import gptq_quantize  # noqa: E402
from prinmix_jax.methods.shared import gptq_kw  # noqa: E402
from prinmix_jax.synthetic import long_tailed_delta  # noqa: E402


def time_pass(rows: int, cols: int, side: str, reps: int, kw: dict, seed: int = 0) -> float:
    """Seconds of a warm GPTQ pass (the best of ``reps``) of a ``rows × cols`` matrix on ``side`` ("U"/"V"),
    under the ``cols × cols`` calibration Hessian of :func:`~prinmix_jax.synthetic.long_tailed_delta`."""
    w, h = (jnp.asarray(a) for a in long_tailed_delta(rows, cols, seed=seed))
    axis = "col" if side == "U" else "row"
    bits = jnp.asarray(np.random.default_rng(seed).choice([2, 3, 4, 8], cols if axis == "col" else rows)
                       .astype(np.int32))

    def run():
        gptq_quantize(w, h, bits, 0.01, scale_axis=axis, **kw).q.block_until_ready()
    run()                                              # compiles
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - t)
    return best


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="1024,4096", help="comma-separated row counts")
    ap.add_argument("--cols", default="256,1024", help="comma-separated column counts (loop steps)")
    ap.add_argument("--sides", default="U,V", help="U (scale_axis='col'), V (scale_axis='row'), or both")
    ap.add_argument("--reps", type=int, default=2)
    args = ap.parse_args(argv)
    rows = [int(x) for x in args.rows.split(",")]
    cols = [int(x) for x in args.cols.split(",")]
    kw = gptq_kw(CompressionConfig())
    print(f"jax {jax.__version__} on {jax.devices()[0].platform} ({jax.devices()[0].device_kind}); "
          f"GPTQ settings {dict(kw, scale_dtype=np.dtype(kw['scale_dtype']).name)}", flush=True)
    for side in args.sides.split(","):
        per_col = {}
        for c in cols:
            for r in rows:
                s = time_pass(r, c, side, args.reps, kw)
                per_col[r, c] = 1e3 * s / c
                print(f"  {side} side {r:6d} rows x {c:5d} columns: {s:8.3f} s, {per_col[r, c]:.3f} ms per column",
                      flush=True)
        c = max(cols)
        lo, hi = min(rows), max(rows)
        if lo < hi:
            print(f"  {side} side at {c} columns: per-column cost x{per_col[hi, c] / per_col[lo, c]:.2f} for "
                  f"x{hi / lo:.1f} rows (near 1: a fixed floor per step; near x{hi / lo:.1f}: work per row)",
                  flush=True)


if __name__ == "__main__":
    main()
