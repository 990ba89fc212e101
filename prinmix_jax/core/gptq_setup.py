"""GPTQ's set-up under a Hessian, which depends on the Hessian alone: the damped Cholesky factor of the
reversed, permuted Hessian and the rows of the upper factor ``R`` of its inverse that the column loop of
:mod:`prinmix_jax.core.gptq` reads.

Memory (an n×n float32 buffer is 485 MB at n = 11008): beyond the input ``h``, a pass holds one n×n buffer, the
Cholesky factor ``L`` of the reversed, permuted, damped Hessian, built from ``h`` in one pass
(:func:`damped_reversed_cholesky`; two n×n buffers while it is factorised). The upper factor ``R`` of ``H⁻¹``
that the column loop reads is never formed there: each block's rows of ``R`` are one triangular solve against
``L`` (:func:`upper_factor_rows`); from 16 blocks on, the loop runs in four segments, each solving against a
smaller leading triangle of ``L`` (:func:`loop_segments`). tests/test_gptq_memory.py checks this from XLA's memory
analysis.

The set-up is also a program of its own (:func:`gptq_factor`: the factor and every row of ``R``, one n×n
buffer), whose result passes under the same Hessian take (``factor=``, the same bytes): the error table's
widths, q, k and v, and the row tiles of a stack on several devices then share one
(:mod:`prinmix_jax.core.factors`).
"""
from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax


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


def damping_unit(hd):
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
    md = damping_unit(hd)
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
    ``(n - start)² · nrows`` flops (:func:`loop_segments`). The solve is written as ``X (Lᵀ)ᵀ = E`` on ``Lᵀ``: ``L``
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


def loop_segments(nblocks: int) -> list[tuple[int, int]]:
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

    ``h`` symmetric. :func:`~prinmix_jax.core.gptq.gptq_quantize` does not call this: it reads ``R`` a block of
    rows at a time (:func:`upper_factor_rows`) and never holds it whole; this is the same computation in one piece.

    Returns:
      ``(R, d_used)``.
    """
    n = h.shape[0]
    low, d = damped_reversed_cholesky(h, damp, max_tries=max_tries)
    return upper_factor_rows(low, 0, n, n), d


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


def column_order(h, dt, act_order: bool):
    """``(hd, dead, perm)``: ``diag(H)`` in ``dt`` with the dead columns' (zero diagonal) set to 1, the dead
    columns, and GPTQ's column order (act-order: by decreasing ``hd``, stable; else the identity), as the
    reference GPTQ takes them; the pass and its set-up (:func:`gptq_factor`) share it."""
    hd = jnp.diag(h).astype(dt)                          # diag((H + Hᵀ)/2)
    dead = hd == 0
    hd = hd + dead.astype(dt)
    perm = jnp.argsort(-hd, stable=True) if act_order else jnp.arange(h.shape[0])
    return hd, dead, perm


def loop_layout(rows: int, cols: int, group_size, act_order: bool, block_size: int, row_mode: bool):
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
    them (:func:`upper_factor_rows`, :func:`loop_segments`), into one (cp, cp) buffer."""
    n, cp = low.shape[0], nblocks * bsz
    out = jnp.zeros((cp, cp), dt)
    for b0, b1 in loop_segments(nblocks):
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
    ``R`` the column loop reads, as one program, for :func:`~prinmix_jax.core.gptq.gptq_quantize` and
    :func:`~prinmix_jax.core.gptq.gptq_quantize_with_error` ``(…, factor=)`` passes of any rows under ``h`` with
    these settings (the same bytes as without).

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
    _, _, bsz = loop_layout(rows, cols, group_size, act_order, block_size, scale_axis == "row")
    _, dead, perm = column_order(h, dt, act_order)
    low, d = damped_reversed_cholesky(h, damp, perm if act_order else None, dead, dt)
    return GPTQFactor(_factor_rows(low, -(-cols // bsz), bsz, dt), d)
