"""Round-to-nearest quantisation grids (the grids GPTQ rounds onto).

Every grid stores codes ``q`` in ``0 .. maxq = 2**b - 1`` and a value ``scale * (q - zero)`` per
group of entries. Two grids (``grid=``):

* ``"minmax"`` (method.md §5, the reference GPTQ's): the range of a group is widened to contain 0,
  an all-zero range becomes ``[-1, 1]``; ``scale = (xmax - xmin) / maxq``,
  ``zero = round(-xmin / scale)``, ``q = clip(round(x / scale) + zero, 0, maxq)``.
* ``"mse"`` (project choice, ``CompressionConfig``'s default; with lean index metadata it runs as
  ``"mse-sym"``): per group, the candidate grid with
  the least squared error among the min–max grids of shrunk ranges ``p · [xmin, xmax]`` (``p`` in
  :data:`MSE_STEPS`, ``p = 1`` being the min–max grid itself, so it never does worse) and, at widths
  1 and 2, symmetric grids without a zero level, ``zero = maxq / 2`` (levels ``±s/2`` at 1 bit,
  ``±s/2, ±3s/2`` at 2 bits) with ``s`` a fraction ``p`` of the full-range scale or, at 1 bit, the
  least-squares scale ``2 · mean|x|`` of a sign code.
  At 2 bits a min–max grid over a Gaussian-like singular vector has a zero level and one wasted
  level and loses about 26% of its energy; the symmetric grid with the best scale about 12%
  (the Lloyd–Max optimum is 11.75%). At 1 bit min–max would be ``{0, ±range}``; the symmetric grid
  is a sign code with the least-squares scale ``2 · mean|x|``.

* ``"mse-sym"`` (the default with lean index metadata, format version 3): ``"mse"`` with only the
  symmetric candidates at widths 1 and 2, so every zero point there is ``maxq / 2`` and need not be stored
  (:data:`HALF_ZERO_MAX_BITS`); widths ≥ 3 as ``"mse"``. On Gaussian-like singular vectors the symmetric
  grid is nearly always the least-squares one at these widths anyway.

Zero points are integers on the min–max grid and half-integers on the symmetric one; storage keeps
them in half steps for widths ≤ 2 (:func:`stored_zero`). When ``scale_dtype`` is given the scale is
rounded to that dtype *before* the codes are computed, so the stored scale reproduces the values.
"""
from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

GRIDS = ("minmax", "mse", "mse-sym")
#: Candidate scale factors of the ``"mse"`` grid: the shrink of the range at widths ≥ 3, the fraction
#: of the full-range scale at widths ≤ 2 (1 bit uses its closed form instead).
MSE_STEPS = tuple(1.0 - 0.04 * i for i in range(19))          # 1.0 .. 0.28
#: The most values times candidates :func:`grid_params` tries at once on an accelerator (as one
#: ``(candidates, groups, g)`` array, 16 MB in float32); larger searches (a whole matrix's round-to-nearest: an
#: embedding's U is 0.5 GB), and every search on the CPU, try the candidates one at a time in a loop. Inside
#: GPTQ's column loop a search is one column's groups (U) or one group of columns (V̂): at once, a step of
#: that loop runs no inner loop of ~20 steps (on the first H200 run the U step took ~0.6 s per 7B matrix).
GRID_SEARCH_AT_ONCE = 1 << 22
#: Widths whose zero point is stored in half steps (the symmetric grid's zero is ``maxq / 2``).
HALF_ZERO_MAX_BITS = 2


def _round_scale(scale, scale_dtype):
    if scale_dtype is None:
        return scale
    info = jnp.finfo(scale_dtype)
    return jnp.clip(scale, info.tiny, info.max).astype(scale_dtype).astype(scale.dtype)


def minmax_params(xmin, xmax, maxq, scale_dtype=None):
    """Scale and zero point from a (per row or group) range.

    Args:
      xmin, xmax: arrays of equal shape, the observed minimum and maximum.
      maxq: ``2**bits - 1``, broadcastable to ``xmin``.
      scale_dtype: optional dtype the scale is stored in (e.g. ``jnp.float16``).

    Returns:
      ``(scale, zero)`` in the dtype of ``xmin``; ``zero`` holds integers in ``[0, maxq]``.
    """
    dt = xmin.dtype
    xmin = jnp.minimum(xmin, 0)
    xmax = jnp.maximum(xmax, 0)
    empty = (xmin == 0) & (xmax == 0)
    xmin = jnp.where(empty, -1.0, xmin)
    xmax = jnp.where(empty, 1.0, xmax)
    maxq = jnp.asarray(maxq, dt)
    scale = _round_scale((xmax - xmin) / maxq, scale_dtype)
    zero = jnp.clip(jnp.round(-xmin / scale), 0, maxq)
    return scale, zero


