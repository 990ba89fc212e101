"""Steps shared by the SVD-based methods (method.md §1 and §4) and the bookkeeping of every method.

The SVD of a stack, the U step (RTC, GPTQ of U), packing, and the per-matrix loop that ties them
together: a method decides which widths each singular index gets and hands them here. The GPTQ passes of V
(the V step at given widths) are in :mod:`prinmix_jax.methods.v_step`.
"""
from __future__ import annotations

import concurrent.futures
import contextvars
import math
import time

import jax
import jax.numpy as jnp
import numpy as np

from prinmix_jax.config import CompressionConfig
from prinmix_jax.core.gptq import HIGHEST, GPTQResult, gptq_quantize
from prinmix_jax.core.mesh import run_sharded
from prinmix_jax.core.packing import pack_bits
from prinmix_jax.core.quantizer import stored_zero
from prinmix_jax.core.rtc import h_times_vt, refit_sigma, rtc_target, u_hessian, v_target
from prinmix_jax.core.svd import active_svd_reuse, svd_settings, svd_sharded
from prinmix_jax.costs import index_cost_bits
from prinmix_jax.formats import CompressedMatrix, SVDQuantDelta
from prinmix_jax.methods.base import Stack


def gptq_kw(cfg: CompressionConfig) -> dict:
    """The GPTQ settings of a config (static arguments of the jitted GPTQ and error-table programs)."""
    return dict(group_size=cfg.group_size, act_order=cfg.act_order, block_size=cfg.block_size,
                scale_dtype=cfg.scale_jnp_dtype, grid=cfg.quant_grid)


def index_costs(m: int, n: int, cfg: CompressionConfig, bits=None) -> np.ndarray:
    """:func:`~prinmix_jax.costs.index_cost_bits` of an (m, n) matrix under ``cfg`` (default ``cfg.bits``)."""
    return index_cost_bits(m, n, cfg.bits if bits is None else bits, cfg.group_size, scale_bits=cfg.scale_bits,
                           lean=cfg.lean, zero_free_max_bits=cfg.zero_free_max_bits)


def cheapest_index_bits(m: int, n: int, cfg: CompressionConfig, bits=None) -> int:
    """What one kept singular index costs at the smallest nonzero width of ``bits`` (default ``cfg.bits``)."""
    costs = index_costs(m, n, cfg, bits)
    return int(costs[costs > 0].min())


