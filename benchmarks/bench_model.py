"""Whole-model compression time (``compress_model``) on the SFT pair of ``prinmix demo`` (built or reused from
its cache), per method: first run in the process (includes XLA compilation) and a second, warm run; plus
the stored bytes and the model-level ratio.

    python benchmarks/bench_model.py                 # the demo's pair (~1.1M params, 4 blocks)
    python benchmarks/bench_model.py --quick         # the tiny test pair
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

from prinmix_jax import METHODS, CompressionConfig  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--ratio", type=float, default=1 / 16)
    ap.add_argument("--calibration-mode", default="parallel", choices=("parallel", "sequential"))
    ap.add_argument("--calib-sequences", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--warm", action="store_true", help="also time a second (warm) run per method")
    args = ap.parse_args(argv)
    from prinmix_jax.pipeline import compress_model
    from prinmix_jax.sft import FULL, QUICK, make_sft_pair
    from prinmix_jax.sft import data as D

    pair = make_sft_pair(QUICK if args.quick else FULL, progress=False)
    ids = D.text_windows(D.corpus_ids("heldout", max_bytes=args.calib_sequences * args.seq_len), args.seq_len,
                         args.calib_sequences)
    s = pair.settings
    print(f"# SFT pair {pair.info['num_params']} params (hidden {s.hidden}, {s.layers} blocks, intermediate "
          f"{s.intermediate}), calibration {ids.shape[0]}x{ids.shape[1]} tokens ({args.calibration_mode}); "
          f"jax {jax.__version__} on {jax.devices()[0].platform} ({len(jax.devices())} device(s)), "
          f"{platform.machine()}, {os.cpu_count()} cpus")
    print("| method | first run s | warm run s | bytes | model ratio | CPU s (first) |")
    print("|---|---:|---:|---:|---:|---:|")
    scratch = tempfile.mkdtemp(prefix="prinmix-bench-model-")
    try:
        for method in args.methods.split(","):
            times = []
            for rep in range(2 if args.warm else 1):
                c0, t = time.process_time(), time.perf_counter()
                summ = compress_model(pair.base, pair.finetuned, os.path.join(scratch, f"{method}-{rep}"), calib=ids,
                                      config=CompressionConfig(ratio=args.ratio), method=method,
                                      calibration_mode=args.calibration_mode, seq_len=args.seq_len)
                times.append((time.perf_counter() - t, time.process_time() - c0))
            warm = f"{times[1][0]:.1f}" if len(times) > 1 else "-"
            print(f"| {method} | {times[0][0]:.1f} | {warm} | {summ['bytes']['total']} | {summ['ratio']:.4f} | "
                  f"{times[0][1]:.1f} |", flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
