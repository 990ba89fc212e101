"""GPTQ's set-up shared by the passes under one Hessian (core.factors), for a Llama block's calibrated error
tables (not a timed test).

Two measurements, warm (compiled first), best of ``--reps``, in one sitting on the host's first device:

1. **Stacks, one device.** Each stack of the block (q,k,v sharing one input Hessian · o · gate,up sharing one ·
   down) at the ranks the pipeline gives its tables: the error tables with every matrix's pass doing its own
   set-up (before) against the set-up done once per distinct Hessian (``stack_factors``) and passed in (now),
   with the arrays compared byte for byte.
2. **Tiles, as one device of 8 runs them.** A row tile of each stack (``ROW_TILES`` = 8 tiles per stack),
   with its own set-up (before: every tile of a stack repeats it) and given the set-up (now), and the set-up
   alone. From these, the device time of a block's tables on 8 devices, at this host's proportions: before,
   the stacks one after another, each as long as its tile with the set-up; now, the set-ups of a window of
   ``--window`` blocks spread over the 8 devices (longest first) and then the stacks' row tiles. Useful share:
   the single-device work (one set-up per Hessian and every row once) over 8 × that time.

    python benchmarks/bench_factors.py                      # Llama-2-7B block shapes (4096 / 11008)
    python benchmarks/bench_factors.py --hidden 1024 --inter 2752   # a quick scaled copy
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from prinmix_jax import CompressionConfig  # noqa: E402
from prinmix_jax.core.error_table import error_table  # noqa: E402
from prinmix_jax.core.factors import factor_settings, stack_factors  # noqa: E402
from prinmix_jax.core.gptq import GPTQFactor, gptq_factor  # noqa: E402
from prinmix_jax.core.mesh import ROW_TILES, single_device_mesh  # noqa: E402
from prinmix_jax.core.svd import plan_devices  # noqa: E402
from prinmix_jax.methods.shared import gptq_kw  # noqa: E402
from benchmarks.bench_stages import _best as _best_of, _block_stacks  # noqa: E402


def _best(fn, reps):
    jax.block_until_ready(fn())                    # compile and warm
    return _best_of(fn, reps)


def _hessian(n, rng):
    x = rng.standard_normal((n, n // 2)).astype(np.float32) * np.linspace(0.3, 2, n, dtype=np.float32)[:, None]
    h = x @ x.T / (n // 2)
    return h + 0.05 * np.float32(np.mean(np.diag(h))) * np.eye(n, dtype=np.float32)   # correlated, full rank


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--inter", type=int, default=11008)
    ap.add_argument("--ratio", type=float, default=1 / 16)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--window", type=int, default=4, help="blocks whose set-ups start together")
    ap.add_argument("--devices", type=int, default=8)
    args = ap.parse_args(argv)
    cfg = CompressionConfig(ratio=args.ratio)
    kw = dict(widths=cfg.bits, **gptq_kw(cfg))
    fkw = dict(group_size=cfg.group_size, act_order=cfg.act_order, block_size=cfg.block_size)
    damp = np.float32(cfg.damp)
    mesh = single_device_mesh()
    table = jax.jit(jax.vmap(lambda v, s, h: error_table(v, s, h, damp, **kw)))
    table_f = jax.jit(jax.vmap(lambda v, s, h, r, d: error_table(v, s, h, damp, GPTQFactor(r, d), **kw)))
    one = jax.jit(lambda v, s, h: error_table(v, s, h, damp, **kw))
    one_f = jax.jit(lambda v, s, h, f: error_table(v, s, h, damp, f, **kw))
    factor = jax.jit(lambda h: gptq_factor(h, damp, **fkw))
    rng = np.random.default_rng(0)
    print(f"# Llama block {args.hidden}/{args.inter}, ratio {args.ratio:g}, calibrated error tables (widths "
          f"{','.join(map(str, cfg.bits))}, group {cfg.group_size}); {jax.devices()[0].platform}, "
          f"{os.cpu_count()} cpus; warm, best of {args.reps}")
    print("\n| stack | B x k (n) | own set-ups s | shared set-up s | ratio | same bytes | set-up s | tile own s "
          "| tile given s |")
    print("|---|---|---:|---:|---:|---|---:|---:|---:|")
    sums = dict(before=0.0, now=0.0, set_ups=[], tiles_own=0.0, tiles_given=0.0, work=0.0)
    for name, (b, k, n) in _block_stacks(args.hidden, args.inter, cfg).items():
        v = rng.standard_normal((b, k, n)).astype(np.float32)
        v /= np.linalg.norm(v, axis=2, keepdims=True)
        s = np.sort(rng.random((b, k)).astype(np.float32), axis=1)[:, ::-1].copy()
        h_all = np.broadcast_to(_hessian(n, rng), (b, n, n)).copy()
        t_own = _best(lambda: table(v, s, h_all), args.reps)

        def shared():
            r, d = stack_factors(h_all, factor_settings(damp, **gptq_kw(cfg)), mesh)
            return table_f(v, s, h_all, r, d)
        t_shared = _best(shared, args.reps)
        same = all(np.array_equal(np.asarray(x), np.asarray(y))
                   for x, y in zip(jax.tree.leaves(table(v, s, h_all)), jax.tree.leaves(shared())))
        tile = -(-b * k // ROW_TILES)
        vt, st, h = v.reshape(b * k, n)[:tile], s.reshape(-1)[:tile], h_all[0]
        f = factor(h)
        t_set = _best(lambda: factor(h), args.reps)
        t_tile_own = _best(lambda: one(vt, st, h), args.reps)
        t_tile_given = _best(lambda: one_f(vt, st, h, f), args.reps)
        print(f"| {name} | {b} x {k} ({n}) | {t_own:.2f} | {t_shared:.2f} | {t_own / t_shared:.2f}x | {same} | "
              f"{t_set:.2f} | {t_tile_own:.2f} | {t_tile_given:.2f} |", flush=True)
        sums["before"] += t_own
        sums["now"] += t_shared
        sums["set_ups"].append(t_set)
        sums["tiles_own"] += t_tile_own
        sums["tiles_given"] += t_tile_given
        sums["work"] += t_set + ROW_TILES * t_tile_given
    d = args.devices
    print(f"\nOne device, the block's tables: own set-ups {sums['before']:.2f} s, shared {sums['now']:.2f} s "
          f"({sums['before'] / sums['now']:.2f}x).")
    set_ups = sums["set_ups"] * args.window
    place = plan_devices([1] * len(set_ups), set_ups, d)
    spread = max(sum(c for c, p in zip(set_ups, place) if dev in p) for dev in range(d)) / args.window
    before, now = sums["tiles_own"], spread + sums["tiles_given"]
    work = sums["work"]
    print(f"{d} devices, per block at this host's proportions: before {before:.2f} s (each tile its own set-up, "
          f"useful {work / (d * before):.0%}); now {now:.2f} s (set-ups of {args.window} blocks spread: "
          f"{spread:.2f} s a block, then row tiles {sums['tiles_given']:.2f} s; useful {work / (d * now):.0%}); "
          f"{before / now:.2f}x.")


if __name__ == "__main__":
    main()