def max_kept_rank(m: int, n: int, cfg: CompressionConfig, bits=None) -> int:
    """The most singular indices an (m, n) matrix can keep within its budget: every kept index costs at
    least its cost at the smallest nonzero width of ``bits`` (default ``cfg.bits``)."""
    bits = cfg.bits if bits is None else bits
    r = min(m, n)
    if 0 not in bits:
        return r
    return int(min(r, cfg.budget_bits(m, n) // cheapest_index_bits(m, n, cfg, bits)))


#: ``"auto"`` takes the Gram SVD (:func:`~prinmix_jax.core.svd.gram_svd`) only where its rank ``k`` is at
#: most this fraction of ``min(m, n)``; near 0.6 a square matrix's one-program Gram SVD costs as much as the
#: full one (docs/benchmarks.md "SVD: full against truncated"; the CPU's stages, whose cost grows more slowly
#: with ``k``, keep the same threshold: not re-measured).
SVD_AUTO_MAX_FRACTION = 0.6


def svd_rank(m: int, n: int, cfg: CompressionConfig, k_max: int) -> int | None:
    """The rank of the truncated SVD of an (m, n) delta whose allocation keeps at most ``k_max`` indices,
    or ``None`` for the full SVD.

    ``k = ceil((1 + cfg.svd_margin) · k_max)`` (the full SVD where that reaches ``min(m, n)``): ``k_max``
    bounds how many indices are kept, not which; with a calibration Hessian the allocation can keep an
    index of smaller σ whose ``σ² V_i H V_iᵀ`` is larger (down to ~1.6 ``k_max`` on the calibrated
    synthetic deltas), and indices beyond ``k`` are dropped; the default margin 0.25 costs at most ~0.1% of
    the table objective there (docs/method.md "Truncated SVD"). ``cfg.svd``: ``"full"`` → ``None``;
    ``"gram"``/``"truncated"`` → ``k`` unless ``k_max`` is every index; ``"auto"`` → ``k`` where ``k`` is
    at most
    :data:`SVD_AUTO_MAX_FRACTION` of ``min(m, n)``.
    """
    r = min(m, n)
    if cfg.svd == "full" or k_max >= r:
        return None
    k = max(1, math.ceil((1 + cfg.svd_margin) * k_max - 1e-9))
    if k >= r or (cfg.svd == "auto" and k > SVD_AUTO_MAX_FRACTION * r):
        return None
    return k


def svd_method(cfg: CompressionConfig) -> str:
    """How a truncated SVD is computed under ``cfg`` (:func:`~prinmix_jax.core.svd.svd_fn`): the range finder
    for ``svd="truncated"``, the Gram SVD otherwise."""
    return "randomized" if cfg.svd == "truncated" else "gram"


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
def _factored_error_terms(d, u_q, sigma, v_q, h, dh=None, hv=None):
    """``_error_terms`` of ``d`` and ``u_q diag(σ) v_q`` (padded indices have zero rows of ``v_q``).

    With ``dh = ΔW H`` (:func:`delta_times_h`, once per matrix) and ``hv = H V̂ᵀ``
    (:func:`~prinmix_jax.core.rtc.h_times_vt`, shared with the U step), no m·n² product is formed here:
    ``E H = ΔW H − Û Σ (H V̂ᵀ)ᵀ`` (H symmetric) costs m·k·n. (The error's own ``E H`` is kept rather than
    expanding ``tr(E H Eᵀ)`` into ``den − 2·cross + quad``, which loses float32 digits by cancellation when
    the error is small.)
    """
    a_l = u_q * sigma[None, :]
    a = jnp.matmul(a_l, v_q, precision=HIGHEST)
    if h is None or dh is None or hv is None:
        return _error_terms(d, a, h)
    e = d - a
    eh = dh - jnp.matmul(a_l, hv.T, precision=HIGHEST)
    return jnp.sum(eh * e), jnp.sum(dh * d)


@jax.jit
def delta_times_h(d, h):
    """``ΔW H`` (m, n) for :func:`_factored_error_terms`: the output error's one m·n² product, formed once
    per matrix (also across refinement rounds)."""
    return jnp.matmul(d, h, precision=HIGHEST)


@jax.jit
def reconstruct(cm: CompressedMatrix):
    """``cm.reconstruct()`` as one compiled program (faster than op-by-op for repeated shapes)."""
    return cm.reconstruct()


def stack_svd(stack: Stack, rank: int | None = None):
    """``(U, σ, V)`` of every delta of the stack (:func:`~prinmix_jax.core.svd.svd_sharded`): the full thin
    SVD (``rank=None``) or the top ``rank`` triplets (:func:`svd_rank`) by :func:`svd_method`.

    Inside :func:`~prinmix_jax.core.svd.reusing_svds` the store gives the SVDs it kept (the same bytes) and
    is offered the ones computed here."""
    kw = svd_kwargs(stack.cfg, rank)
    reuse = active_svd_reuse()
    if reuse is None:
        return svd_sharded(stack.deltas(), stack.mesh, **kw)
    store, keys = reuse
    if len(keys) != len(stack.pairs):
        raise ValueError(f"{len(keys)} SVD reuse keys for a stack of {len(stack.pairs)} matrices")
    tags = [(key, svd_settings(**kw)) for key in keys]

    def compute(d):       # the SVDs prefetch_svds started are taken when the whole stack is asked for
        return svd_sharded(d, stack.mesh, tags=tags if d.shape[0] == len(keys) else None, **kw)
    if store is None:
        return compute(stack.deltas())
    return store.stack_svd(keys, stack.deltas, compute, svd_settings(**kw))


def svd_kwargs(cfg: CompressionConfig, rank: int | None) -> dict:
    """The keyword arguments of :func:`~prinmix_jax.core.svd.svd_sharded` for the SVD of rank ``rank``
    (``None``: full, ``{}``) under ``cfg``."""
    if rank is None:
        return {}
    return dict(rank=rank, method=svd_method(cfg), oversample=oversample_columns(rank, cfg), iters=cfg.svd_iters)


def oversample_columns(rank: int, cfg: CompressionConfig) -> int:
    """The range finder's extra samples for a truncated SVD of rank ``rank``: ``ceil(svd_oversample · rank)``."""
    return int(math.ceil(cfg.svd_oversample * rank - 1e-9))


def stack_energy(stack: Stack, h_all) -> np.ndarray:
    """(B,) float64 ``‖ΔW X‖² / N = tr(ΔW H ΔWᵀ)`` of every matrix (``‖ΔW‖²_F`` data-free): the sum of the
    whole column ``e[:, 0]`` of an error table, also over the indices a truncated SVD leaves out."""
    if stack.pairs[0][1] is None:
        return np.asarray([squared_norm64(p[0]) for p in stack.pairs])
    return np.asarray(run_sharded(_energy, stack.mesh, stack.deltas(), h_all, np.float32(1)), np.float64)


#: :func:`squared_norm64` squares at most this many entries at a time in float64 (128 MB of scratch).
SQUARE_CHUNK = 1 << 24


def squared_norm64(a: np.ndarray) -> float:
    """``Σ a²`` in float64, by chunks of rows of at most :data:`SQUARE_CHUNK` entries: squaring a 128256×4096
    embedding in float64 at once took 4.2 GB of host memory. Up to that size it is one
    ``np.sum(np.square(a, dtype=float64))``, the same number."""
    rows = max(1, SQUARE_CHUNK // max(1, a.shape[-1]))
    return float(sum(np.sum(np.square(a[i:i + rows], dtype=np.float64)) for i in range(0, a.shape[0], rows)))


def _energy(d, h, scale):   # run_sharded batches every argument but a trailing scalar
    return scale * jnp.sum(jnp.matmul(d, h, precision=HIGHEST) * d)


def hessian_stack(stack: Stack):
    """(B, n, n) Hessians, or ``None`` for a data-free stack (the identity: the GPTQ passes of V are then
    round-to-nearest, :func:`~prinmix_jax.core.gptq.gptq_quantize`, and no n×n matrix is stored)."""
    return stack.hessians()


def stack_hessian(h_all, i: int):
    """Matrix ``i``'s Hessian on the device: ``h_all[i]``, or ``None`` (the identity) when ``h_all`` is ``None``.

    The U step's programs take ``None`` as the identity without forming it: a data-free 32000×4096 embedding
    would otherwise spend two m·n² products (~12 s on 2 CPU cores) on its output error alone."""
    return None if h_all is None else jnp.asarray(h_all[i])


def check_widths(widths, b, r, bits):
    """Given widths as a (b, r) int64 array, every value among the candidate ``bits``."""
    w = np.asarray([np.asarray(x) for x in widths], np.int64)
    if w.shape != (b, r):
        raise ValueError(f"widths must be {b} arrays of {r} widths, got shape {w.shape}")
    bad = set(np.unique(w).tolist()) - set(bits)
    if bad:
        raise ValueError(f"widths {sorted(bad)} are not among the candidate bits {bits}")
    return w


def quantize_stack(stack: Stack, u, sigma, h_all, select, *, u_rank: int, rtc: bool, t_stage1: float) -> list:
    """The U step (:func:`svd_quant`) of every matrix of the stack, whose V step ``select`` gives (``u`` may
    be ``None`` with ``rtc``: RTC does not start from the SVD's U)."""
    if u is None and not rtc:
        raise ValueError("the U step without RTC quantises the SVD's U: u is needed")

    def one(i):
        (d_np, h_np), info = stack.pairs[i], stack.infos[i]
        t1 = time.perf_counter()
        info["seconds_stage1"] = t_stage1
        w, v_rows = select(i, info)
        d = jnp.asarray(d_np)
        h = stack_hessian(h_all, i)
        cm = svd_quant(d, h, None if u is None else u[i], sigma[i], w, v_rows, stack.cfg, stack.method, rtc=rtc,
                       info=info, want_error=stack.return_info, u_rank=u_rank)
        info["seconds_stage2"] = time.perf_counter() - t1
        return finish(cm, d, h_np, info, stack)
    return per_matrix_on_devices(one, len(stack.pairs), stack.mesh)


#: Whether :func:`per_matrix_on_devices` spreads a stack's matrices over several *CPU* devices. Off: simulated
#: CPU devices share the host's cores (nothing to gain); tests turn it on.
U_STEPS_ON_CPU = False


def per_matrix_on_devices(fn, count: int, mesh) -> list:
    """``[fn(i) for i in range(count)]``, each call on a device of its own where ``mesh`` has several
    accelerators: matrix ``i``'s U step (RTC, GPTQ of U, the σ refit, the output error) runs in a thread whose
    default device is the mesh's ``i % size``-th, so a stack's U steps run side by side instead of one after
    the other on the first device. Each call computes with the same programs on its own device (the same bytes;
    tests/test_svd_spread.py). On one device, or on CPU devices (:data:`U_STEPS_ON_CPU`), a plain loop."""
    devices = [] if mesh is None else list(mesh.devices.flat)
    if count < 2 or len(devices) < 2 or (devices[0].platform == "cpu" and not U_STEPS_ON_CPU):
        return [fn(i) for i in range(count)]

    def on_device(i):
        with jax.default_device(devices[i % len(devices)]):
            return fn(i)
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(count, len(devices))) as pool:
        futures = [pool.submit(contextvars.copy_context().run, on_device, i) for i in range(count)]
        return [f.result() for f in futures]


def svd_quant(delta, h, u, sigma, widths, v_rows: GPTQResult, cfg, method, rtc, info, want_error, u_rank):
    """Steps 2–4 of method.md §4 (RTC, GPTQ of U, packing) for the kept indices ``widths > 0``.

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
        return pack_svd(delta.shape, [], kw, empty, empty, cfg, method)
    kb = rank_bucket(max(k, u_rank))
    sig_k = np.asarray(sigma)[keep]
    sig_p, v_hat, valid, bits = padded_u_inputs(sig_k, v_rows.q, kw, kb)
    t = time.perf_counter()
    hv = None if h is None else h_times_vt(h, v_hat)      # H V̂ᵀ, formed once for every step below
    if rtc:
        target, damp_used = rtc_target(delta, h, v_hat, sig_p, cfg.rtc_damp, valid, hv=hv)
        info["rtc_damp"] = float(damp_used)
    else:
        target = jax.device_put(np.pad(np.asarray(u)[:, keep], ((0, 0), (0, kb - k))))
    g = u_hessian(v_hat, sig_p, h, valid, hv=hv)
    u_pad = gptq_quantize(target, g, bits, cfg.damp, scale_axis="col", **gptq_kw(cfg))
    refining = rtc and cfg.refine_rounds
    # ΔW H for the output error (refinement scores its rounds by it), once per matrix
    dh = delta_times_h(delta, h) if h is not None and (refining or want_error) else None
    if refining:
        u_pad, v_hat, v_new, hv = refine(delta, h, u_pad, v_hat, sig_p, valid, bits, cfg, info, dh=dh, hv=hv)
        if v_new is not None:
            v_rows = GPTQResult(*(np.asarray(a)[:k] for a in v_new[:4]), np.asarray(v_new.damp))
    if rtc and cfg.refit_sigma:          # the PrinMix family (Delta-CoMe has no RTC and no refit)
        sig_p = refit_sigma(delta, h, u_pad.q, v_hat, sig_p, valid, hv=hv)
        sig_k = np.asarray(sig_p)[:k]
    if want_error:
        num, den = _factored_error_terms(delta, u_pad.q, sig_p, v_hat, h, dh, hv)
        info["rel_output_error"] = float(np.sqrt(num / den)) if float(den) > 0 else 0.0
    u_res = jax.tree.map(np.asarray, u_pad)
    u_res = GPTQResult(u_res.q[:, :k], u_res.codes[:, :k], u_res.scale[:k], u_res.zero[:k], u_res.damp)
    info["u_damp"] = float(u_res.damp)
    info["seconds_u"] = time.perf_counter() - t
    return pack_svd(delta.shape, sig_k, kw, v_rows, u_res, cfg, method)


def refine(delta, h, u_pad: GPTQResult, v_hat, sigma, valid, bits, cfg, info, *, dh=None, hv=None):
    """Alternating refinement (``cfg.refine_rounds`` rounds; project choice): V re-fitted to ``Û Σ``
    (:func:`~prinmix_jax.core.rtc.v_target`) and quantised by GPTQ under ``h`` at the same widths, then RTC
    and GPTQ of U again. Each round is scored by its output error and the best factors are kept (the
    quantised steps make the error non-monotone); ``info["refine_rounds_kept"]`` says which (0: the
    factors given).

    Args:
      delta, h: the matrix and its Hessian (the identity data-free).
      u_pad: GPTQ of U (padded to the rank bucket); v_hat: (kb, n) V̂; sigma, valid, bits: the padded σ,
        mask of real indices and widths (:func:`padded_u_inputs`).
      dh, hv: ``ΔW H`` (:func:`delta_times_h`) and ``H V̂ᵀ`` of the given ``v_hat``
        (:func:`~prinmix_jax.core.rtc.h_times_vt`); ``None`` data-free.

    Returns:
      ``(u_pad, v_hat, v_res, hv)``: the kept U result and V̂, the V GPTQ result of the kept round (padded
      rows included) or ``None`` when no round lowered the error, and the kept V̂'s ``H V̂ᵀ``.
    """
    kw = gptq_kw(cfg)
    best = (float(_factored_error_terms(delta, u_pad.q, sigma, v_hat, h, dh, hv)[0]), u_pad, v_hat, None, hv)
    kept = 0
    for r in range(cfg.refine_rounds):
        v_star, _ = v_target(delta, u_pad.q, sigma, cfg.rtc_damp, valid)
        v_res = gptq_quantize(v_star, h, bits, cfg.damp, scale_axis="row", **kw)
        v_hat = v_res.q
        hv = None if h is None else h_times_vt(h, v_hat)
        target, _ = rtc_target(delta, h, v_hat, sigma, cfg.rtc_damp, valid, hv=hv)
        g = u_hessian(v_hat, sigma, h, valid, hv=hv)
        u_pad = gptq_quantize(target, g, bits, cfg.damp, scale_axis="col", **kw)
        num = float(_factored_error_terms(delta, u_pad.q, sigma, v_hat, h, dh, hv)[0])
        if num < best[0]:
            best, kept = (num, u_pad, v_hat, v_res, hv), r + 1
    info["refine_rounds_kept"] = kept
    return best[1:]


def pack_svd(shape, sigma, widths, v_res: GPTQResult, u_res: GPTQResult, cfg, method) -> SVDQuantDelta:
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
        sig, v_scale, u_scale = sigma[idx].astype(np.float64), vs[idx].astype(sdt), us[idx].astype(sdt)
        if cfg.lean:                  # a single-group factor's scale goes into σ (formats.SVDQuantDelta)
            if v_scale.shape[1] == 1:
                sig, v_scale = sig * v_scale[:, 0].astype(np.float64), np.ones_like(v_scale)
            if u_scale.shape[1] == 1:
                sig, u_scale = sig * u_scale[:, 0].astype(np.float64), np.ones_like(u_scale)
        v_zero, u_zero = stored_zero(vz[idx], b).astype(np.uint8), stored_zero(uz[idx], b).astype(np.uint8)
        symmetric = stored_zero((2 ** b - 1) / 2, b)
        if b <= cfg.zero_free_max_bits and (np.any(v_zero != symmetric) or np.any(u_zero != symmetric)):
            raise AssertionError(f"width {b}: a zero point off the symmetric grid; lean metadata would lose it")
        fields["sigma"].append(sig.astype(np.float32))
        fields["v_codes"].append(pack_bits(vc[idx], b))
        fields["v_scale"].append(v_scale)
        fields["v_zero"].append(v_zero)
        fields["u_codes"].append(pack_bits(uc[idx], b))
        fields["u_scale"].append(u_scale)
        fields["u_zero"].append(u_zero)
    w = np.concatenate(all_w) if all_w else np.zeros(0, np.uint8)
    fields, w = jax.device_put(({k: tuple(v) for k, v in fields.items()}, w))
    return SVDQuantDelta(widths=w, shape=(m, n), group_bits=tuple(group_bits),
                         group_size=cfg.group_size or max(m, n), method=method, lean=cfg.lean,
                         zero_free_max_bits=cfg.zero_free_max_bits, **fields)


def finish(cm: CompressedMatrix, d, h_np, info: dict, stack: Stack):
    """Records the size and time of one result; with ``stack.return_info`` returns ``(cm, info)``."""
    info["nbytes"] = cm.nbytes
    info["seconds"] = time.perf_counter() - stack.t0
    if not stack.return_info:
        return cm
    if "rel_output_error" not in info:     # the SVD methods record it from their padded factors
        info["rel_output_error"] = output_error(d, reconstruct(cm), h_np)
    return cm, info