def quantize(x, scale, zero, maxq):
    """Codes and dequantised values of ``x`` on the grid ``(scale, zero, maxq)`` (``zero`` may be a
    half-integer: the symmetric grid)."""
    base = jnp.floor(zero)
    q = jnp.clip(jnp.round(x / scale + (zero - base)) + base, 0, jnp.asarray(maxq, x.dtype))
    return q, scale * (q - zero)


def _sq_error(xg, scale, zero, maxq, mask):
    _, deq = quantize(xg, scale[..., None], zero[..., None], maxq[..., None])
    return jnp.sum(jnp.where(mask, (xg - deq) ** 2, 0), axis=-1)


def grid_params(xg, maxq, scale_dtype=None, count=None, grid: str = "minmax"):
    """Scale and zero point of groups of values on ``grid`` (module docstring).

    Args:
      xg: (..., g) values of each group; entries past ``count`` are padding and ignored.
      maxq: ``2**bits - 1``, broadcastable to ``xg.shape[:-1]``.
      scale_dtype: optional dtype the scale is stored in.
      count: real entries per group (broadcastable to ``xg.shape[:-1]``); default ``g``.
      grid: ``"minmax"``, ``"mse"`` or ``"mse-sym"``.

    Returns:
      ``(scale, zero)`` of shape ``xg.shape[:-1]``.
    """
    dt = xg.dtype
    shape = xg.shape[:-1]
    maxq = jnp.broadcast_to(jnp.asarray(maxq, dt), shape)
    count = jnp.broadcast_to(jnp.asarray(xg.shape[-1] if count is None else count, dt), shape)
    mask = jnp.arange(xg.shape[-1]) < count[..., None]
    xg = jnp.where(mask, xg, 0)
    if grid == "minmax":
        return minmax_params(xg.min(-1), xg.max(-1), maxq, scale_dtype)
    if grid not in ("mse", "mse-sym"):
        raise ValueError(f"grid must be one of {GRIDS}, got {grid!r}")
    steps = jnp.asarray(MSE_STEPS, dt)[:, None]
    flat = lambda a: a.reshape(1, -1)
    xf, mf = xg.reshape(-1, xg.shape[-1]), mask.reshape(-1, xg.shape[-1])
    mq = maxq.reshape(-1)
    # min-max grids of shrunk ranges (step 1.0: the plain min-max grid, so "mse" never does worse)
    lo, hi = flat(xf.min(-1)), flat(xf.max(-1))
    s_mm, z_mm = minmax_params(steps * lo, steps * hi, flat(mq), scale_dtype)
    # symmetric grids (zero = maxq / 2) for widths <= 2: fractions of the full-range scale, and at 1 bit
    # the least-squares scale of a sign code
    amax = jnp.max(jnp.abs(xf), axis=-1)
    s_full = 2 * jnp.where(amax > 0, amax, 1.0) / mq
    s_sym = _round_scale(steps * flat(s_full), scale_dtype)
    s_sign = _round_scale(jnp.maximum(2 * jnp.sum(jnp.abs(xf), -1) / count.reshape(-1), jnp.finfo(dt).tiny),
                          scale_dtype)
    s_sym = jnp.concatenate([s_sym, flat(jnp.where(mq == 1, s_sign, s_sym[0]))])
    z_sym = jnp.broadcast_to(flat(mq / 2), s_sym.shape)
    # a symmetric candidate of a wider width is never chosen (its half-integer zero would not be storable)
    sym_ok = flat(mq <= 2 ** HALF_ZERO_MAX_BITS - 1)
    if grid == "mse":
        scales, zeros = jnp.concatenate([s_mm, s_sym]), jnp.concatenate([z_mm, z_sym])
        allowed = jnp.concatenate([jnp.ones(s_mm.shape, bool), jnp.broadcast_to(sym_ok, s_sym.shape)])
    else:
        # "mse-sym": a group tries the symmetric candidates (widths <= 2) or the min-max ones, never both, so
        # candidate i is either family's i-th (the same candidates in the same order: the same choice, at
        # about half the work of trying both families and masking one)
        nm = s_mm.shape[0]
        scales = jnp.concatenate([jnp.where(sym_ok, s_sym[:nm], s_mm), s_sym[nm:]])
        zeros = jnp.concatenate([jnp.where(sym_ok, z_sym[:nm], z_mm), z_sym[nm:]])
        allowed = jnp.concatenate([jnp.ones(s_mm.shape, bool), jnp.broadcast_to(sym_ok, s_sym[nm:].shape)])

    errors = partial(_candidate_errors, xf, mq, mf, jnp.finfo(dt).max)
    if xf.size * scales.shape[0] <= GRID_SEARCH_AT_ONCE:
        # On an accelerator a small search (inside GPTQ's column loop: a column of U, a group of V̂'s rows) runs as
        # one step rather than a loop of ~20 in every step of that loop; on the CPU the loop is as fast.
        # The same choice either way (tests/test_quantizer_grids.py).
        scale, zero = jax.lax.platform_dependent(scales, zeros, allowed, cpu=partial(search_one_at_a_time, errors),
                                                 default=partial(search_at_once, errors))
    else:
        scale, zero = search_one_at_a_time(errors, scales, zeros, allowed)
    return scale.reshape(shape), zero.reshape(shape)


