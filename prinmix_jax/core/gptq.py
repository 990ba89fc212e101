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

Memory of the set-up under a Hessian (an n×n float32 buffer is 485 MB at n = 11008): beyond the input ``h``,
the column loop holds one n×n buffer, the Cholesky factor ``L`` of the reversed, permuted, damped Hessian,
built from ``h`` in one pass (:func:`damped_reversed_cholesky`; two n×n buffers while it is factorised).
The upper factor ``R`` of ``H⁻¹`` that the column loop reads is never formed: each block's rows of ``R`` are
one triangular solve against ``L`` (:func:`upper_factor_rows`); from 16 blocks on, the loop runs in four
segments, each solving against a smaller leading triangle of ``L`` (:func:`_segments`).
tests/test_gptq_memory.py checks this from XLA's memory analysis.

The set-up depends on the Hessian alone, so it is also a program of its own (:func:`gptq_factor`: the factor and
every row of ``R``, one n×n buffer), whose result passes under the same Hessian take (``factor=``, the same
bytes): the error table's widths, q, k and v, and the row tiles of a stack on several devices then share one
(:mod:`prinmix_jax.core.factors`).

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

from prinmix_jax.core.quantizer import expand_groups, grid_params, group_params, quantize, rtn_quantize

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


def _permuted_hessian(h, order, diag, dtype):
    """``H_s[order][:, order]`` in ``dtype``, ``H_s = (H + Hᵀ)/2``, with the diagonal ``diag`` (in ``order``).

    The off-diagonal entries are one elementwise expression of gathered entries of ``h``, which XLA computes
    in one pass (a fusion) into the buffer the factorisation then overwrites, and the diagonal is written into
    it (a scatter of n entries, no n×n mask): no symmetrised, permuted or reversed n×n copy. (The order
    reversal too is a gather: written as ``h[::-1, ::-1]``, XLA relaid ``h`` out column-major first, a copy.)
    """
    hp = h[order][:, order].astype(dtype)
    i = jnp.arange(h.shape[0])
    return ((hp + hp.T) / 2).at[i, i].set(diag)


def _damping_unit(hd):
    """``mean(diag H)`` (summed in the order of ``hd``), the unit of the relative damping; 1 when it is not a
    positive finite number."""
    md = jnp.mean(hd)
    return jnp.where(jnp.isfinite(md) & (md > 0), md, jnp.ones_like(md))


def damped_reversed_cholesky(h, damp, perm=None, dead=None, dtype=None, max_tries: int = 12):
    """Lower Cholesky factor ``L`` of ``J (H + d·mean(diag H)·I) J``, ``J`` the order reversal, with the damping.

    ``H`` here is the symmetrised Hessian with its dead columns' diagonal set to 1, in the order ``perm``;
    ``perm=None`` is the identity, ``dead=None`` no dead columns; entry by entry the reference's
    ``H = (H + Hᵀ)/2; H[dead, dead] = 1; H = H[perm][:, perm]; H += d·mean(diag H)·I``.

    Memory: ``L`` is the one n×n buffer that outlives this function. Every attempt rebuilds ``J H J`` from the
    input ``h`` in one fused pass (:func:`_permuted_hessian`) into the buffer the factorisation overwrites,
    rather than holding a damped copy across the attempts (an optimisation barrier keeps XLA from hoisting
    the rebuild out of the loop as loop-invariant, which would make it that copy). While an attempt runs, two
    n×n buffers are live: on CPU, ``lax.linalg.cholesky`` calls LAPACK's ``potrf`` on a column-major operand
    and then replaces a failed factor by NaNs elementwise, and XLA's CPU backend gives elementwise operands
    the row-major layout, so the factor is copied out once, relaid out, into the loop's buffer (a lowering
    detail out of reach here without calling LAPACK directly). The strict upper triangle of ``L`` is left as
    the factorisation leaves it (``cholesky_p``, not ``lax.linalg.cholesky``, whose ``tril`` is one more n×n
    pass and mask): its readers (the triangular solves of :func:`upper_factor_rows`) read the lower
    triangle only.

    If the damped matrix is not positive definite (NaNs from the factorisation; a non-finite entry of ``L``
    makes every later diagonal entry non-finite, so checking the diagonal checks the factor), the damping is
    escalated deterministically, ``d ← max(10·d, 1e-6)``, up to ``max_tries`` times.

    Returns:
      ``(L, d_used)``; :func:`upper_factor_rows` reads the rows of GPTQ's upper factor ``R`` from ``L``.
    """
    dt = h.dtype if dtype is None else dtype
    hd = jnp.diag(h).astype(dt)                                       # diag(H_s) = diag(H)
    if dead is not None:
        hd = hd + dead.astype(dt)
    hd = hd if perm is None else hd[perm]
    md = _damping_unit(hd)
    rev = (jnp.arange(h.shape[0]) if perm is None else perm)[::-1]

    def attempt(d, hh):   # symmetric by construction: the factorisation reads its lower triangle only
        low = lax.linalg.cholesky_p.bind(_permuted_hessian(hh, rev, hd[::-1] + d * md, dt))
        return low, jnp.all(jnp.isfinite(jnp.diagonal(low)))

    def body(state):
        t, d, _, _ = state
        d = jnp.maximum(d * 10, 1e-6)
        hh, d = lax.optimization_barrier((h, d))                     # the rebuild depends on the loop: not hoisted
        return t + 1, d, *attempt(d, hh)

    d0 = jnp.asarray(damp, dt)
    state = (jnp.int32(0), d0, *attempt(d0, h))
    _, d, low, _ = lax.while_loop(lambda s: (s[0] < max_tries) & ~s[3], body, state)
    return low, d


