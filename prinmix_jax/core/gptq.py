"""GPTQ (Frantar et al. 2022) in pure JAX, with per-row or per-column bit widths.

The column loop is a ``lax.fori_loop`` over blocks of columns with an inner ``lax.fori_loop``
over the columns of a block (lazy batch updates), so compile time does not grow with the
number of columns. Two scale layouts are supported (method.md §3, §5):

* ``scale_axis="row"`` (V side): every row has its own width and one scale/zero per group of
  ``group_size`` consecutive columns. Without act-order the group's scale is fixed when the group
  is reached, from its current (error-updated) values; with act-order the groups are *static*
  (scales computed up front in the original column order), so the stored layout needs no g_idx
  and no permutation.
* ``scale_axis="col"`` (U side): every column has its own width and one scale/zero per group of
  ``group_size`` consecutive rows, fixed when the column is reached. Act-order here permutes the
  columns internally; results are returned in the original order.

Under a Hessian, a pass starts with a set-up that depends on the Hessian alone (the damped Cholesky factor and
the rows of ``R`` the loop reads): :mod:`prinmix_jax.core.gptq_setup`, whose :func:`gptq_factor` computes it
once for many passes (``factor=``).

References:
  Frantar, Ashkboos, Hoefler, Alistarh. "GPTQ: Accurate Post-Training Quantization for
  Generative Pre-trained Transformers", ICLR 2023.
"""
from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from prinmix_jax.core.gptq_setup import (GPTQFactor, column_order, damped_reversed_cholesky, damping_unit,
                                         gptq_factor, inverse_cholesky_upper, loop_layout, loop_segments,
                                         upper_factor_rows)
from prinmix_jax.core.quantizer import expand_groups, grid_params, group_params, quantize, rtn_quantize

__all__ = ["GPTQResult", "GPTQFactor", "gptq_quantize", "gptq_quantize_with_error", "gptq_factor",
           "damped_reversed_cholesky", "upper_factor_rows", "inverse_cholesky_upper", "HIGHEST"]

HIGHEST = lax.Precision.HIGHEST


class GPTQResult(NamedTuple):
    """Output of :func:`gptq_quantize` (all in the original column order).

    Attributes:
      q: dequantised weight, same shape and dtype as the input.
      codes: uint8 codes, same shape as the input.
      scale: row mode ``(rows, ngroups)``; column mode ``(cols, ngroups over rows)``.
      zero: integer-valued zero points, same shape as ``scale``.
      damp: damping actually used, relative to ``mean(diag H)``; larger than the requested
        damping when the Hessian was not positive definite and damping was escalated.
    """
    q: jax.Array
    codes: jax.Array
    scale: jax.Array
    zero: jax.Array
    damp: jax.Array


_STATIC = ("group_size", "act_order", "block_size", "scale_axis", "scale_dtype", "grid")


@partial(jax.jit, static_argnames=_STATIC)
def gptq_quantize(w, h, bits, damp=0.01, *, group_size: int | None = None, act_order: bool = False,
                  block_size: int = 128, scale_axis: str = "row", scale_dtype=None,
                  grid: str = "minmax", factor: GPTQFactor | None = None) -> GPTQResult:
    """Quantises ``w`` (rows, cols) with GPTQ under the input Hessian ``h`` (cols, cols).

    Args:
      w: weight, float32 or float64; the computation runs in this dtype.
      h: Hessian of the layer inputs, ``X Xᵀ / N``; ``None`` stands for the identity (data-free), where
        GPTQ is round-to-nearest (:func:`_identity_gptq`) and is computed as such, without an n×n matrix.
      bits: integer widths 1–8, shape (rows,) for ``scale_axis="row"``, (cols,) for ``"col"``.
      damp: relative damping added to the diagonal after the act-order permutation.
      group_size: columns per scale group (row mode) or rows per scale group (column mode);
        ``None`` or ``>=`` the axis length means one group.
      act_order: process columns by decreasing ``diag(H)``.
      block_size: columns per lazy-batch block (rounded to a multiple of the group in dynamic
        row-group mode, so that a group never straddles a block).
      scale_axis: ``"row"`` or ``"col"``, see the module docstring.
      scale_dtype: dtype the scales are stored in (rounded before use), or ``None``.
      grid: ``"minmax"`` (the reference GPTQ's) or ``"mse"`` (:mod:`prinmix_jax.core.quantizer`); a
        group's grid is chosen from its values when its scale is fixed, as above.
      factor: the set-up under ``h`` (:func:`gptq_factor` with the same settings and ``damp``), or ``None`` to
        compute it here; the same bytes either way.

    Returns:
      A :class:`GPTQResult`.
    """
    if scale_axis not in ("row", "col"):
        raise ValueError(f"scale_axis must be 'row' or 'col', got {scale_axis!r}")
    if h is None:
        return _identity_gptq(w, bits, damp, group_size, scale_axis, scale_dtype, grid)
    return _gptq(w, h, bits, damp, group_size, act_order, block_size, scale_axis, scale_dtype, grid, factor)[0]


