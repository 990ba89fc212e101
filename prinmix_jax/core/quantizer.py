"""Asymmetric min–max round-to-nearest quantisation (the grid GPTQ rounds onto).

Conventions (method.md §5): the range of a row/group is widened to contain 0, an all-zero
range becomes ``[-1, 1]``; ``scale = (xmax - xmin) / (2**b - 1)``, ``zero = round(-xmin / scale)``,
``q = clip(round(x / scale) + zero, 0, 2**b - 1)``, value ``scale * (q - zero)``.
When ``scale_dtype`` is given the scale is rounded to that dtype *before* the zero point and
codes are computed, so the stored scale reproduces the quantised values exactly.
"""
from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp


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
    scale = (xmax - xmin) / maxq
    if scale_dtype is not None:
        info = jnp.finfo(scale_dtype)
        scale = jnp.clip(scale, info.tiny, info.max).astype(scale_dtype).astype(dt)
    zero = jnp.clip(jnp.round(-xmin / scale), 0, maxq)
    return scale, zero


def quantize(x, scale, zero, maxq):
    """Codes and dequantised values of ``x`` on the grid ``(scale, zero, maxq)``."""
    q = jnp.clip(jnp.round(x / scale) + zero, 0, jnp.asarray(maxq, x.dtype))
    return q, scale * (q - zero)


def group_params(x, maxq, group_size: int, scale_dtype=None):
    """Per-row, per-group-of-columns params of ``x`` (rows, cols) -> (rows, ngroups) each."""
    rows, cols = x.shape
    ng = -(-cols // group_size)
    xp = jnp.pad(x, ((0, 0), (0, ng * group_size - cols))).reshape(rows, ng, group_size)
    maxq = jnp.broadcast_to(jnp.asarray(maxq, x.dtype).reshape(-1, 1), (rows, ng))
    return minmax_params(xp.min(-1), xp.max(-1), maxq, scale_dtype)


def expand_groups(p, cols: int, group_size: int):
    """(rows, ngroups) per-group values -> (rows, cols) per-column values."""
    return jnp.repeat(p, group_size, axis=1, total_repeat_length=p.shape[1] * group_size)[:, :cols]


@partial(jax.jit, static_argnames=("group_size", "scale_dtype"))
def rtn_quantize(w, bits, group_size: int | None = None, scale_dtype=None):
    """Round-to-nearest with per-row widths ``bits`` (rows,) and groups of columns.

    Returns:
      ``(deq, codes, scale, zero)``: dequantised (rows, cols), codes (rows, cols) uint8,
      scale and zero (rows, ngroups).
    """
    rows, cols = w.shape
    g = cols if not group_size or group_size >= cols else group_size
    maxq = (2 ** jnp.asarray(bits, jnp.int32) - 1).astype(w.dtype)
    scale, zero = group_params(w, maxq, g, scale_dtype)
    q, deq = quantize(w, expand_groups(scale, cols, g), expand_groups(zero, cols, g), maxq[:, None])
    return deq, q.astype(jnp.uint8), scale, zero
