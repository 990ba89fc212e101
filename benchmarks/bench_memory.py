"""Peak host memory of ``prinmix compress`` versus the number of decoder blocks (not a timed test).

For each block count, a synthetic (base, fine-tuned) Llama pair is written with safetensors (hidden 256,
intermediate 512, vocab 256, float32), then ``prinmix compress`` runs in a fresh process (data-free and with
calibration ids) and its peak RSS (``ru_maxrss`` of the child) is reported. Streaming keeps the peak flat:
only one block of both models plus the calibration state is resident.

    python benchmarks/bench_memory.py --blocks 2 8 32 [--hidden 256] [--method prinmix]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

from prinmix_jax.synthetic import write_llama_pair


def run(base, ft, out, calib, method) -> tuple[float, float]:
    # --no-compile-cache: every run compiles in a cold process, as the figures have always meant (the CLI's
    # persistent cache would make the later block counts reuse the first one's programs)
    cmd = [sys.executable, "-m", "prinmix_jax.cli", "compress", base, ft, out, "--method", method, "--no-progress",
           "--group-size", "64", "--no-compile-cache"]
    cmd += ["--calib", calib, "--seq-len", "64"] if calib else ["--data-free"]
    env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
    import time

    t = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)  # this child's own peak RSS
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"compress failed with exit status {proc.returncode}")
    return usage.ru_maxrss / 1024, time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--blocks", type=int, nargs="+", default=[2, 8, 32])
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--inter", type=int, default=512)
    ap.add_argument("--vocab", type=int, default=256)
    ap.add_argument("--method", default="prinmix")
    ap.add_argument("--calib", action="store_true", help="use 16 x 64 random calibration ids")
    args = ap.parse_args()
    print(f"{'blocks':>6} {'model MB':>9} {'peak RSS MB':>12} {'seconds':>8}")
    with tempfile.TemporaryDirectory(prefix="prinmix-bench-") as root:
        calib = None
        if args.calib:
            calib = os.path.join(root, "calib.jsonl")
            rng = np.random.default_rng(0)
            with open(calib, "w") as f:
                for _ in range(16):
                    f.write(json.dumps({"ids": rng.integers(0, args.vocab, 64).tolist()}) + "\n")
        for n in args.blocks:
            base, ft = write_llama_pair(root, n, args.hidden, args.inter, args.vocab)
            size = os.path.getsize(os.path.join(base, "model.safetensors")) / 2 ** 20
            peak, secs = run(base, ft, os.path.join(root, f"delta-{n}"), calib, args.method)
            print(f"{n:>6} {size:>9.1f} {peak:>12.1f} {secs:>8.1f}", flush=True)


if __name__ == "__main__":
    main()