def _candidate_errors(xf, mq, mf, big, s_, z_, ok):
    """Squared errors of groups ``xf`` (G, g) on candidate grids ``(s_, z_)`` (``(..., G)``), ``big`` where not
    ``ok``."""
    return jnp.where(ok, _sq_error(xf, s_, z_, mq, mf), big)


def search_one_at_a_time(errors, scales, zeros, allowed):
    """Per group, the candidate grid ``(scales[i], zeros[i])`` (``(C, G)`` each) of least ``errors`` among the
    ``allowed``, the first of equal errors (as ``argmin``), trying one candidate at a time: a (groups, g) array
    per candidate, never all candidates at once (an embedding's U is 0.5 GB)."""
    def better(best, cand):
        s_, z_, ok = cand
        err = errors(s_, z_, ok)
        take = err < best[0]
        return (jnp.where(take, err, best[0]), jnp.where(take, s_, best[1]), jnp.where(take, z_, best[2])), None

    first = (errors(scales[0], zeros[0], allowed[0]), scales[0], zeros[0])
    (_, scale, zero), _ = jax.lax.scan(better, first, (scales[1:], zeros[1:], allowed[1:]))
    return scale, zero


def search_at_once(errors, scales, zeros, allowed):
    """:func:`search_one_at_a_time`'s choice from every candidate's errors at once (a (C, G, g) array)."""
    best = jnp.argmin(errors(scales, zeros, allowed), axis=0)[None]
    pick = lambda a: jnp.take_along_axis(a, best, axis=0)[0]
    return pick(scales), pick(zeros)


def stored_zero(zero, bits: int):
    """Zero points as stored (uint8): half steps (``2 · zero``) for widths ≤ :data:`HALF_ZERO_MAX_BITS`."""
    return zero * 2 if bits <= HALF_ZERO_MAX_BITS else zero


def dequantize(q, scale, stored, bits: int):
    """Stored codes -> values ``scale * (q - zero)``, ``zero`` read back from its stored form
    (:func:`stored_zero`; ``bits`` static)."""
    zero = stored / 2 if bits <= HALF_ZERO_MAX_BITS else stored
    return scale * (q - zero)


def group_params(x, maxq, group_size: int, scale_dtype=None, grid: str = "minmax"):
    """Per-row, per-group-of-columns params of ``x`` (rows, cols) -> (rows, ngroups) each."""
    rows, cols = x.shape
    ng = -(-cols // group_size)
    xp = jnp.pad(x, ((0, 0), (0, ng * group_size - cols))).reshape(rows, ng, group_size)
    maxq = jnp.broadcast_to(jnp.asarray(maxq, x.dtype).reshape(-1, 1), (rows, ng))
    count = jnp.minimum(group_size, cols - group_size * jnp.arange(ng)).astype(x.dtype)
    return grid_params(xp, maxq, scale_dtype, count, grid)


def expand_groups(p, cols: int, group_size: int):
    """(..., ngroups) per-group values -> (..., cols) per-column values: each repeated ``group_size`` times
    along the last axis, then cut to ``cols``.

    A broadcast and a reshape (``jnp.repeat`` with ``total_repeat_length`` builds a scatter, two cumsums and a
    gather instead: slower to trace, compile and run)."""
    p = jnp.asarray(p)
    *lead, ng = p.shape
    return jnp.broadcast_to(p[..., None], (*lead, ng, group_size)).reshape(*lead, ng * group_size)[..., :cols]


@partial(jax.jit, static_argnames=("group_size", "scale_dtype", "grid"))
def rtn_quantize(w, bits, group_size: int | None = None, scale_dtype=None, grid: str = "minmax"):
    """Round-to-nearest with per-row widths ``bits`` (rows,) and groups of columns.

    Returns:
      ``(deq, codes, scale, zero)``: dequantised (rows, cols), codes (rows, cols) uint8,
      scale and zero (rows, ngroups).
    """
    rows, cols = w.shape
    g = cols if not group_size or group_size >= cols else group_size
    maxq = (2 ** jnp.asarray(bits, jnp.int32) - 1).astype(w.dtype)
    scale, zero = group_params(w, maxq, g, scale_dtype, grid)
    q, deq = quantize(w, expand_groups(scale, cols, g), expand_groups(zero, cols, g), maxq[:, None])
    return deq, q.astype(jnp.uint8), scale, zero