@partial(jax.jit, static_argnames=_STATIC[:3] + _STATIC[4:])
def gptq_quantize_with_error(w, h, bits, damp=0.01, *, group_size: int | None = None, act_order: bool = False,
                             block_size: int = 128, scale_dtype=None, grid: str = "minmax",
                             factor: GPTQFactor | None = None):
    """:func:`gptq_quantize` by rows (``scale_axis="row"``), with every row's error ``(w − ŵ) H (w − ŵ)ᵀ``.

    The error comes from GPTQ's own per-column errors, in O(rows · cols): with ``H_d⁻¹ = RᵀR`` (``H_d`` the
    damped Hessian) and ``err_j = (w̃_j − ŵ_j) / R_jj`` the column loop's scaled error, the total change of a row
    is ``w − ŵ = err R`` (entry j is ``Σ_{i≤j} err_i R_ij``: the updates it received plus its own rounding), so
    ``(w − ŵ) H_d (w − ŵ)ᵀ = err R H_d Rᵀ errᵀ = Σ_j err_j²``, whatever the rounding. ``H_d − H`` is diagonal, the
    damping ``λ = d·mean(diag H)`` (``d`` as used) plus 1 on a dead column, so
    ``(w − ŵ) H (w − ŵ)ᵀ = Σ_j err_j² − Σ_j (λ + dead_j) (w − ŵ)_j²``. The error table (method.md §2) takes this
    in place of the product ``(V − V̂) H (V − V̂)ᵀ``, which costs ``2·rows·cols²`` flops per width, more than
    the GPTQ pass itself (tests/test_error_table.py compares the two with a float64 transcription).

    ``factor``: as in :func:`gptq_quantize`.

    Returns:
      ``(GPTQResult, err (rows,))``; under ``h=None`` (the identity), round-to-nearest and ``Σ_j (w − ŵ)_j²``.
    """
    if h is None:
        res = _identity_gptq(w, bits, damp, group_size, "row", scale_dtype, grid)
        e = w - res.q
        return res, jnp.sum(e * e, axis=1)
    return _gptq(w, h, bits, damp, group_size, act_order, block_size, "row", scale_dtype, grid, factor)


