"""``compress_matrix``: one delta matrix, end to end (method.md §1–4 and Baselines)."""
from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from prinmix_jax.allocation import _check_solver, allocate_bits, index_cost_bits
from prinmix_jax.config import METHODS, CompressionConfig
from prinmix_jax.core.error_table import error_table, row_hessian_norms, select_rows, u_error_estimate
from prinmix_jax.core.gptq import HIGHEST, GPTQResult, gptq_quantize
from prinmix_jax.core.packing import pack_bits
from prinmix_jax.core.rtc import rtc_target, u_hessian
from prinmix_jax.formats import CompressedMatrix, LowRankDelta, SignDelta, SVDQuantDelta

# Widths of Delta-CoMe by singular-value rank: (count, bits); the rest at 2 bits, then dropped.
DELTACOME_SCHEDULE = ((2, 8), (32, 3))
DELTACOME_BITS = (0, 2, 3, 8)


def _validate(delta, hessian):
    d = np.asarray(delta)
    if d.ndim != 2:
        raise ValueError(f"delta must be a 2-D (out, in) matrix, got shape {d.shape}")
    if d.size == 0:
        raise ValueError(f"delta is empty (shape {d.shape})")
    if not np.issubdtype(d.dtype, np.floating) and d.dtype != jnp.bfloat16:
        raise ValueError(f"delta must be a floating-point array, got {d.dtype}")
    d = d.astype(np.float32)
    if not np.all(np.isfinite(d)):
        raise ValueError("delta contains NaN or Inf")
    n = d.shape[1]
    if hessian is None:
        return d, None
    h = np.asarray(hessian)
    if h.shape != (n, n):
        raise ValueError(f"hessian must be ({n}, {n}) for a delta with {n} input features, got {h.shape}")
    h = h.astype(np.float32)
    if not np.all(np.isfinite(h)):
        raise ValueError("hessian contains NaN or Inf")
    return d, h


def output_error(delta, approx, hessian=None) -> float:
    """Relative output error ``‖(ΔW − ΔŴ) X‖ / ‖ΔW X‖`` with ``H = X Xᵀ / N`` (identity if None)."""
    d = jnp.asarray(delta, jnp.float32)
    a = jnp.asarray(approx, jnp.float32)
    h = None if hessian is None else jnp.asarray(hessian, jnp.float32)
    num, den = _error_terms(d, a, h)
    return float(jnp.sqrt(num / den)) if float(den) > 0 else 0.0


@jax.jit
def _error_terms(d, a, h):
    e = d - a
    if h is None:
        return jnp.sum(e * e), jnp.sum(d * d)
    return (jnp.sum(jnp.matmul(e, h, precision=HIGHEST) * e),
            jnp.sum(jnp.matmul(d, h, precision=HIGHEST) * d))


@jax.jit
def reconstruct(cm: CompressedMatrix):
    """``cm.reconstruct()`` as one compiled program (faster than op-by-op for repeated shapes)."""
    return cm.reconstruct()


def _pack_svd(shape, sigma, widths, v_res: GPTQResult, u_res: GPTQResult, cfg, method) -> SVDQuantDelta:
    """Groups the kept indices by width and packs their codes (host side, numpy; one transfer at the end).

    Everything here has rank-dependent shapes, so it stays off the device: an eager jax op or
    ``jnp.asarray`` would compile a small program per shape, and over many blocks those pile up.
    """
    sdt = cfg.scale_jnp_dtype
    m, n = shape
    sigma, widths = np.asarray(sigma), np.asarray(widths)
    vc, vs, vz = np.asarray(v_res.codes), np.asarray(v_res.scale), np.asarray(v_res.zero)
    uc, us, uz = np.asarray(u_res.codes).T, np.asarray(u_res.scale), np.asarray(u_res.zero)
    fields = {k: [] for k in ("sigma", "v_codes", "v_scale", "v_zero", "u_codes", "u_scale", "u_zero")}
    group_bits, all_w = [], []
    for b in sorted({int(x) for x in widths}, reverse=True):
        idx = np.nonzero(widths == b)[0]
        group_bits.append(b)
        all_w.append(np.full(idx.size, b, np.uint8))
        fields["sigma"].append(sigma[idx].astype(np.float32))
        fields["v_codes"].append(pack_bits(vc[idx], b))
        fields["v_scale"].append(vs[idx].astype(sdt))
        fields["v_zero"].append(vz[idx].astype(np.uint8))
        fields["u_codes"].append(pack_bits(uc[idx], b))
        fields["u_scale"].append(us[idx].astype(sdt))
        fields["u_zero"].append(uz[idx].astype(np.uint8))
    w = np.concatenate(all_w) if all_w else np.zeros(0, np.uint8)
    fields, w = jax.device_put(({k: tuple(v) for k, v in fields.items()}, w))
    return SVDQuantDelta(widths=w, shape=(m, n), group_bits=tuple(group_bits),
                         group_size=cfg.group_size or max(m, n), method=method, **fields)


