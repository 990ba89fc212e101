"""Reconstructing compressed matrices (``SVDQuantDelta.reconstruct``, what ``apply`` merges) at Llama-2-7B shapes.

``apply_delta`` / ``prinmix apply`` rebuild every matrix as ``Û diag(σ) V̂`` from its packed width groups.
Every matrix has its own row count per width group, so any program compiled per group shape is compiled
again for nearly every matrix of a model. Two paths, timed in turn on the same matrices in one run:

* ``jax-ops``: unpacking and dequantising op by op in JAX outside ``jit`` (``SVDQuantDelta._factors(jnp)``,
  what ``reconstruct`` did before), then the product: some 60 small programs per matrix.
* ``host``: the current ``reconstruct``: unpacking and dequantising in NumPy (the same float32 values), then
  one compiled product per shape. It runs first on each matrix, so the op-by-op path finds the product
  compiled (in its favour).

The matrices are one Llama-2-7B block's seven (q, k, v, o 4096x4096, gate and up 11008x4096, down
4096x11008) with random codes in four width groups (2, 3, 4, 8 bits) of about the kept counts of a 1/16
allocation (961 indices at 4096x4096, ~1360 at the MLP shapes), each matrix's counts shifted a little so that
no two share a group shape, as in a real model. Reconstruction costs do not depend on the code values.
Printed: per-path seconds and compiled programs per matrix, the block's total and its projection to 32
blocks, and whether both paths give the same bytes.

    python benchmarks/bench_apply.py            # one block of 7B shapes
    python benchmarks/bench_apply.py --scale 0.25   # shapes and counts scaled down (a quick check)
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
import jax.numpy as jnp  # noqa: E402
from jax._src import monitoring  # noqa: E402

from prinmix_jax.core.packing import pack_bits  # noqa: E402
from prinmix_jax.formats import SVDQuantDelta, _scaled_product  # noqa: E402

BITS = (2, 3, 4, 8)
#: (shape, kept rows per width group) of one Llama-2-7B block at 1/16.
BLOCK = [((4096, 4096), (600, 250, 90, 21))] * 4 + [((11008, 4096), (900, 350, 100, 13))] * 2 + \
        [((4096, 11008), (900, 350, 100, 13))]

_COMPILES = [0]


def _count(event, duration, **kw):
    if event == "/jax/core/compile/jaxpr_to_mlir_module_duration":      # every program lowered, cached or not
        _COMPILES[0] += 1


def synthetic_matrix(shape, counts, group_size=128, seed=0) -> SVDQuantDelta:
    """An :class:`SVDQuantDelta` of ``shape`` with random codes, ``counts[i]`` rows at width ``BITS[i]``."""
    rng = np.random.default_rng(seed)
    m, n = shape
    f = {k: [] for k in ("sigma", "v_codes", "v_scale", "v_zero", "u_codes", "u_scale", "u_zero")}
    for b, k in zip(BITS, counts):
        f["sigma"].append(rng.random(k).astype(np.float32))
        for side, length in (("v", n), ("u", m)):
            ng = -(-length // group_size)
            f[f"{side}_codes"].append(pack_bits(rng.integers(0, 2 ** b, (k, length), dtype=np.uint8), b))
            f[f"{side}_scale"].append((rng.random((k, ng)) * 1e-2).astype(np.float16))
            f[f"{side}_zero"].append(rng.integers(0, 2 ** b, (k, ng), dtype=np.uint8))
    widths = np.concatenate([np.full(k, b, np.uint8) for b, k in zip(BITS, counts)])
    return SVDQuantDelta(**{k: tuple(jnp.asarray(a) for a in v) for k, v in f.items()}, widths=jnp.asarray(widths),
                         shape=(m, n), group_bits=BITS, group_size=group_size)


def _jax_ops(cm):
    return _scaled_product(*cm._factors(jnp))


#: host first: it compiles the product of each shape, which the op-by-op path then reuses (in its favour).
PATHS = {"host": lambda cm: cm.reconstruct(), "jax-ops": _jax_ops}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", type=float, default=1.0, help="scale the shapes and counts (quick checks)")
    ap.add_argument("--layers", type=int, default=32, help="depth to project to")
    args = ap.parse_args(argv)
    monitoring.register_event_duration_secs_listener(_count)
    mats = []
    for i, ((m, n), counts) in enumerate(BLOCK):
        shape = (max(8, int(m * args.scale)), max(8, int(n * args.scale)))
        counts = tuple(max(1, int(c * args.scale) + 3 * i + j) for j, c in enumerate(counts))
        mats.append(synthetic_matrix(shape, counts, seed=i))
    print(f"jax {jax.__version__} on {jax.default_backend()}, {platform.machine()}, {os.cpu_count()} cpus, "
          f"load {os.getloadavg()[0]:.1f}")
    print(f"{'shape':>12} {'rows':>5} | " + " | ".join(f"{p:>8} s  programs" for p in PATHS) + " | same bytes")
    total = {p: [0.0, 0] for p in PATHS}
    for cm in mats:
        row, outs = [], []
        for p, fn in PATHS.items():
            c0, t = _COMPILES[0], time.perf_counter()
            outs.append(np.asarray(jax.block_until_ready(fn(cm))))
            dt, nc = time.perf_counter() - t, _COMPILES[0] - c0
            total[p][0] += dt
            total[p][1] += nc
            row.append(f"{dt:10.2f} {nc:9d}")
        same = all(np.array_equal(outs[0], o) for o in outs[1:])
        print(f"{'x'.join(map(str, cm.shape)):>12} {cm.rank:5d} | " + " | ".join(row) + f" | {same}")
    for p, (t, nc) in total.items():
        print(f"{p:>8}: block {t:.1f} s, {nc} programs; {args.layers} blocks ~{t * args.layers / 60:.1f} min")
    print(f"ratio jax-ops / host: {total['jax-ops'][0] / total['host'][0]:.1f}x")


if __name__ == "__main__":
    main()
