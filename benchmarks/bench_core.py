"""Per-method benchmark of compress_matrix on one synthetic long-tailed delta.

For a delta with singular values ~ i^-1 plus noise and a correlated calibration Hessian, prints for
every method: wall time (cold = first call, including XLA compilation; warm = second call), stored
bytes against the budget, and the relative output error ‖(ΔW−ΔŴ)X‖/‖ΔW X‖; for the warm call, where
the time went: SVD + error table (or V-step GPTQ), the ILP, and the U step (RTC + GPTQ of U).

    python benchmarks/bench_core.py --shape 1024 1024
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
    ap.add_argument("--shape", type=int, nargs=2, default=(2048, 2048), metavar=("M", "N"))
    ap.add_argument("--ratio", type=float, default=1 / 16)
    ap.add_argument("--tokens", type=int, default=4096, help="calibration tokens behind the Hessian")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    m, n = args.shape
    delta, hess = long_tailed_delta(m, n, seed=args.seed, tokens=max(args.tokens, n))
    cfg = CompressionConfig(ratio=args.ratio)
    budget = cfg.budget_bits(m, n) // 8
    print(f"# {m}x{n} delta, ratio {args.ratio:g} (budget {budget} bytes), {args.tokens} tokens; "
          f"jax {jax.__version__} on {jax.devices()[0].platform} ({len(jax.devices())} device(s)), "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus")
    print("| method | cold s (with compile) | warm s | SVD + table s | ILP s | U step s | bytes | bytes/budget "
          "| rel. output error |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for method in args.methods.split(","):
        t = time.perf_counter()
        compress_matrix(delta, hess, cfg, method, return_info=True)    # the same programs as the warm call
        cold = time.perf_counter() - t
        cm, info = compress_matrix(delta, hess, cfg, method, return_info=True)
        parts = " | ".join(f"{info[k]:.2f}" if k in info else "-" for k in ("seconds_stage1", "allocation_seconds",
                                                                            "seconds_u"))
        print(f"| {method} | {cold:.1f} | {info['seconds']:.1f} | {parts} | {cm.nbytes} | {cm.nbytes / budget:.3f} | "
              f"{info['rel_output_error']:.4f} |", flush=True)


if __name__ == "__main__":
    main()
