"""Full against truncated SVD (``CompressionConfig.svd``) on long-tailed deltas of Llama-2-7B shapes.

For each shape: the CPU time of the SVD step as ``compress_matrix`` runs it (full thin SVD, then the
truncated SVD at the rank :func:`~prinmix_jax.methods.shared.svd_rank` picks, both compiled first, then
timed alternately ``--reps`` times in one run; the best of each is reported), their ratio, the largest relative
σ error over the top ``k_max`` indices and over all k returned, and (``--e2e``) the relative output error of
the whole data-free ``compress_matrix`` path with each SVD.

    python benchmarks/bench_svd.py                 # 4096x4096, 11008x4096, 32000x4096; e2e at 4096x4096
    python benchmarks/bench_svd.py --quick         # 1024x1024 and 2752x1024 (same k_max/r ratios), e2e too

Not a test: the big shapes take minutes on a 2-core CPU.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import jax  # noqa: E402

from prinmix_jax import CompressionConfig, compress_matrix  # noqa: E402
from prinmix_jax.core.svd import svd_delta  # noqa: E402
from prinmix_jax.methods.shared import max_kept_rank, oversample_columns, svd_rank  # noqa: E402
from prinmix_jax.synthetic import long_tailed_delta  # noqa: E402


def _time(fn):
    t = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - t


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1024x1024 and 2752x1024 instead of the 7B shapes")
    ap.add_argument("--shapes", default=None, help="comma list like 4096x4096,11008x4096 (overrides --quick)")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--e2e", default=None, help="comma list of shape indices for the compress_matrix comparison "
                                               "(default: the first shape)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    shapes = [(1024, 1024), (2752, 1024)] if args.quick else [(4096, 4096), (11008, 4096), (32000, 4096)]
    if args.shapes:
        shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
    e2e = {0} if args.e2e is None else {int(i) for i in args.e2e.split(",") if i}
    cfg = dataclasses.replace(CompressionConfig(), svd="truncated")
    print(f"# long-tailed deltas (synthetic.long_tailed_delta, decay 1, noise 0.15), ratio {cfg.ratio:.4g}, "
          f"bits {cfg.bits}; truncated: margin {cfg.svd_margin}, oversample {cfg.svd_oversample}, "
          f"iters {cfg.svd_iters}; jax {jax.__version__} on {jax.default_backend()}, {platform.machine()}, "
          f"{os.cpu_count()} cpus, load {os.getloadavg()[0]:.1f}, OPENBLAS_NUM_THREADS="
          f"{os.environ.get('OPENBLAS_NUM_THREADS', 'unset')}")
    print(f"{'shape':>12} {'k_max':>6} {'k':>6} {'l':>6} {'full s':>8} {'trunc s':>8} {'ratio':>6} "
          f"{'σ err k_max':>11} {'σ err k':>9} {'auto':>9} {'e2e full':>9} {'e2e trunc':>9} {'diff':>7}")
    for i, (m, n) in enumerate(shapes):
        d, _ = long_tailed_delta(m, n, seed=args.seed, tokens=16)
        k_max = max_kept_rank(m, n, cfg)
        k = svd_rank(m, n, cfg, k_max)
        over = oversample_columns(k, cfg)
        full = lambda: svd_delta(d)                                                   # noqa: E731
        trunc = lambda: svd_delta(d, k, oversample=over, iters=cfg.svd_iters)        # noqa: E731
        _time(full), _time(trunc)                                                     # compile
        tf, tt = [], []
        for _ in range(args.reps):
            tf.append(_time(full))
            tt.append(_time(trunc))
        s_full = np.asarray(full()[1], np.float64)
        s_tr = np.asarray(trunc()[1], np.float64)
        err = np.abs(s_tr - s_full[:k]) / s_full[:k]
        auto = svd_rank(m, n, CompressionConfig(), k_max)
        row = (f"{m}x{n:<6} {k_max:6d} {k:6d} {min(min(m, n), k + over):6d} {min(tf):8.1f} {min(tt):8.1f} "
               f"{min(tf) / min(tt):6.2f} {err[:k_max].max():11.1e} {err.max():9.1e} "
               f"{'trunc' if auto else 'full':>9}")
        if i in e2e:
            errs = [compress_matrix(d, None, dataclasses.replace(cfg, svd=mode), return_info=True)[1]
                    ["rel_output_error"] for mode in ("full", "truncated")]
            row += f" {errs[0]:9.4f} {errs[1]:9.4f} {errs[1] / errs[0] - 1:+7.2%}"
        print(row, flush=True)


if __name__ == "__main__":
    main()
