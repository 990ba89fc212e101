"""How a 7B-shaped block's SVDs keep several devices busy: one stack after another (before) against all the
block's stacks started together, each on devices of its own (``core.svd.prefetch_svds``, what the pipeline does
on a mesh of several devices).

Each distinct matrix shape of a block (Llama-2-7B, Llama-3-8B, Qwen2.5-7B, the linears grouped into stacks as
the pipeline groups them: same shape and same input) has its SVD timed here, at the rank the pipeline takes
(ratio 1/16, default settings; long-tailed synthetic deltas; compiled first, best of ``--reps``), on this
machine's one device. From those times, for ``--devices`` devices:

- before: each stack's SVDs ran as one program over the whole mesh, one stack after another: the block's SVD
  time is the sum over its stacks of one matrix's time (a stack of up to ``devices`` matrices fills one round;
  the other devices computed padding copies, or now wait);
- now: the stacks start together on the devices :func:`~prinmix_jax.core.svd.plan_devices` picks (placed by the
  cost model, timed here by the measured times): the block's SVD time is the most loaded device's;
- useful share: the block's SVD work (the sum of every matrix's time) over ``devices ×`` the block's SVD time.

This assumes a device runs one SVD at the speed measured here and that devices do not slow each other: a model
of the schedule, not a measurement on several devices (none was available).

    python benchmarks/bench_svd_devices.py               # the three 7B shapes, 8 devices
    python benchmarks/bench_svd_devices.py --scale 0.25  # a quick run on scaled-down shapes
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import jax  # noqa: E402

from benchmarks.bench_scale import MODELS, scaled_spec  # noqa: E402
from prinmix_jax import CompressionConfig  # noqa: E402
from prinmix_jax.core.svd import plan_devices, svd_cost, svd_delta  # noqa: E402
from prinmix_jax.methods.shared import max_kept_rank, svd_kwargs, svd_rank  # noqa: E402
from prinmix_jax.synthetic import long_tailed_delta  # noqa: E402


def block_stacks(spec: dict) -> list[tuple[str, int, tuple[int, int]]]:
    """``[(names, matrices, (m, n))]``: a block's linears as the pipeline stacks them (same shape and input)."""
    h, i = spec["hidden"], spec["inter"]
    q, kv = spec["heads"] * spec["head_dim"], spec["kv_heads"] * spec["head_dim"]
    attn = [("q,k,v", 3, (q, h))] if q == kv else [("q", 1, (q, h)), ("k,v", 2, (kv, h))]
    return attn + [("o", 1, (h, q)), ("gate,up", 2, (i, h)), ("down", 1, (h, i))]


def time_svd(shape, cfg: CompressionConfig, reps: int) -> tuple[float, int | None]:
    """(best seconds, rank) of the SVD the pipeline takes for one delta of ``shape``."""
    m, n = shape
    rank = svd_rank(m, n, cfg, max_kept_rank(m, n, cfg))
    d = long_tailed_delta(m, n, seed=0, tokens=64)[0]
    kw = svd_kwargs(cfg, rank)
    best = float("inf")
    for _ in range(reps + 1):                    # the first call compiles
        t = time.perf_counter()
        jax.block_until_ready(svd_delta(d, **kw))
        best = min(best, time.perf_counter() - t) if _ else best
    return best, rank


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--devices", type=int, default=8)
    ap.add_argument("--scale", type=float, default=1.0, help="scale every dimension (a quick run)")
    ap.add_argument("--reps", type=int, default=1)
    args = ap.parse_args()
    cfg = CompressionConfig(ratio=1 / 16)
    print(f"# jax {jax.__version__} on {jax.default_backend()}, {platform.machine()}, {os.cpu_count()} cpus; "
          f"ratio 1/16, {args.devices} devices, scale {args.scale}")
    print("| model | stacks (matrices, shape, rank, SVD s) | before s | now s | speed-up | useful before | "
          "useful now | devices used |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    times: dict = {}
    for key in args.models.split(","):
        spec = scaled_spec(key, args.scale)
        stacks = block_stacks(spec)
        for _, _, shape in stacks:
            if shape not in times:
                times[shape] = time_svd(shape, cfg, args.reps)
        sizes = [b for _, b, _ in stacks]
        costs = [svd_cost(*shape, times[shape][1]) for _, _, shape in stacks]
        place = plan_devices(sizes, costs, args.devices)
        secs = [times[shape][0] for _, _, shape in stacks]
        work = sum(b * s for b, s in zip(sizes, secs))
        before = sum(secs)
        load = np.zeros(args.devices)
        for p, s in zip(place, secs):
            load[p] += s
        now = float(load.max())
        desc = "; ".join(f"{names} ({b}, {m}x{n}, {times[(m, n)][1] or 'full'}, {times[(m, n)][0]:.1f})"
                         for names, b, (m, n) in stacks)
        print(f"| {spec['title']} | {desc} | {before:.1f} | {now:.1f} | {before / now:.2f}x | "
              f"{work / (args.devices * before):.0%} | {work / (args.devices * now):.0%} | "
              f"{int((load > 0).sum())} of {args.devices} |")


if __name__ == "__main__":
    main()