def _gptq_kw(cfg: CompressionConfig) -> dict:
    """The GPTQ settings of a config (static arguments of the jitted GPTQ and error-table programs)."""
    return dict(group_size=cfg.group_size, act_order=cfg.act_order, block_size=cfg.block_size,
                scale_dtype=cfg.scale_jnp_dtype)


def max_kept_rank(m: int, n: int, cfg: CompressionConfig, bits=None) -> int:
    """The most singular indices an (m, n) matrix can keep within its budget: every kept index costs at
    least its cost at the smallest nonzero width of ``bits`` (default ``cfg.bits``)."""
    bits = cfg.bits if bits is None else bits
    r = min(m, n)
    if 0 not in bits:
        return r
    costs = index_cost_bits(m, n, bits, cfg.group_size, scale_bits=cfg.scale_bits)
    return int(min(r, cfg.budget_bits(m, n) // int(costs[costs > 0].min())))


def _one_index_bits(m: int, n: int, cfg: CompressionConfig, method: str) -> int:
    """What keeping a single singular vector costs under ``method`` (its cheapest first index)."""
    if method == "lowrank":
        return 16 * (m + n)
    if method == "deltacome":   # the schedule starts at 8 bits
        return int(index_cost_bits(m, n, (8,), cfg.group_size, scale_bits=cfg.scale_bits)[0])
    costs = index_cost_bits(m, n, cfg.bits, cfg.group_size, scale_bits=cfg.scale_bits)
    return int(costs[costs > 0].min())


def check_settings(shapes: dict, cfg: CompressionConfig, method: str, scope: str = "matrix") -> None:
    """Refuses settings that cannot give a useful result, before any work is done.

    Args:
      shapes: ``{"blocks": [(m, n), ...], "globals": [(m, n), ...]}``: the decoder-block linears (which
        share one budget under the global scope) and the matrices compressed outside the blocks.
      cfg: the compression settings.
      method: one of :data:`~prinmix_jax.config.METHODS`.
      scope: ``"matrix"`` or ``"global"``.

    Raises:
      ValueError: in the words of the CLI's options, when the global allocation lacks width 0, when
        ``bits`` has no 0 and storing every singular vector exceeds a matrix's budget (the ILP would be
        infeasible), or when the budget cannot keep a single singular vector of any matrix (every
        matrix would be stored as zero).
    """
    if method == "bitdelta":    # 1 bit per entry (and one scale) whatever the ratio
        if cfg.ratio < 1 / 16:
            raise ValueError(f"method bitdelta stores 1 bit per parameter (ratio 1/16) whatever the budget; ratio "
                             f"{cfg.ratio:.4g} (--ratio) is below it: use --ratio 1/16 or a method that "
                             "follows the budget (prinmix)")
        return
    blocks, glob = list(shapes.get("blocks", ())), list(shapes.get("globals", ()))
    bits = ",".join(map(str, cfg.bits))
    if method in ("prinmix", "uniform") and 0 not in cfg.bits:
        if scope == "global":
            raise ValueError(f"bit widths {bits} (--bits) lack 0: the global allocation (--scope global, the "
                             "default for prinmix) must be able to drop singular vectors; add 0, e.g. "
                             f"--bits 0,{bits}")
        for m, n in sorted(set(blocks + glob)):
            need = min(m, n) * int(min(index_cost_bits(m, n, cfg.bits, cfg.group_size, scale_bits=cfg.scale_bits)))
            if need > cfg.budget_bits(m, n):
                raise ValueError(f"bit widths {bits} (--bits) lack 0, so all {min(m, n)} singular vectors of a "
                                 f"{m}x{n} matrix must be stored: at least {need // 8} bytes, but ratio "
                                 f"{cfg.ratio:.4g} (--ratio) allows {cfg.budget_bits(m, n) // 8}; add 0 to --bits")
    everything = blocks + glob
    if not everything:
        return
    if scope == "global" and blocks:
        fits = sum(cfg.budget_bits(m, n) for m, n in blocks) >= min(_one_index_bits(m, n, cfg, method)
                                                                    for m, n in blocks)
        fits = fits or any(cfg.budget_bits(m, n) >= _one_index_bits(m, n, cfg, method) for m, n in glob)
    else:
        fits = any(cfg.budget_bits(m, n) >= _one_index_bits(m, n, cfg, method) for m, n in everything)
    if not fits:
        m, n = max(everything, key=lambda s: s[0] * s[1])
        raise ValueError(f"ratio {cfg.ratio:.4g} (--ratio) leaves no room for a single singular vector: one "
                         f"costs {_one_index_bits(m, n, cfg, method) // 8} bytes in a {m}x{n} matrix whose budget "
                         f"is {cfg.budget_bits(m, n) // 8} bytes, so every matrix would be stored as zero; raise "
                         "the ratio (1/16 = 1 bit per parameter)")


def rank_bucket(k: int) -> int:
    """Smallest size >= k among 32, 40, 48, 56, 64, 80, 96, ... (four per octave, <= 25% padding)."""
    size = 32
    while size < k:
        step = 1 << max(0, size.bit_length() - 3)
        size += step
    return size


def padded_u_inputs(sigma_k, v_q, widths_k, kb: int):
    """The U step's inputs for k kept indices, inertly padded to ``kb`` on the host and put on the device:
    ``(σ (kb,) padded with ones, V̂ (kb, n) padded with zero rows, valid (kb,) bool, widths (kb,) int32
    padded with 1)``."""
    k = len(widths_k)
    pad = kb - k
    sigma_k = np.asarray(sigma_k)
    return jax.device_put((np.concatenate([sigma_k, np.ones(pad, sigma_k.dtype)]),
                           np.pad(np.asarray(v_q, np.float32), ((0, pad), (0, 0))),
                           np.arange(kb) < k,
                           np.concatenate([widths_k, np.ones(pad, np.int64)]).astype(np.int32)))


def _svd_quant(delta, h, u, sigma, widths, v_rows: GPTQResult, cfg, method, rtc, info, want_error, u_rank):
    """Steps 2–4 of method.md §4 for the kept indices ``widths > 0``.

    The k kept indices are padded to :func:`rank_bucket` (max(k, ``u_rank``)) with inert entries (zero
    rows of V̂, zero columns of the target, decoupled Hessian entries), so the U-side programs compile
    once per padded rank rather than once per rank; the padding is built and dropped on the host
    (numpy), where rank-dependent shapes cost no compilation. ``v_rows`` holds numpy arrays.
    With ``want_error``, also records ``info["rel_output_error"]`` of ``Û diag(σ) V̂`` (from the padded
    factors: the same numbers as the packed result, without a program per rank).
    """
    keep = np.nonzero(widths > 0)[0]
    kw = widths[keep]
    k = keep.size
    if k == 0:
        empty = GPTQResult(*(np.zeros((0, 0)),) * 5)
        if want_error:
            info["rel_output_error"] = 1.0 if float(jnp.sum(delta * delta)) > 0 else 0.0
        return _pack_svd(delta.shape, [], kw, empty, empty, cfg, method)
    kb = rank_bucket(max(k, u_rank))
    sig_k = np.asarray(sigma)[keep]
    sig_p, v_hat, valid, bits = padded_u_inputs(sig_k, v_rows.q, kw, kb)
    t = time.perf_counter()
    if rtc:
        target, damp_used = rtc_target(delta, h, v_hat, sig_p, cfg.rtc_damp, valid)
        info["rtc_damp"] = float(damp_used)
    else:
        target = jax.device_put(np.pad(np.asarray(u)[:, keep], ((0, 0), (0, kb - k))))
    g = u_hessian(v_hat, sig_p, h, valid)
    u_pad = gptq_quantize(target, g, bits, cfg.damp, scale_axis="col", **_gptq_kw(cfg))
    if want_error:
        num, den = _factored_error_terms(delta, u_pad.q, sig_p, v_hat, h)
        info["rel_output_error"] = float(np.sqrt(num / den)) if float(den) > 0 else 0.0
    u_res = jax.tree.map(np.asarray, u_pad)
    u_res = GPTQResult(u_res.q[:, :k], u_res.codes[:, :k], u_res.scale[:k], u_res.zero[:k], u_res.damp)
    info["u_damp"] = float(u_res.damp)
    info["seconds_u"] = time.perf_counter() - t
    return _pack_svd(delta.shape, sig_k, kw, v_rows, u_res, cfg, method)


@jax.jit
def _factored_error_terms(d, u_q, sigma, v_q, h):
    """``_error_terms`` of ``d`` and ``u_q diag(σ) v_q`` (padded indices have zero rows of ``v_q``)."""
    return _error_terms(d, jnp.matmul(u_q * sigma[None, :], v_q, precision=HIGHEST), h)


def compress_matrix(delta, hessian=None, config: CompressionConfig | None = None, method: str = "prinmix",
                    *, return_info: bool = False):
    """Compresses one delta matrix under the byte budget ``config.ratio · 2 · m · n``.

    Args:
      delta: (m, n) ``W_ft − W_base`` in the ``[out, in]`` layout (any float dtype; upcast to f32).
      hessian: (n, n) input Hessian ``X Xᵀ / N`` or ``None`` for the identity (data-free).
      config: a :class:`CompressionConfig` (default settings if ``None``).
      method: ``"prinmix"``, ``"deltacome"``, ``"bitdelta"``, ``"lowrank"`` or ``"uniform"``.
      return_info: also return a dict of diagnostics (budget, bytes, allocation, timings,
        damping escalations, relative output error).

    Returns:
      A compressed matrix (:class:`SVDQuantDelta`, :class:`LowRankDelta` or :class:`SignDelta`),
      or ``(compressed, info)``.

    Raises:
      ValueError: bad shapes, NaN/Inf, empty input, an unknown method or solver, or an
        allocation that is not solved to optimality.
    """
    mesh = Mesh(np.asarray(jax.devices()[:1]), (BATCH_AXIS,))
    out = compress_stack([delta], None if hessian is None else [hessian], config, method, mesh=mesh,
                         return_info=return_info)
    return out[0]


def compress_stack(deltas, hessians=None, config: CompressionConfig | None = None, method: str = "prinmix",
                   *, mesh: Mesh | None = None, widths=None, u_rank: int | None = None,
                   return_info: bool = False) -> list:
    """Compresses a stack of same-shape deltas; the heavy steps run sharded over ``mesh``.

    The SVDs and the error tables (or Delta-CoMe's V-side GPTQ) of all matrices run as one
    ``jax.jit``-compiled, vmapped program whose batch axis is sharded over the mesh (padded to a
    multiple of the device count). The allocations (CVXPY, host) and the U step follow per matrix.
    Each result equals :func:`compress_matrix` of that matrix.

    Args:
      deltas: sequence of (m, n) arrays, or one (B, m, n) array.
      hessians: matching sequence of (n, n) Hessians, one (B, n, n) array, or ``None``.
      config, method: as in :func:`compress_matrix`.
      mesh: a 1-D :class:`jax.sharding.Mesh` (axis name ``"batch"``); default all devices.
      widths: optional per-matrix widths (one (r,) array each, values from ``config.bits``)
        decided elsewhere, e.g. by :func:`allocate_bits_global` over a whole model; the
        per-matrix allocation is then skipped (``"prinmix"`` and ``"uniform"`` only).
      u_rank: the U step of every matrix is padded (inertly) to ``rank_bucket(max(k, u_rank))`` for its
        kept rank k, and its programs compile once per padded rank. Default: the largest rank the
        budget can keep (:func:`max_kept_rank`), or with ``widths`` the largest kept rank among them, so
        that a model's blocks share one set of U programs per shape. It changes no result beyond
        float rounding.
      return_info: return ``(compressed, info)`` pairs.

    Returns:
      A list with one compressed matrix (or pair) per input.
    """
    cfg, pairs = _prepare(deltas, hessians, config, method)
    if not pairs:
        return []
    m, n = pairs[0][0].shape
    budget = cfg.budget_bits(m, n)
    t0 = time.perf_counter()
    infos = [{"method": method, "shape": (m, n), "budget_bits": budget} for _ in pairs]
    if method == "bitdelta":
        out = []
        for (d_np, h_np), info in zip(pairs, infos):
            d = jnp.asarray(d_np)
            cm = SignDelta(signs=jnp.asarray(pack_bits((d_np >= 0).astype(np.uint8), 1)),
                           scale=jnp.mean(jnp.abs(d)).reshape(1).astype(jnp.float32), shape=(m, n))
            out.append(_finish(cm, d, h_np, info, t0, return_info))
        return out
    mesh = _default_mesh(mesh)
    u, sigma, v = _run_sharded(_svd_fn(), mesh, np.stack([p[0] for p in pairs]))
    sig_np = np.asarray(sigma)
    r = sig_np.shape[1]
    if method == "lowrank":
        out = []
        for i, ((d_np, h_np), info) in enumerate(zip(pairs, infos)):
            k = int(min(int((sig_np[i] > 0).sum()), budget // (16 * (m + n))))
            cm = LowRankDelta(us=jnp.asarray((u[i, :, :k] * sigma[i, None, :k]).T, jnp.float16),
                              v=jnp.asarray(v[i, :k], jnp.float16), shape=(m, n))
            out.append(_finish(cm, jnp.asarray(d_np), h_np, info, t0, return_info))
        return out
    h_all = _hessian_stack(pairs, n)
    t = time.perf_counter()
    if widths is not None:
        if method not in ("prinmix", "uniform"):
            raise ValueError(f"given widths only apply to prinmix/uniform, not {method!r}")
        widths = _check_widths(widths, len(pairs), r, cfg.bits) * (sig_np > 0)
    elif method == "deltacome":
        widths = np.stack([_deltacome_widths(s, m, n, budget, cfg) for s in sig_np])
    if u_rank is None:
        if method == "deltacome":
            u_rank = max_kept_rank(m, n, cfg, DELTACOME_BITS)
        elif widths is not None:
            u_rank = int((widths > 0).sum(axis=1).max())
        else:
            u_rank = max_kept_rank(m, n, cfg)
    if widths is not None:
        v_res = _run_sharded(_v_gptq_fn(**_gptq_kw(cfg)), mesh, v, h_all, np.maximum(widths, 1), np.float32(cfg.damp))
        tables = None
    else:
        tables, passes = _allocation_tables(u, sigma, v, h_all, cfg, mesh)
    t_stage1 = (time.perf_counter() - t) / len(pairs)
    costs = index_cost_bits(m, n, cfg.bits, cfg.group_size, scale_bits=cfg.scale_bits)
    out = []
    for i, ((d_np, h_np), info) in enumerate(zip(pairs, infos)):
        t1 = time.perf_counter()
        active = sig_np[i] > 0
        info["seconds_stage1"] = t_stage1
        if tables is None:
            w = widths[i]
            keep = np.nonzero(w > 0)[0]
            v_rows = _take(v_res, i, keep)
            info["v_damp"] = float(np.asarray(v_res.damp)[i])
        else:
            e_i = tables[i]
            w = np.zeros(r, np.int64)
            idx = np.nonzero(active)[0]
            if method == "prinmix":
                if 0 not in cfg.bits and idx.size < r:
                    raise ValueError("the delta has zero singular values but bits has no 0 width to drop them")
                alloc = allocate_bits(e_i[idx], costs, budget, cfg.bits, max_widths=cfg.max_widths,
                                      solver=cfg.solver, time_limit=cfg.time_limit, mip_rel_gap=cfg.ilp_gap)
                w[idx] = alloc.widths
                info.update(allocation_objective=alloc.objective, allocation_seconds=alloc.seconds,
                            solver=alloc.solver)
            else:
                w[idx] = _uniform_widths(e_i[idx], costs, budget, cfg.bits)
            info["error_table_objective"] = float(e_i[np.arange(r), [cfg.bits.index(b) for b in w]].sum())
            info["v_damp"] = float(np.max(np.asarray(passes.damp)[i]))
            keep = np.nonzero(w > 0)[0]
            v_rows = select_rows(jax.tree.map(lambda a: np.asarray(a[i]), passes), cfg.bits, keep, w[keep])
        d = jnp.asarray(d_np)
        h = jnp.asarray(h_all[i])
        cm = _svd_quant(d, h, u[i], sigma[i], w, v_rows, cfg, method,
                        rtc=cfg.rtc and method != "deltacome", info=info, want_error=return_info, u_rank=u_rank)
        info["seconds_stage2"] = time.perf_counter() - t1
        out.append(_finish(cm, d, h_np, info, t0, return_info))
    return out


BATCH_AXIS = "batch"


@functools.lru_cache(maxsize=None)
def _svd_fn():
    return lambda d: jnp.linalg.svd(d, full_matrices=False)


@functools.lru_cache(maxsize=None)
def _error_table_fn(**kw):
    return lambda v, s, h, damp: error_table(v, s, h, damp, **kw)


@functools.lru_cache(maxsize=None)
def _v_gptq_fn(**kw):
    return lambda v, h, bits, damp: gptq_quantize(v, h, bits, damp, scale_axis="row", **kw)


@functools.lru_cache(maxsize=None)
def _compiled(fn, mesh, n_batched):
    sh = NamedSharding(mesh, P(BATCH_AXIS))
    rep = NamedSharding(mesh, P())
    in_axes = (0,) * n_batched + (None,)
    if n_batched == 1:
        return jax.jit(jax.vmap(fn), in_shardings=sh, out_shardings=sh)
    return jax.jit(jax.vmap(fn, in_axes=in_axes), in_shardings=(sh,) * n_batched + (rep,), out_shardings=sh)


def _run_sharded(fn, mesh: Mesh, *args):
    """Runs ``vmap(fn)`` over the leading axis of the array arguments, sharded over ``mesh``.

    All arguments but a trailing scalar are batched. The batch is padded to a multiple of the
    device count with copies of its first element, and the padding is dropped from the result.
    """
    if mesh.axis_names != (BATCH_AXIS,):
        raise ValueError(f"mesh must be 1-D with axis name {BATCH_AXIS!r}, got axes {mesh.axis_names}")
    scalar = args[-1] if np.ndim(args[-1]) == 0 and len(args) > 1 else None
    batched = args[:-1] if scalar is not None else args
    b = batched[0].shape[0]
    pad = (-b) % mesh.size
    if pad:
        batched = [jnp.concatenate([jnp.asarray(a), jnp.repeat(jnp.asarray(a)[:1], pad, axis=0)]) for a in batched]
    sh = NamedSharding(mesh, P(BATCH_AXIS))
    batched = [jax.device_put(a, sh) for a in batched]
    call = _compiled(fn, mesh, len(batched))
    res = call(*batched) if scalar is None else call(*batched, scalar)
    if not pad:
        return res
    # Slicing a sharded array compiles a program per shape; dropping the padding on the host is free.
    return jax.tree.map(lambda x: x[:b], jax.device_get(res))


def _prepare(deltas, hessians, config, method):
    """Validates the arguments shared by :func:`compress_stack` and :func:`error_tables`."""
    cfg = config if config is not None else CompressionConfig()
    if not isinstance(cfg, CompressionConfig):
        raise ValueError(f"config must be a CompressionConfig, got {type(cfg).__name__}")
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    _check_solver(cfg.solver)
    if hessians is not None and len(hessians) != len(deltas):
        raise ValueError(f"got {len(deltas)} deltas but {len(hessians)} hessians")
    pairs = [_validate(d, None if hessians is None else hessians[i]) for i, d in enumerate(deltas)]
    shapes = {p[0].shape for p in pairs}
    if len(shapes) > 1:
        raise ValueError(f"a stack needs same-shape deltas, got shapes {sorted(shapes)}")
    return cfg, pairs


def _default_mesh(mesh):
    return mesh if mesh is not None else Mesh(np.asarray(jax.devices()), (BATCH_AXIS,))


def _hessian_stack(pairs, n):
    """(B, n, n) Hessians; identities for data-free (``None``) entries."""
    if pairs[0][1] is None:
        return jnp.broadcast_to(jnp.eye(n, dtype=jnp.float32), (len(pairs), n, n))
    return np.stack([p[1] for p in pairs])


def _check_widths(widths, b, r, bits):
    w = np.asarray([np.asarray(x) for x in widths], np.int64)
    if w.shape != (b, r):
        raise ValueError(f"widths must be {b} arrays of {r} widths, got shape {w.shape}")
    bad = set(np.unique(w).tolist()) - set(bits)
    if bad:
        raise ValueError(f"widths {sorted(bad)} are not among the candidate bits {bits}")
    return w


def error_tables(deltas, hessians=None, config: CompressionConfig | None = None, *,
                 mesh: Mesh | None = None) -> list[np.ndarray]:
    """Error tables ``e[i, b]`` (method.md §2) of a stack of same-shape deltas, sharded over ``mesh``.

    This is the first pass of a global allocation: the tables of every matrix of a model go to
    :func:`allocate_bits_global`, whose widths then go to :func:`compress_stack`.

    Returns:
      One float64 array (r, len(config.bits)) per delta.
    """
    cfg, pairs = _prepare(deltas, hessians, config, "prinmix")
    if not pairs:
        return []
    mesh = _default_mesh(mesh)
    h_all = _hessian_stack(pairs, pairs[0][0].shape[1])
    u, sigma, v = _run_sharded(_svd_fn(), mesh, np.stack([p[0] for p in pairs]))
    return list(_allocation_tables(u, sigma, v, h_all, cfg, mesh)[0])


def _allocation_tables(u, sigma, v, h_all, cfg, mesh):
    """The tables the allocation sees for a stack: the exact V-step table (method.md §2), plus the U-side
    estimate when ``cfg.u_error``; returns ``(tables float64 (B, r, nw), the V GPTQ passes)``."""
    e, passes = _run_sharded(_error_table_fn(widths=cfg.bits, **_gptq_kw(cfg)), mesh, v, sigma, h_all,
                             np.float32(cfg.damp))
    tables = np.asarray(e, np.float64)
    if cfg.u_error:
        tables = tables + _u_error_tables(u, sigma, v, h_all, cfg)
    return tables, passes


def _u_error_tables(u, sigma, v, h_all, cfg):
    """The U-side estimate (:func:`u_error_estimate`) for a stack of matrices."""
    out = []
    for i in range(len(u)):
        d0 = jnp.asarray(sigma[i]) ** 2 * row_hessian_norms(jnp.asarray(v[i]), jnp.asarray(h_all[i]))
        out.append(u_error_estimate(jnp.asarray(u[i]), d0, widths=cfg.bits, group_size=cfg.group_size,
                                    scale_dtype=cfg.scale_jnp_dtype))
    return np.asarray(out, np.float64)


def _take(res: GPTQResult, i: int, rows) -> GPTQResult:
    """Rows ``rows`` of matrix ``i`` of a stacked result, gathered on the host (numpy)."""
    rows = np.asarray(rows, np.int64)
    return GPTQResult(*(np.asarray(a[i])[rows] for a in res[:4]), np.asarray(res.damp[i]))


def _deltacome_widths(sig, m, n, budget, cfg):
    """Delta-CoMe's widths by σ rank (8 bits ×2, 3 bits ×32, then 2 bits) until the budget is full."""
    cost = dict(zip(DELTACOME_BITS, index_cost_bits(m, n, DELTACOME_BITS, cfg.group_size, scale_bits=cfg.scale_bits)))
    widths = np.zeros(sig.shape[0], np.int64)
    sched = [b for cnt, b in DELTACOME_SCHEDULE for _ in range(cnt)]
    spent = 0
    for i in range(sig.shape[0]):
        b = sched[i] if i < len(sched) else 2
        if sig[i] <= 0 or spent + cost[b] > budget:
            break
        widths[i], spent = b, spent + cost[b]
    return widths


def _uniform_widths(e, costs, budget, bits):
    """One width for the top-k indices: the (width, k) with the least table error under budget."""
    r = e.shape[0]
    best, best_w = None, np.zeros(r, np.int64)
    zero_err = e[:, bits.index(0)] if 0 in bits else None
    for j, b in enumerate(bits):
        if b == 0:
            continue
        k = min(r, budget // int(costs[j]))
        if zero_err is None and k < r:
            continue
        err = e[:k, j].sum() + (zero_err[k:].sum() if zero_err is not None else 0.0)
        if best is None or err < best:
            best, best_w = err, np.where(np.arange(r) < k, b, 0)
    if best is None:
        raise ValueError(f"budget of {budget} bits cannot store every index at any width of {bits}; add 0")
    return best_w


def _finish(cm: CompressedMatrix, d, h_np, info, t0, return_info):
    info["nbytes"] = cm.nbytes
    info["seconds"] = time.perf_counter() - t0
    if not return_info:
        return cm
    if "rel_output_error" not in info:     # the SVD methods record it from their padded factors
        info["rel_output_error"] = output_error(d, reconstruct(cm), h_np)
    return cm, info
