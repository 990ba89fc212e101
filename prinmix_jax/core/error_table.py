"""The exact error table ``e[i, b]`` of the V step (method.md §1–2).

    e[i, b] = σ_i² · (V_i − V̂_i^{(b)}) H (V_i − V̂_i^{(b)})ᵀ,    e[i, 0] = σ_i² · V_i H V_iᵀ

GPTQ's error feedback stays inside a row, so one GPTQ pass of all of V per width gives the
error of every row at that width; the passes for the different widths run batched (vmap). The pass itself
gives each row's ``(V_i − V̂_i) H (V_i − V̂_i)ᵀ`` from its per-column errors
(:func:`~prinmix_jax.core.gptq.gptq_quantize_with_error`), so no ``(V − V̂) H`` product is formed.
"""
from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from prinmix_jax.core.gptq import HIGHEST, GPTQResult, gptq_quantize_with_error
from prinmix_jax.core.quantizer import rtn_quantize


def row_hessian_norms(e, h):
    """``diag(E H Eᵀ)`` for a batch of row matrices ``e`` (..., r, n); ``h=None`` is the identity."""
    if h is None:
        return jnp.sum(e * e, axis=-1)
    return jnp.sum(jnp.matmul(e, h, precision=HIGHEST) * e, axis=-1)


@partial(jax.jit, static_argnames=("widths", "group_size", "act_order", "block_size", "scale_dtype", "grid"))
def error_table(v, sigma, h, damp=0.01, factor=None, *, widths: tuple[int, ...], group_size: int | None = 128,
                act_order: bool = True, block_size: int = 128, scale_dtype=None, grid: str = "minmax"):
    """Error table of every singular index at every candidate width.

    Args:
      v: (r, n) right singular vectors (rows).
      sigma: (r,) singular values.
      h: (n, n) input Hessian (the undamped one is used for the errors), or ``None`` for the identity
        (data-free): the passes are then round-to-nearest, which is what GPTQ is under ``H = I``
        (:func:`~prinmix_jax.core.gptq.gptq_quantize`), with no n×n matrix at all.
      damp: GPTQ relative damping.
      factor: GPTQ's set-up under ``h`` (:func:`~prinmix_jax.core.gptq_setup.gptq_factor` with these settings), or
        ``None`` to compute it here (once for all widths); the same bytes either way.
      widths: candidate widths, 0 allowed (static).
      group_size, act_order, block_size, scale_dtype, grid: GPTQ settings of the V side.

    Returns:
      ``(e, passes)``: ``e`` (r, len(widths)) float; ``passes`` a :class:`GPTQResult` whose
      arrays have a leading axis over the nonzero widths (in the order they appear in
      ``widths``), from which the chosen rows of ``V̂`` are taken.
    """
    r = v.shape[0]
    nz = tuple(b for b in widths if b > 0)
    bits = jnp.asarray(nz, jnp.int32)[:, None] * jnp.ones((1, r), jnp.int32)
    # each pass also gives its rows' (V − V̂) H (V − V̂)ᵀ from GPTQ's own errors (gptq_quantize_with_error),
    # without the product (2·r·n² flops per width: more than the pass itself)
    passes, d_nz = jax.vmap(lambda bb: gptq_quantize_with_error(
        v, h, bb, damp, group_size=group_size, act_order=act_order, block_size=block_size,
        scale_dtype=scale_dtype, grid=grid, factor=factor))(bits)                      # d_nz (nnz, r)
    s2 = sigma.astype(v.dtype) ** 2
    d_0 = row_hessian_norms(v, h)                                       # (r,)
    cols = []
    k = 0
    for b in widths:
        if b == 0:
            cols.append(d_0)
        else:
            cols.append(d_nz[k])
            k += 1
    return s2[:, None] * jnp.stack(cols, axis=1), passes


def _pass_rows(widths: tuple[int, ...], rows, chosen):
    """``(pass index, row)`` int64 arrays: row ``rows[j]`` of the pass at width ``chosen[j]`` (the passes run the
    nonzero ``widths`` in order)."""
    pass_of = {b: k for k, b in enumerate(b for b in widths if b > 0)}
    return np.asarray([pass_of[int(b)] for b in chosen], np.int64), np.asarray(rows, np.int64)