def upper_factor_rows(low, i1, nrows: int, width: int, start: int = 0):
    """Rows ``i1 … i1+nrows-1`` of GPTQ's upper factor ``R = J L⁻¹ J``, columns ``start … width-1``: shape
    ``(nrows, width - start)``, for ``i1 >= start``.

    With ``J H J = L Lᵀ`` (:func:`damped_reversed_cholesky`), ``H^{-1} = J L^{-T} L^{-1} J = RᵀR`` for
    ``R = J L^{-1} J``, which is upper triangular with a positive diagonal, hence *the* Cholesky factor the
    reference GPTQ computes as ``cholesky(inv(H))ᵀ``, without forming ``H^{-1}``. Row ``i`` of ``R`` is row
    ``n-1-i`` of ``L⁻¹`` reversed, so the rows of a block are one triangular solve ``X L = E`` for the
    matching rows ``E`` of the identity: ``O(n · nrows)`` memory (never ``L⁻¹`` or the identity as n×n
    arrays). Rows ``i >= start`` of ``R`` are zero left of column ``start`` and need only the leading
    ``(n - start)`` triangle of ``L`` (the leading block of a triangular matrix's inverse is the inverse of its
    leading block): ``low`` is that triangle, ``n = start + low.shape[0]``, and the solve costs
    ``(n - start)² · nrows`` flops (:func:`_segments`). The solve is written as ``X (Lᵀ)ᵀ = E`` on ``Lᵀ``: ``L``
    is row-major, i.e. ``Lᵀ`` column-major, the layout LAPACK's ``trsm`` takes, so XLA passes ``L``'s buffer as
    it is instead of relaying it out (an n×n copy). ``R`` is taken as padded with the identity beyond ``n``
    (rows and columns up to ``width >= n``), so that a last partial block of GPTQ's column loop needs no
    special case. Equal to the rows of the full inverse to float rounding (tests/test_gptq_memory.py compares
    them with the reference in float64).
    """
    t = low.shape[0]
    n = start + t
    dt = low.dtype
    k = jnp.arange(nrows)
    first = n - i1 - nrows                                            # L⁻¹ rows first … first+nrows-1 (< 0: padding)
    e = (jnp.arange(t)[None, :] == (first + k)[:, None]).astype(dt)
    x = lax.linalg.triangular_solve(low.T, e, left_side=False, lower=False, transpose_a=True)
    r = jnp.pad(x[::-1, ::-1], ((0, 0), (0, width - n)))
    rows = i1 + k
    cols = start + jnp.arange(width - start)
    return r + ((cols[None, :] == rows[:, None]) & (rows >= n)[:, None]).astype(dt)


