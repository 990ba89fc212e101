"""Blocks read ahead in a thread (``sources.read_ahead``) against each block read when its turn comes, on this
machine (a benchmark, not a test).

On accelerators the pipeline reads the next blocks while the devices work (``step_compress.read_ahead_blocks``);
on CPU devices it is off by default (``READ_AHEAD_ON_CPU``), since there the reading thread shares the cores
with the computation. This measures what it does on the CPU anyway: a Llama-2-7B-shaped pair scaled down
(``bench_scale.scaled_spec``, bf16 sharded safetensors), compressed data-free in this process with reading
ahead off and on, alternately ``--reps`` times after a warm-up run (compiles), in one sitting. Printed: wall
seconds of each run, the best of each, their ratio, the seconds spent reading blocks (in the main thread or
the reading thread) and whether the checkpoints are byte-identical.

    python benchmarks/bench_read_ahead.py                 # scale 1/8, 8 layers
    python benchmarks/bench_read_ahead.py --scale 0.25 --layers 4
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

import jax  # noqa: E402

import bench_scale  # noqa: E402
from prinmix_jax import step_compress  # noqa: E402
from prinmix_jax.pipeline import ParamPolicy, compress_model  # noqa: E402
from prinmix_jax.sources import ModelSource  # noqa: E402


def _arrays(out: str) -> dict:
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
    from pipeline_fixtures import read_arrays
    return read_arrays(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama2", choices=sorted(bench_scale.MODELS))
    ap.add_argument("--scale", type=float, default=0.125)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args(argv)
    spec = bench_scale.scaled_spec(args.model, args.scale, layers=args.layers)
    root = args.workdir or tempfile.mkdtemp(prefix="read-ahead-")
    pair = bench_scale.write_pair(root, spec)
    reads = {"main": 0.0, "thread": 0.0}
    real_block = ModelSource.block

    def block(self, b):
        t = time.perf_counter()
        try:
            return real_block(self, b)
        finally:
            who = "main" if threading.current_thread() is threading.main_thread() else "thread"
            reads[who] += time.perf_counter() - t
    ModelSource.block = block

    def run(on: bool, name: str):
        step_compress.READ_AHEAD_ON_CPU = on
        for k in reads:
            reads[k] = 0.0
        out = os.path.join(root, name)
        t = time.perf_counter()
        compress_model(pair["base"], pair["ft"], out, overwrite=True,
                       policy=ParamPolicy(embeddings="store", lm_head="store"))
        return time.perf_counter() - t, dict(reads), out

    print(f"# {args.model} x{args.scale:g} (hidden {spec['hidden']}, inter {spec['inter']}), {args.layers} layers, "
          f"data-free, global scope; jax {jax.__version__} on {jax.default_backend()} "
          f"({jax.device_count()} device(s)), {platform.machine()}, {os.cpu_count()} cpus, "
          f"load {os.getloadavg()[0]:.1f}")
    run(False, "warm-up")
    times = {False: [], True: []}
    outs = {}
    for rep in range(args.reps):
        for on in (False, True):
            secs, rd, outs[on] = run(on, f"{'on' if on else 'off'}-{rep}")
            times[on].append(secs)
            print(f"read ahead {'on ' if on else 'off'}: {secs:6.1f} s (block reads: {rd['main']:.1f} s in the "
                  f"main thread, {rd['thread']:.1f} s in the reading thread)", flush=True)
    best_off, best_on = min(times[False]), min(times[True])
    same = _arrays(outs[False]) == _arrays(outs[True])
    print(f"best: off {best_off:.1f} s, on {best_on:.1f} s, off/on {best_off / best_on:.2f}x; "
          f"byte-identical: {'yes' if same else 'NO'}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
