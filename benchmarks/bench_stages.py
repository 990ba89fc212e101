"""Compile and run time of each core program of PrinMix for one matrix shape (not a timed test).

The stages of ``compress_matrix(..., method="prinmix")`` (method.md §1–4), each compiled ahead of time
(``jit(...).lower(...).compile()``, so compile and run are timed apart) and run ``--reps`` times
(``block_until_ready``; the best run is reported): the SVD, the error table (GPTQ of V at every
width), the ILP (CVXPY + HiGHS, host), RTC, the U Hessian and the GPTQ of U.

    python benchmarks/bench_stages.py --shape 4096 4096

Two more measurements of issue 14 (items 2 and 3):

    # rows needed vs computed, and wall time, of one Llama block's error tables and V step on the host devices:
    # whole matrices per device (run_sharded) against tiles of rows (run_rows_sharded)
    XLA_FLAGS=--xla_force_host_platform_device_count=8 python benchmarks/bench_stages.py --block-rows 512 1376
    # the SVD of each shape of such a block against writing it to disk and reading it back (SVDStore)
    python benchmarks/bench_stages.py --svd-reuse 1024 2752
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from prinmix_jax import CompressionConfig, allocate_bits, index_cost_bits  # noqa: E402
from prinmix_jax.compress import gptq_kw, max_kept_rank, padded_u_inputs, rank_bucket  # noqa: E402
from prinmix_jax.core.error_table import error_table, select_rows  # noqa: E402
from prinmix_jax.core.gptq import gptq_quantize  # noqa: E402
from prinmix_jax.core.rtc import rtc_target, u_hessian  # noqa: E402
from prinmix_jax.core.svd import thin_svd  # noqa: E402


def _timed(name, fn, args, kwargs, reps, rows):
    """Compiles ``fn`` for ``args`` and runs it ``reps`` times; returns the output of the last run."""
    t = time.perf_counter()
    compiled = jax.jit(fn, static_argnames=tuple(kwargs)).lower(*args, **kwargs).compile()
    compile_s = time.perf_counter() - t
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        out = jax.block_until_ready(compiled(*args))
        best = min(best, time.perf_counter() - t)
    rows.append((name, compile_s, best))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", type=int, nargs=2, default=(1024, 1024), metavar=("M", "N"))
    ap.add_argument("--ratio", type=float, default=1 / 16)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--block-rows", type=int, nargs=2, metavar=("HIDDEN", "INTER"),
                    help="row sharding of a Llama block's error tables and V step (issue 14 item 3)")
    ap.add_argument("--svd-reuse", type=int, nargs=2, metavar=("HIDDEN", "INTER"),
                    help="SVD time against writing and reading it back (issue 14 item 2)")
    args = ap.parse_args(argv)
    if args.block_rows:
        return block_rows(*args.block_rows, args.ratio, args.reps)
    if args.svd_reuse:
        return svd_reuse(*args.svd_reuse, args.ratio, args.reps)
    m, n = args.shape
    rng = np.random.default_rng(0)
    # A long-tailed delta (σ_i ~ 1/i plus noise) and a correlated Hessian, made cheaply at any size.
    r = min(m, n)
    s = np.arange(1, r + 1) ** -1.0
    a = np.linalg.qr(rng.standard_normal((m, r)).astype(np.float32))[0]
    b = np.linalg.qr(rng.standard_normal((n, r)).astype(np.float32))[0]
    delta = ((a * s) @ b.T + 0.02 * s[0] / np.sqrt(n) * rng.standard_normal((m, n))).astype(np.float32)
    x = (rng.standard_normal((n, 2 * n)) * (np.arange(1, n + 1) ** -0.5)[:, None]).astype(np.float32)
    h = (x @ x.T / x.shape[1]).astype(np.float32)
    cfg = CompressionConfig(ratio=args.ratio)
    kw = gptq_kw(cfg)
    d, hh = jax.device_put(delta), jax.device_put(h)
    rows = []
    u, sigma, v = _timed("SVD", thin_svd, (d,), {}, args.reps, rows)
    e, passes = _timed("error table (GPTQ of V, every width)", error_table, (v, sigma, hh, np.float32(cfg.damp)),
                       dict(widths=cfg.bits, **kw), args.reps, rows)
    t = time.perf_counter()
    alloc = allocate_bits(np.asarray(e, np.float64), index_cost_bits(m, n, cfg.bits, cfg.group_size,
                                                                       scale_bits=cfg.scale_bits),
                          cfg.budget_bits(m, n), cfg.bits, max_widths=cfg.max_widths, mip_rel_gap=cfg.ilp_gap)
    rows.append(("ILP (CVXPY + HiGHS, host)", 0.0, time.perf_counter() - t))
    keep = np.nonzero(alloc.widths > 0)[0]
    k, kb = keep.size, rank_bucket(max(keep.size, max_kept_rank(m, n, cfg)))    # as compress_matrix pads
    v_rows = select_rows(jax.tree.map(np.asarray, passes), cfg.bits, keep, alloc.widths[keep])
    sig, v_hat, valid, bits = padded_u_inputs(np.asarray(sigma)[keep], v_rows.q, alloc.widths[keep], kb)
    target, _ = _timed("RTC target", rtc_target, (d, hh, v_hat, sig, np.float32(cfg.rtc_damp), valid), {},
                       args.reps, rows)
    g = _timed("U Hessian", u_hessian, (v_hat, sig, hh, valid), {}, args.reps, rows)
    _timed("GPTQ of U", gptq_quantize, (target, g, bits, np.float32(cfg.damp)), dict(scale_axis="col", **kw),
           args.reps, rows)
    dev = jax.devices()[0]
    print(f"# {m}x{n}, ratio {args.ratio:g}, kept rank {k} (padded to {kb}); jax {jax.__version__} on "
          f"{dev.platform} ({getattr(dev, 'device_kind', '')}), {os.cpu_count()} cpus; best of {args.reps}")
    print("| stage | compile s | run s |")
    print("|---|---:|---:|")
    for name, c, rs in rows:
        print(f"| {name} | {c:.2f} | {rs:.3f} |")
    print(f"| total | {sum(c for _, c, _ in rows):.2f} | {sum(rs for *_, rs in rows):.3f} |", flush=True)


def _block_stacks(hidden: int, inter: int, cfg):
    """``{name: (B, k, n)}`` of a Llama block's V stacks: B matrices sharing a Hessian, k rows of V (the SVD rank
    the error table uses), n input features."""
    from prinmix_jax.methods.shared import svd_rank

    def k(m, n):
        return svd_rank(m, n, cfg, max_kept_rank(m, n, cfg)) or min(m, n)
    return {"q,k,v": (3, k(hidden, hidden), hidden), "o": (1, k(hidden, hidden), hidden),
            "gate,up": (2, k(inter, hidden), hidden), "down": (1, k(hidden, inter), inter)}


def _best(fn, reps):
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - t)
    return best


def block_rows(hidden: int, inter: int, ratio: float, reps: int):
    """Prints, per stack of a Llama block, the rows needed and computed (and weighted by n², the cost of a row)
    and the warm wall time of the error tables and of the V step, by whole matrices and by rows."""
    from jax.sharding import Mesh

    from prinmix_jax.core.factors import factor_settings, stack_factors
    from prinmix_jax.core.mesh import row_plan, run_rows_sharded, run_sharded
    from prinmix_jax.methods.prinmix import TABLE_ROWS, _error_table_fn
    from prinmix_jax.methods.v_step import V_ROWS, _v_rows_fn

    cfg = CompressionConfig(ratio=ratio)
    mesh = Mesh(np.asarray(jax.devices()), ("batch",))
    d = mesh.size
    table, vstep = _error_table_fn(widths=cfg.bits, **gptq_kw(cfg)), _v_rows_fn(**gptq_kw(cfg))
    rng = np.random.default_rng(0)
    print(f"# Llama block {hidden}/{inter}, ratio {ratio:g}, {d} {jax.devices()[0].platform} devices, "
          f"{os.cpu_count()} cpus; warm, best of {reps}")
    print("| stack | B x k rows (n) | rows computed: matrices / rows | table s: matrices / rows "
          "| V step s: matrices / rows |")
    print("|---|---|---:|---:|---:|")
    tot = np.zeros(4)
    for name, (b, k, n) in _block_stacks(hidden, inter, cfg).items():
        v = rng.standard_normal((b, k, n)).astype(np.float32)
        v /= np.linalg.norm(v, axis=2, keepdims=True)
        s = np.sort(rng.random((b, k)).astype(np.float32), axis=1)[:, ::-1].copy()
        x = rng.standard_normal((n, 2 * n)).astype(np.float32)
        h = np.broadcast_to(x @ x.T / (2 * n), (b, n, n)).copy()
        bits = rng.choice([b_ for b_ in cfg.bits if b_], (b, k)).astype(np.int32)
        damp = np.float32(cfg.damp)
        r, fd = stack_factors(h, factor_settings(damp, **gptq_kw(cfg)), mesh)
        rows_m, rows_r = -(-b // d) * d * k, row_plan([list(range(b))], k, d).rows.size
        t = [_best(lambda: run_sharded(table, mesh, v, s, h, r, fd, damp), reps),
             _best(lambda: run_rows_sharded(table, mesh, (v, s), (h, r, fd), damp, out_rows=TABLE_ROWS), reps),
             _best(lambda: run_sharded(vstep, mesh, v, bits, h, r, fd, damp), reps),
             _best(lambda: run_rows_sharded(vstep, mesh, (v, bits), (h, r, fd), damp, out_rows=V_ROWS), reps)]
        tot += [b * k * n * n, rows_m * n * n, rows_r * n * n, 0]
        print(f"| {name} | {b} x {k} ({n}) | {rows_m} / {rows_r} | {t[0]:.2f} / {t[1]:.2f} | {t[2]:.2f} / {t[3]:.2f} |",
              flush=True)
    print(f"useful share of the row work (rows x n^2): matrices {tot[0] / tot[1]:.1%}, rows {tot[0] / tot[2]:.1%}")


def svd_reuse(hidden: int, inter: int, ratio: float, reps: int):
    """Prints, per shape of a Llama block, the SVD's warm time (as the pipeline computes it) against writing it
    with :class:`~prinmix_jax.svd_store.SVDStore` and reading it back (page cache)."""
    import tempfile

    from prinmix_jax.core.svd import svd_settings, svd_sharded
    from prinmix_jax.core.mesh import single_device_mesh
    from prinmix_jax.methods.shared import oversample_columns, svd_method, svd_rank
    from prinmix_jax.svd_store import SVDStore

    cfg = CompressionConfig(ratio=ratio)
    print(f"# SVD of one delta vs keeping it: ratio {ratio:g}, {jax.devices()[0].platform}, {os.cpu_count()} cpus")
    print("| shape | SVD | MB | SVD s | write s | read s |")
    print("|---|---|---:|---:|---:|---:|")
    rng = np.random.default_rng(0)
    for m, n in ((hidden, hidden), (inter, hidden), (hidden, inter)):
        rank = svd_rank(m, n, cfg, max_kept_rank(m, n, cfg))
        kw = {} if rank is None else dict(rank=rank, method=svd_method(cfg), oversample=oversample_columns(rank, cfg),
                                          iters=cfg.svd_iters)
        d = rng.standard_normal((1, m, n)).astype(np.float32)
        svd_s = _best(lambda: svd_sharded(d, single_device_mesh(), **kw), reps)
        with tempfile.TemporaryDirectory() as tmp:
            store = SVDStore(os.path.join(tmp, "p0"), "always")
            usv = store.stack_svd(["0/x"], lambda: d, lambda x: svd_sharded(x, single_device_mesh(), **kw),
                                  svd_settings(**kw))
            store.freeze()
            t = time.perf_counter()
            back = store.stack_svd(["0/x"], lambda: d, None, svd_settings(**kw))
            read_s = time.perf_counter() - t
            assert all(np.array_equal(a, b) for a, b in zip(usv, back))
        mb = sum(x.nbytes for x in usv) / 1e6
        print(f"| {m}x{n} | {svd_settings(**kw)} | {mb:.0f} | {svd_s:.2f} | {store.stats['seconds_write']:.2f} "
              f"| {read_s:.2f} |", flush=True)


if __name__ == "__main__":
    main()
