"""Full against truncated SVDs (``CompressionConfig.svd``) on long-tailed deltas of Llama-2-7B shapes.

For each shape: the wall time and the process CPU time (all threads) of the SVD step as ``compress_matrix``
runs it, for XLA's full SVD, the Gram SVD (``svd="gram"``, the default under ``"auto"`` where k <= 0.6
min(m, n); on the CPU in three stages, ``cpu_gram_svd``), the same Gram SVD as one program with a dense
``eigh`` (what GPUs and TPUs run; wall time only) and the randomized range finder (``svd="truncated"``), all at the rank :func:`~prinmix_jax.methods.shared.svd_rank` picks, compiled first,
then timed alternately ``--reps`` times in one run (the best of each is reported); their ratios to the full
SVD; the largest relative σ error over the top ``k_max`` indices and over all k returned; whether the Gram
SVD's accuracy guard fell back to the full SVD; and (``--e2e``) the relative output error of the whole
data-free ``compress_matrix`` path with each SVD.

    python benchmarks/bench_svd.py                 # 4096x4096, 11008x4096, 32000x4096; e2e at 4096x4096
    python benchmarks/bench_svd.py --quick         # 1024x1024 and 2752x1024 (same k_max/r ratios), e2e too
    python benchmarks/bench_svd.py --shapes 4096x4096 --parts --e2e ''   # + the CPU Gram SVD's parts

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
from prinmix_jax.core.svd import gram_fallback_needed, svd_delta, svd_fn  # noqa: E402
from prinmix_jax.methods.shared import max_kept_rank, oversample_columns, svd_rank  # noqa: E402
from prinmix_jax.synthetic import long_tailed_delta  # noqa: E402


def _time(fn):
    """(wall seconds, CPU seconds of this process over all its threads) of one call."""
    t, c = time.perf_counter(), time.process_time()
    jax.block_until_ready(fn())
    return time.perf_counter() - t, time.process_time() - c


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1024x1024 and 2752x1024 instead of the 7B shapes")
    ap.add_argument("--shapes", default=None, help="comma list like 4096x4096,11008x4096 (overrides --quick)")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--e2e", default=None, help="comma list of shape indices for the compress_matrix comparison "
                                               "(default: the first shape)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--parts", action="store_true",
                    help="also time the CPU Gram SVD's parts (below)")
    args = ap.parse_args(argv)
    shapes = [(1024, 1024), (2752, 1024)] if args.quick else [(4096, 4096), (11008, 4096), (32000, 4096)]
    if args.shapes:
        shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
    e2e = {0} if args.e2e is None else {int(i) for i in args.e2e.split(",") if i}
    cfg = dataclasses.replace(CompressionConfig(), svd="truncated")
    print(f"# long-tailed deltas (synthetic.long_tailed_delta, decay 1, noise 0.15), ratio {cfg.ratio:.4g}, "
          f"bits {cfg.bits}; margin {cfg.svd_margin}; randomized: oversample {cfg.svd_oversample}, "
          f"iters {cfg.svd_iters}; jax {jax.__version__} on {jax.default_backend()}, {platform.machine()}, "
          f"{os.cpu_count()} cpus, load {os.getloadavg()[0]:.1f}, OPENBLAS_NUM_THREADS="
          f"{os.environ.get('OPENBLAS_NUM_THREADS', 'unset')}")
    print("| shape | k_max | k | full s | gram s | ratio | gram (dense eigh) s | ratio | randomized s | ratio "
          "| CPU s full / gram / rand "
          "| CPU ratio gram / rand | σ err k_max gram / rand "
          "| σ err k gram / rand | gram fallback | auto | e2e full | e2e gram | diff | e2e rand | diff |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---|---|---|---|---:|---:|---:|---:|---:|")
    parts = []
    for i, (m, n) in enumerate(shapes):
        d, _ = long_tailed_delta(m, n, seed=args.seed, tokens=16)
        k_max = max_kept_rank(m, n, cfg)
        k = svd_rank(m, n, cfg, k_max)
        over = oversample_columns(k, cfg)
        eigh_gram = _eigh_gram_svd(d, k)
        runs = {"full": lambda: svd_delta(d),
                "gram": lambda: svd_delta(d, k),
                "eigh": lambda: eigh_gram(d),
                "rand": lambda: svd_delta(d, k, method="randomized", oversample=over, iters=cfg.svd_iters)}
        times = {name: [] for name in runs}
        cpu = {name: [] for name in runs}
        for fn in runs.values():                                                      # compile
            _time(fn)
        for _ in range(args.reps):
            for name, fn in runs.items():
                wall, c = _time(fn)
                times[name].append(wall)
                cpu[name].append(c)
        best = {name: min(t) for name, t in times.items()}
        best_cpu = {name: min(t) for name, t in cpu.items()}
        s_full = np.asarray(runs["full"]()[1], np.float64)[:k]
        err = {name: np.abs(np.asarray(runs[name]()[1], np.float64) - s_full) / s_full for name in ("gram", "rand")}
        raw = svd_fn(k, "gram")(jax.numpy.asarray(d))[1]
        fallback = bool(gram_fallback_needed(np.asarray(raw)[None], min(m, n))[0])
        auto = svd_rank(m, n, CompressionConfig(), k_max)
        row = (f"| {m}x{n} | {k_max} | {k} | {best['full']:.1f} | {best['gram']:.1f} | "
               f"{best['full'] / best['gram']:.2f} | {best['eigh']:.1f} | {best['full'] / best['eigh']:.2f} | "
               f"{best['rand']:.1f} | {best['full'] / best['rand']:.2f} | "
               f"{best_cpu['full']:.1f} / {best_cpu['gram']:.1f} / {best_cpu['rand']:.1f} | "
               f"{best_cpu['full'] / best_cpu['gram']:.2f} / {best_cpu['full'] / best_cpu['rand']:.2f} | "
               f"{err['gram'][:k_max].max():.1e} / {err['rand'][:k_max].max():.1e} | "
               f"{err['gram'].max():.1e} / {err['rand'].max():.1e} | {'yes' if fallback else 'no'} | "
               f"{'gram' if auto else 'full'} |")
        if i in e2e:
            errs = [compress_matrix(d, None, dataclasses.replace(cfg, svd=mode), return_info=True)[1]
                    ["rel_output_error"] for mode in ("full", "gram", "truncated")]
            row += (f" {errs[0]:.4f} | {errs[1]:.4f} | {errs[1] / errs[0] - 1:+.2%} | {errs[2]:.4f} | "
                    f"{errs[2] / errs[0] - 1:+.2%} |")
        else:
            row += " | | | | |"
        print(row, flush=True)
        if args.parts:
            parts.append(((m, n), k, best["full"], _parts(d, k, args.reps)))
    if args.parts:
        _print_parts(parts)


def _eigh_gram_svd(d, k: int):
    """The Gram SVD as one program with the whole Gram matrix and a dense ``eigh`` (what GPUs and TPUs run,
    and the CPU's route before the stages), compiled: ``d -> (U, σ, V)``."""
    from prinmix_jax.core import svd as S

    return jax.jit(lambda x: S.gram_svd(x, k)).lower(jax.numpy.asarray(d)).compile()


def _parts(d, k: int, reps: int) -> dict:
    """Best wall seconds of the CPU Gram SVD's parts on ``d`` (tall orientation), each alone: the upper
    block triangle of the Gram product, LAPACK ``sytrd`` and ``stevd`` on the host,
    the back-transform of the top ``k`` eigenvectors, and the Rayleigh–Ritz step (products, a QR and a k×k
    SVD); and, for comparison, the whole Gram product and a dense ``eigh``."""
    import jax.numpy as jnp

    from prinmix_jax.core import svd as S
    from prinmix_jax.core import tridiagonal as T
    from prinmix_jax.core.numerics import contract

    a = jnp.asarray(d if d.shape[0] >= d.shape[1] else d.T)
    a = a / jnp.abs(a).max()
    upper = jax.jit(lambda x: T.gram_upper(x, 0))
    g = upper(a)
    g_host = np.asarray(g)
    refl, taus, z = (jnp.asarray(x) for x in T.tridiagonal_eigenvectors(g_host, k))
    w_k = T.back_transform(refl, taus, z)

    fns = {"Gram product, upper blocks": (upper, a),
           "sytrd + stevd (host)": (lambda x: T.tridiagonal_eigenvectors(x, k), g_host),
           "back-transform of k": (jax.jit(T.back_transform), refl, taus, z),
           "Rayleigh-Ritz": (jax.jit(lambda x, w: S.rayleigh_ritz(x, w, 0, implicit_q=True)), a, w_k),
           "whole Gram product": (jax.jit(lambda x: contract(x, x, 0, 0)), a),
           "dense eigh": (jax.jit(lambda x: jnp.linalg.eigh(x, symmetrize_input=False)), g.T)}
    for fn, *xs in fns.values():                                                      # compile
        _time(lambda: fn(*xs))
    return {name: min(_time(lambda: fn(*xs))[0] for _ in range(reps)) for name, (fn, *xs) in fns.items()}


def _print_parts(parts):
    """The parts' table: where the CPU Gram SVD's time goes, and the dense ``eigh`` it replaces."""
    names = ["Gram product, upper blocks", "sytrd + stevd (host)", "back-transform of k", "Rayleigh-Ritz",
             "whole Gram product", "dense eigh"]
    print("\n| shape | k | full SVD s | " + " s | ".join(names) + " s | sum of the route's parts s |")
    print("|---|---:|---:|" + "---:|" * (len(names) + 1))
    for (m, n), k, full, p in parts:
        route = sum(p[x] for x in names[:4])
        print(f"| {m}x{n} | {k} | {full:.2f} | " + " | ".join(f"{p[x]:.2f}" for x in names) +
              f" | {route:.2f} ({full / route:.2f}x) |", flush=True)


if __name__ == "__main__":
    main()