def _gptq(w, h, bits, damp, group_size, act_order, block_size, scale_axis, scale_dtype, grid, factor=None):
    """:func:`gptq_quantize` under a Hessian; also, in row mode, every row's ``(w − ŵ) H (w − ŵ)ᵀ``
    (:func:`gptq_quantize_with_error`; ``None`` in column mode). Under jit an unused output costs nothing."""
    # One function on purpose: the lazy-batch loop bodies below (lax.fori_loop) close over the per-call
    # set-up (permutation, damped Cholesky factor, group layout), and the code follows the reference GPTQ line by
    # line so that tests/gptq_reference.py can be compared with it code for code.
    rows, cols = w.shape
    dt = w.dtype
    row_mode = scale_axis == "row"
    hd, dead, perm = column_order(h, dt, act_order)     # diag((H + Hᵀ)/2), dead columns' set to 1; the order
    w = jnp.where(dead[None, :], 0, w)
    w_in = w
    maxq = (2 ** jnp.asarray(bits, jnp.int32) - 1).astype(dt)

    g, static, bsz = loop_layout(rows, cols, group_size, act_order, block_size, row_mode)
    if static:
        s_static, z_static = group_params(w, maxq, g, scale_dtype, grid)          # original column order

    w = w[:, perm]
    if not row_mode:
        maxq = maxq[perm]
    nblocks = -(-cols // bsz)
    cp = nblocks * bsz
    if factor is None:
        # The factor of the reversed, permuted, damped Hessian, the one n×n buffer the column loop holds (two
        # while it is factorised). The rows of R are solved for a block at a time in the loop
        # (upper_factor_rows), never R or L⁻¹ whole.
        low, damp_used = damped_reversed_cholesky(h, damp, perm if act_order else None, dead, dt)
    else:                      # the set-up done once for every pass under h (gptq_factor): the rows of R as given
        if factor.r.shape != (cp, cp) or factor.r.dtype != dt:
            raise ValueError(f"factor of shape {factor.r.shape} {factor.r.dtype} does not fit this pass, whose "
                             f"loop reads ({cp}, {cp}) {dt}: make it with gptq_factor and the pass's settings")
        low, damp_used = None, factor.damp
    pad = cp - cols
    w = jnp.pad(w, ((0, 0), (0, pad)))
    col_idx = jnp.arange(cp)

    if row_mode and static:
        s_cols = jnp.pad(expand_groups(s_static, cols, g)[:, perm], ((0, 0), (0, pad)), constant_values=1)
        z_cols = jnp.pad(expand_groups(z_static, cols, g)[:, perm], ((0, 0), (0, pad)))
        pstore = (jnp.zeros((0,), dt), jnp.zeros((0,), dt))
    elif row_mode:
        ngp = cp // g
        pstore = (jnp.ones((rows, ngp), dt), jnp.zeros((rows, ngp), dt))
    else:
        ngr = -(-rows // g)
        maxq = jnp.pad(maxq, (0, pad), constant_values=1)
        pstore = (jnp.ones((cp, ngr), dt), jnp.zeros((cp, ngr), dt))

    def quant_col(x, j, w1, jl, cur, store):
        """Quantises column x (rows,) at global processed position j."""
        if row_mode and static:
            sc = lax.dynamic_index_in_dim(s_cols, j, 1, keepdims=False)
            zc = lax.dynamic_index_in_dim(z_cols, j, 1, keepdims=False)
            q, deq = quantize(x, sc, zc, maxq)
            return q, deq, cur, store
        if row_mode:           # the group's grid, fixed where the group starts (group_step)
            q, deq = quantize(x, cur[0], cur[1], maxq)
            return q, deq, cur, store
        xg = jnp.pad(x, (0, ngr * g - rows)).reshape(ngr, g)
        mq = maxq[j]
        sc, zc = grid_params(xg, mq, scale_dtype, jnp.minimum(g, rows - g * jnp.arange(ngr)), grid)
        store = tuple(lax.dynamic_update_index_in_dim(a, p, j, 0) for a, p in zip(store, (sc, zc)))
        sc_r, zc_r = expand_groups(sc, rows, g), expand_groups(zc, rows, g)
        q, deq = quantize(x, sc_r, zc_r, mq)
        return q, deq, cur, store

    def block_step(bi, state, low_s, start):
        w, qout, cout, cur, store, loss = state
        i1 = bi * bsz
        w1 = lax.dynamic_slice_in_dim(w, i1, bsz, axis=1)
        if factor is None:
            r_blk = upper_factor_rows(low_s, i1, bsz, cp, start)              # R[i1:i1+bsz, start:] (bsz, cp-start)
        else:
            r_blk = lax.dynamic_slice_in_dim(factor.r, i1, bsz, axis=0)[:, start:]
        r_in = lax.dynamic_slice_in_dim(r_blk, i1 - start, bsz, axis=1)       # (bsz, bsz)

        def col_step(jl, st):
            w1, q1, c1, e1, cur, store = st
            j = i1 + jl
            x = lax.dynamic_index_in_dim(w1, jl, 1, keepdims=False)
            q, deq, cur, store = quant_col(x, j, w1, jl, cur, store)
            err = (x - deq) / r_in[jl, jl]
            w1 = w1 - err[:, None] * r_in[jl][None, :]
            q1 = lax.dynamic_update_index_in_dim(q1, deq, jl, 1)
            c1 = lax.dynamic_update_index_in_dim(c1, q.astype(jnp.uint8), jl, 1)
            e1 = lax.dynamic_update_index_in_dim(e1, err, jl, 1)
            return w1, q1, c1, e1, cur, store

        def group_step(gi, st):
            """Row-mode groups fixed as they are reached: the group's grid from its columns as updated so far,
            then its g columns (a block is a whole number of groups, loop_layout). A loop over groups, not a
            ``lax.cond`` per column: on a GPU a conditional reads its predicate back to the host."""
            w1, q1, c1, e1, cur, store = st
            jl0 = gi * g
            blk = lax.dynamic_slice_in_dim(w1, jl0, g, axis=1)
            cur = grid_params(blk, maxq, scale_dtype, jnp.minimum(g, cols - i1 - jl0), grid)  # last may be short
            store = tuple(lax.dynamic_update_index_in_dim(a, p, (i1 + jl0) // g, 1) for a, p in zip(store, cur))
            return lax.fori_loop(jl0, jl0 + g, col_step, (w1, q1, c1, e1, cur, store))

        z = jnp.zeros((rows, bsz), dt)
        init = (w1, z, jnp.zeros((rows, bsz), jnp.uint8), z, cur, store)
        if row_mode and not static:
            _, q1, c1, e1, cur, store = lax.fori_loop(0, bsz // g, group_step, init)
        else:
            _, q1, c1, e1, cur, store = lax.fori_loop(0, bsz, col_step, init)
        later = (col_idx[start:] >= i1 + bsz).astype(dt)
        w = w.at[:, start:].add(-jnp.matmul(e1, r_blk * later[None, :], precision=HIGHEST))   # a − b as a + (−b)
        qout = lax.dynamic_update_slice_in_dim(qout, q1, i1, axis=1)
        cout = lax.dynamic_update_slice_in_dim(cout, c1, i1, axis=1)
        real = (i1 + jnp.arange(bsz) < cols).astype(dt)                      # not the padding columns
        loss = loss + jnp.sum(e1 * e1 * real[None, :], axis=1)               # Σ_j err_j², by row
        return w, qout, cout, cur, store, loss

    cur0 = (jnp.ones((rows,), dt), jnp.zeros((rows,), dt))
    state = (w, jnp.zeros((rows, cp), dt), jnp.zeros((rows, cp), jnp.uint8), cur0, pstore, jnp.zeros((rows,), dt))
    n = cols
    for b0, b1 in loop_segments(nblocks):                # each later segment solves against a smaller triangle of L
        start = b0 * bsz
        low_s = low if (low is None or start == 0) else low[: n - start, : n - start]
        state = lax.fori_loop(b0, b1, partial(block_step, low_s=low_s, start=start), state)
    _, qout, cout, _, store, loss = state

    inv = jnp.argsort(perm)
    q = qout[:, :cols][:, inv]
    codes = cout[:, :cols][:, inv]
    if row_mode and static:
        scale, zero = s_static, z_static
    elif row_mode:
        scale, zero = (a[:, : -(-cols // g)] for a in store)
    else:
        scale, zero = (a[:cols][inv] for a in store)
    res = GPTQResult(q, codes, scale, zero, damp_used)
    if not row_mode:
        return res, None
    # (w − ŵ) H_d (w − ŵ)ᵀ = Σ err² (gptq_quantize_with_error); H_d − H is diagonal: λ + dead
    e = w_in - q
    lam = damp_used * damping_unit(hd[perm])                         # as damped_reversed_cholesky damps
    return res, loss - jnp.sum(e * e * (lam + dead.astype(dt))[None, :], axis=1)


def _identity_gptq(w, bits, damp, group_size, scale_axis, scale_dtype, grid) -> GPTQResult:
    """:func:`gptq_quantize` under the identity Hessian, as round-to-nearest (the same bytes, tested).

    With ``H = I`` the damped inverse's Cholesky factor is diagonal, so GPTQ's error feedback
    ``err · R[j, later]`` is exactly zero: every column is rounded as it was, act-order keeps the column
    order (equal diagonal, stable sort), and a group's scale fixed "when reached" is the one of its original
    values. What is left is :func:`~prinmix_jax.core.quantizer.rtn_quantize` on the same grids, in
    ``O(rows · cols)`` and without the ``n × n`` set-up (which at ``n = 11008`` holds ~3 GB of scratch).
    """
    x = w if scale_axis == "row" else w.T
    deq, codes, scale, zero = rtn_quantize(x, bits, None if group_size is None or group_size <= 0 else group_size,
                                           scale_dtype, grid)
    if scale_axis == "col":
        deq, codes = deq.T, codes.T
    return GPTQResult(deq, codes, scale, zero, jnp.asarray(damp, w.dtype))
