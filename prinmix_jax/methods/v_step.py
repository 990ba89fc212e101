"""The GPTQ passes of V for a stack of matrices: the rows of V over the mesh (the error tables' passes, the V
step at widths already decided), and the global scope's reuse of the first pass's error-table passes in its
second pass's V step (kept on disk by :class:`~prinmix_jax.svd_store.SVDStore`)."""
from __future__ import annotations

import functools
import zlib

import numpy as np

from prinmix_jax.config import CompressionConfig
from prinmix_jax.core.error_table import select_rows_from_codes
from prinmix_jax.core.factors import factor_settings, stack_factors
from prinmix_jax.core.gptq import GPTQFactor, GPTQResult, gptq_quantize
from prinmix_jax.core.mesh import run_stack_rows
from prinmix_jax.core.svd import active_svd_reuse
from prinmix_jax.methods.base import Stack
from prinmix_jax.methods.shared import gptq_kw


def stack_rows(fn, fn_identity, mesh, rows, h_all, damp, *, out_rows, settings: dict):
    """:func:`~prinmix_jax.core.mesh.run_stack_rows` of a GPTQ pass over V's rows: ``fn(*rows, h, r, d, damp)``
    under each matrix's Hessian ``h`` and GPTQ set-up ``GPTQFactor(r, d)``, or ``fn_identity(*rows, damp)``
    for a data-free stack (``h_all`` ``None``), where nothing n×n goes to the devices.

    The set-up is computed once per distinct Hessian of the stack (:func:`~prinmix_jax.core.factors.stack_factors`,
    or taken from a window's :func:`~prinmix_jax.core.factors.prefetch_factors`), not in every pass: q, k and v
    share one, and so do the row tiles of a stack spread over the devices. ``settings``: the passes' GPTQ
    settings (:func:`~prinmix_jax.methods.shared.gptq_kw`)."""
    damp = np.float32(damp)
    if h_all is None:
        return run_stack_rows(fn_identity, mesh, rows, (), damp, out_rows=out_rows)
    r, d = stack_factors(h_all, factor_settings(damp, **settings), mesh)
    return run_stack_rows(fn, mesh, rows, (h_all, r, d), damp, out_rows=out_rows)


@functools.cache
def _v_rows_fn(**kw):
    """GPTQ of V's rows at per-row widths, in :func:`~prinmix_jax.core.mesh.run_stack_rows`' argument order
    (rows, then the shared Hessian and set-up, then the damping); long-lived, as its compiled program is cached by it."""
    return lambda v, bits, h, r, d, damp: gptq_quantize(v, h, bits, damp, scale_axis="row", factor=GPTQFactor(r, d),
                                                        **kw)


@functools.cache
def _v_rows_identity_fn(**kw):
    """:func:`_v_rows_fn` under the identity Hessian (data-free): round-to-nearest, nothing n×n."""
    return lambda v, bits, damp: gptq_quantize(v, None, bits, damp, scale_axis="row", **kw)


#: The row axes of GPTQ of V's outputs (q, codes, scale, zero by row; the damping per Hessian).
V_ROWS = GPTQResult(0, 0, 0, 0, None)


def fixed_width_rows(stack: Stack, v, h_all, widths):
    """The V step at widths already decided, (B, r): one GPTQ pass per matrix, its rows spread over the mesh
    (:func:`~prinmix_jax.core.mesh.run_stack_rows`; the same bytes on any device count). A dropped index
    (width 0) is quantised at 1 bit and never used. In the global scope's second pass, the rows come from the
    error tables' passes where the first pass kept them (:func:`kept_v_passes`): GPTQ's error feedback stays in a
    row, so a row's pass at its width is the same bytes as this pass's row.

    Returns:
      ``select(i, info) -> (widths (r,), V̂ rows of the kept indices)`` for :func:`quantize_stack`.
    """
    kept = kept_v_passes(v, h_all, stack.cfg)
    if kept is not None:
        def select_kept(i, info):
            w = widths[i]
            keep = np.nonzero(w > 0)[0]
            codes, scale, zero, damp = kept[i]
            info["v_damp"] = float(np.max(damp))
            return w, select_rows_from_codes(codes, scale, zero, damp, stack.cfg.bits, keep, w[keep],
                                             stack.cfg.group_size)
        return select_kept
    kw = gptq_kw(stack.cfg)
    v_res = stack_rows(_v_rows_fn(**kw), _v_rows_identity_fn(**kw), stack.mesh,
                       (v, np.maximum(widths, 1).astype(np.int32)), h_all, stack.cfg.damp, out_rows=V_ROWS,
                       settings=kw)

    def select(i, info):
        w = widths[i]
        keep = np.nonzero(w > 0)[0]
        info["v_damp"] = float(np.asarray(v_res.damp)[i])
        return w, _take(v_res, i, keep)
    return select


def _digest(a) -> int:
    return zlib.crc32(np.ascontiguousarray(np.asarray(a)).data)


def v_pass_tags(v, h_all, cfg: CompressionConfig) -> list[str]:
    """One tag per matrix of a stack naming what its GPTQ passes of V depend on: the GPTQ settings, widths and
    damping, and CRC-32 digests of its V rows and Hessian. The global scope's second pass reuses the first's
    passes (:func:`offer_v_passes`, :func:`kept_v_passes`) only under equal tags, i.e. from the same bytes."""
    settings = zlib.crc32(repr((sorted(gptq_kw(cfg).items()), cfg.bits, float(cfg.damp))).encode())
    return [f"{settings:08x}-{_digest(v[i]):08x}-{_digest(h_all[i]):08x}" for i in range(len(v))]


def offer_v_passes(v, h_all, passes, seconds: float, cfg: CompressionConfig) -> None:
    """Inside :func:`~prinmix_jax.core.svd.reusing_svds` (the global scope's first pass), offers a calibrated
    stack's error-table passes to the store for the second pass's V step (:func:`fixed_width_rows`);
    ``seconds``: what that V step would take. Data-free passes (round-to-nearest) are not worth keeping."""
    reuse = active_svd_reuse()
    if reuse is None or h_all is None or not hasattr(reuse[0], "keep_passes"):
        return
    store, keys = reuse
    store.keep_passes(keys, v_pass_tags(v, h_all, cfg), passes, seconds)


def kept_v_passes(v, h_all, cfg: CompressionConfig):
    """``[(codes, scale, zero, damp)]`` of a stack's V passes kept by :func:`offer_v_passes`, or ``None``."""
    reuse = active_svd_reuse()
    if reuse is None or h_all is None or not hasattr(reuse[0], "passes"):
        return None
    store, keys = reuse
    return store.passes(keys, v_pass_tags(v, h_all, cfg))


def _take(res: GPTQResult, i: int, rows) -> GPTQResult:
    """Rows ``rows`` of matrix ``i`` of a stacked result, gathered on the host (numpy)."""
    rows = np.asarray(rows, np.int64)
    return GPTQResult(*(np.asarray(a[i])[rows] for a in res[:4]), np.asarray(res.damp[i]))