def select_rows(passes: GPTQResult, widths: tuple[int, ...], rows, chosen):
    """Gathers row ``rows[j]`` of the pass at width ``chosen[j]`` (all chosen widths nonzero).

    Returns:
      A :class:`GPTQResult` for the selected rows (no leading width axis).
    """
    idx, rows = _pass_rows(widths, rows, chosen)
    return GPTQResult(passes.q[idx, rows], passes.codes[idx, rows], passes.scale[idx, rows],
                      passes.zero[idx, rows], passes.damp[idx] if idx.size else passes.damp[:0])


def select_rows_from_codes(codes, scale, zero, damp, widths: tuple[int, ...], rows, chosen,
                           group_size: int | None):
    """:func:`select_rows` of passes kept without their dequantised values (``q``, 4 bytes an entry, against the
    codes' 1): the selected rows' ``q`` is recomputed as the pass computed it, ``scale · (code − zero)`` by group
    of ``group_size`` columns, the same float32 operations and so the same bytes (tests/test_error_table.py).

    Args:
      codes, scale, zero: (nnz, r, ...) numpy arrays of the passes (:class:`GPTQResult`'s fields).
      damp: (nnz,) the passes' damping.
      widths, rows, chosen: as :func:`select_rows`.
      group_size: the passes' column group size (``None``: one group).

    Returns:
      A :class:`GPTQResult` of numpy arrays for the selected rows.
    """
    idx, rows = _pass_rows(widths, rows, chosen)
    c, s, z = codes[idx, rows], scale[idx, rows], zero[idx, rows]
    n = codes.shape[-1]
    g = n if not group_size or group_size >= n else group_size
    def expand(p):                    # (rows, groups) -> (rows, n)
        return np.repeat(p, g, axis=1)[:, :n]
    q = expand(s) * (c.astype(s.dtype) - expand(z))
    return GPTQResult(q, c, s, z, damp[idx] if idx.size else damp[:0])


#: Entries of U (columns × rows) :func:`u_error_estimate` quantises at a time.
U_ERROR_CHUNK = 1 << 22


@partial(jax.jit, static_argnames=("widths", "group_size", "scale_dtype", "grid"))
def u_error_estimate(u, d0, *, widths: tuple[int, ...], group_size: int | None = 128, scale_dtype=None,
                     grid: str = "minmax"):
    """Estimated U-side error of every index at every width (project choice, not in the paper).

    Quantising ``u_i`` adds ``σ_i² ‖δu_i‖² · V_i H V_iᵀ`` to the output error (cross terms ignored).
    ``‖δu_i‖²`` is estimated by round-to-nearest of the unit-norm column ``u_i`` in the storage
    layout (groups of ``group_size`` rows), an upper bound on what GPTQ and RTC then achieve.
    Added to the exact V-step table, it stops the allocation from starving the U factor of the
    top indices, which the V-only table cannot see.

    Args:
      u: (m, r) left singular vectors (columns).
      d0: (r,) ``e[i, 0] = σ_i² V_i H V_iᵀ``, the error of dropping each index.
      widths: candidate widths (0 contributes nothing).

    Returns:
      (r, len(widths)) array to add to the error table.
    """
    ut = u.T
    r, m = ut.shape
    nz = tuple(b for b in widths if b > 0)

    def chunk_errors(x):              # (c, m) columns of U -> (c, nnz) squared RTN errors, width by width
        return jnp.stack([jnp.sum((x - rtn_quantize(x, jnp.full((x.shape[0],), b, jnp.int32), group_size,
                                                    scale_dtype, grid)[0]) ** 2, axis=1) for b in nz], axis=1)

    # Columns are independent: take them U_ERROR_CHUNK entries at a time (lax.map), so that the scratch of the
    # grids stays a few chunks whatever m (all at once, an embedding's U held ~15x its size: 4 GB).
    # Equal chunks: as few as fit, then as small as they can be (e.g. 1202 columns of 4096 in 2 chunks of 601, not
    # 2 of 1024 with 846 padding columns quantised for nothing)
    nchunks = -(-r // max(1, min(r, U_ERROR_CHUNK // max(m, 1))))
    c = -(-r // nchunks)
    xs = jnp.pad(ut, ((0, nchunks * c - r), (0, 0))).reshape(nchunks, c, m)
    err = jax.lax.map(chunk_errors, xs).reshape(nchunks * c, len(nz))[:r] if nz else jnp.zeros((r, 0), u.dtype)
    cols, k = [], 0
    for b in widths:
        if b == 0:
            cols.append(jnp.zeros((r,), u.dtype))
        else:
            cols.append(err[:, k] * d0)
            k += 1
    return jnp.stack(cols, axis=1)