def _segments(nblocks: int) -> list[tuple[int, int]]:
    """GPTQ's column loop over ``nblocks`` blocks as static segments ``[b0, b1)``, each its own ``fori_loop``
    against the leading ``(n - b0·block)`` triangle of ``L`` (:func:`upper_factor_rows`).

    A block's rows of ``R`` then cost ``(n - b0·block)²`` rather than ``n²`` per row to solve, and its trailing
    update skips the columns left of the segment: with four segments the solves cost ~0.47 and the updates
    ~0.63 of one loop's. Measured on 2 CPU cores, the same codes: a 1200×4096 pass 2.04 → 1.65 s, its 5-width
    error table ~5.9 → ~5.1 s, the 1400×11008 error table of a Llama-2-7B ``down_proj`` 45.4 → 32.9 s. Each
    segment is one more copy of the loop body to compile (+0.5–0.7 s per program there), so a loop of fewer
    than 16 blocks (n ≤ 1920 at the default block of 128) stays one loop.
    """
    nseg = 4 if nblocks >= 16 else 1
    bounds = [nblocks * s // nseg for s in range(nseg + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def inverse_cholesky_upper(h, damp, max_tries: int = 12):
    """Upper Cholesky factor ``R`` of ``(H + d·mean(diag H)·I)^{-1}`` (so that ``H^{-1} = RᵀR``), as an n×n array.

    ``h`` symmetric. :func:`gptq_quantize` does not call this: it reads ``R`` a block of rows at a time
    (:func:`upper_factor_rows`) and never holds it whole; this is the same computation in one piece.

    Returns:
      ``(R, d_used)``.
    """
    n = h.shape[0]
    low, d = damped_reversed_cholesky(h, damp, max_tries=max_tries)
    return upper_factor_rows(low, 0, n, n), d


_STATIC = ("group_size", "act_order", "block_size", "scale_axis", "scale_dtype", "grid")


class GPTQFactor(NamedTuple):
    """GPTQ's set-up under one Hessian (:func:`gptq_factor`), which a pass given it (``factor=``) skips.

    Attributes:
      r: (cp, cp) the rows of GPTQ's upper factor ``R`` in the column loop's order (act-order permuted), padded
        with the identity to whole blocks (``cp`` = the columns rounded up to the loop's block), row block by
        row block as the loop solves them: the same bytes.
      damp: the damping used, relative to ``mean(diag H)`` (escalated where ``H`` was not positive definite).
    """
    r: jax.Array
    damp: jax.Array


def _loop_layout(rows: int, cols: int, group_size, act_order: bool, block_size: int, row_mode: bool):
    """``(g, static, bsz)`` of GPTQ's column loop: the scale group along its axis, whether row-mode groups are
    fixed up front (act-order or one group), and the columns per lazy-batch block (a whole number of groups
    when row-mode groups are fixed as they are reached, so that a group never straddles a block)."""
    axis_len = cols if row_mode else rows
    g = axis_len if (group_size is None or group_size <= 0 or group_size >= axis_len) else group_size
    static = row_mode and (act_order or g == cols)
    bsz = g * max(1, block_size // g) if (row_mode and not static) else max(1, min(block_size, cols))
    return g, static, bsz


def _factor_rows(low, nblocks: int, bsz: int, dt):
    """:class:`GPTQFactor`'s ``r`` from ``L``: block by block and segment by segment as the column loop solves
    them (:func:`upper_factor_rows`, :func:`_segments`), into one (cp, cp) buffer."""
    n, cp = low.shape[0], nblocks * bsz
    out = jnp.zeros((cp, cp), dt)
    for b0, b1 in _segments(nblocks):
        start = b0 * bsz
        low_s = low if start == 0 else low[: n - start, : n - start]

        def body(bi, out, low_s=low_s, start=start):
            return lax.dynamic_update_slice(out, upper_factor_rows(low_s, bi * bsz, bsz, cp, start),
                                            (bi * bsz, start))
        out = lax.fori_loop(b0, b1, body, out)
    return out


@partial(jax.jit, static_argnames=("group_size", "act_order", "block_size", "scale_axis", "rows", "dtype"))
def gptq_factor(h, damp=0.01, *, group_size: int | None = None, act_order: bool = False, block_size: int = 128,
                scale_axis: str = "row", rows: int = 1, dtype=None) -> GPTQFactor:
    """GPTQ's set-up under the Hessian ``h`` (n, n): the damped Cholesky factor and every row of the upper factor
    ``R`` the column loop reads, as one program, for :func:`gptq_quantize` / :func:`gptq_quantize_with_error`
    ``(…, factor=)`` passes of any rows under ``h`` with these settings (the same bytes as without).

    The set-up depends on ``h`` only, so the passes of many row sets under one Hessian (the rows of V tiled over
    the devices, the matrices of a stack that share their inputs, q, k and v) can share it: computed in every
    pass, at n = 4096 with 150 rows a tile it is ~60% of the pass (docs/benchmarks.md).

    Args:
      h: (n, n) Hessian.
      damp: relative damping (escalated as in :func:`damped_reversed_cholesky`).
      group_size, act_order, block_size, scale_axis: the passes' settings (they fix the column order and blocks).
      rows: the passes' row count (``scale_axis="col"`` only: its groups run along the rows).
      dtype: the passes' dtype (default ``h``'s).

    Returns:
      A :class:`GPTQFactor`; it holds one (cp, cp) buffer, ``cp`` the columns rounded up to a whole block.
    """
    if scale_axis not in ("row", "col"):
        raise ValueError(f"scale_axis must be 'row' or 'col', got {scale_axis!r}")
    cols = h.shape[0]
    dt = h.dtype if dtype is None else dtype
    _, _, bsz = _loop_layout(rows, cols, group_size, act_order, block_size, scale_axis == "row")
    hd = jnp.diag(h).astype(dt)
    dead = hd == 0
    perm = jnp.argsort(-(hd + dead.astype(dt)), stable=True) if act_order else None
    low, d = damped_reversed_cholesky(h, damp, perm, dead, dt)
    return GPTQFactor(_factor_rows(low, -(-cols // bsz), bsz, dt), d)



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
    hd = jnp.diag(h).astype(dt)                          # diag((H + Hᵀ)/2)
    dead = hd == 0
    hd = hd + dead.astype(dt)
    w = jnp.where(dead[None, :], 0, w)
    w_in = w
    maxq = (2 ** jnp.asarray(bits, jnp.int32) - 1).astype(dt)

    g, static, bsz = _loop_layout(rows, cols, group_size, act_order, block_size, row_mode)
    if static:
        s_static, z_static = group_params(w, maxq, g, scale_dtype, grid)          # original column order

    perm = jnp.argsort(-hd, stable=True) if act_order else jnp.arange(cols)
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
        if row_mode:
            def fresh(_):
                blk = lax.dynamic_slice_in_dim(w1, jl, g, axis=1)
                return grid_params(blk, maxq, scale_dtype, jnp.minimum(g, cols - j), grid)   # last group may be short
            cur = lax.cond(j % g == 0, fresh, lambda _: cur, None)
            store = tuple(lax.dynamic_update_index_in_dim(a, p, j // g, 1) for a, p in zip(store, cur))
            q, deq = quantize(x, cur[0], cur[1], maxq)
            return q, deq, cur, store
        xg = jnp.pad(x, (0, ngr * g - rows)).reshape(ngr, g)
        mq = maxq[j]
        sc, zc = grid_params(xg, mq, scale_dtype, jnp.minimum(g, rows - g * jnp.arange(ngr)), grid)
        store = tuple(lax.dynamic_update_index_in_dim(a, p, j, 0) for a, p in zip(store, (sc, zc)))
        sc_r = jnp.repeat(sc, g, total_repeat_length=ngr * g)[:rows]
        zc_r = jnp.repeat(zc, g, total_repeat_length=ngr * g)[:rows]
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

        z = jnp.zeros((rows, bsz), dt)
        init = (w1, z, jnp.zeros((rows, bsz), jnp.uint8), z, cur, store)
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
    for b0, b1 in _segments(nblocks):                # each later segment solves against a smaller triangle of L
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
    lam = damp_used * _damping_unit(hd[perm])                         # as damped_reversed_cholesky damps
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
