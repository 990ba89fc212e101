"""The byte-exact storage cost of a singular index (method.md §3, the cost ``c[i, b]``)."""
from __future__ import annotations

import math

import numpy as np


def num_groups(length: int, group_size: int | None) -> int:
    """Quantisation groups along a vector of ``length`` entries (one when ``group_size`` is None or ≥ length)."""
    return 1 if not group_size or group_size >= length else math.ceil(length / group_size)


def index_cost_bits(m: int, n: int, widths, group_size: int | None, *, scale_bits: int = 16,
                    zero_bits: int = 8, sigma_bits: int = 32, width_bits: int = 8, lean: bool = False,
                    zero_free_max_bits: int = 0) -> np.ndarray:
    """Byte-exact storage cost ``c[b]`` in bits of one singular index at each width.

    An index at width ``b > 0`` stores ``u_i`` (m codes) and ``V_i`` (n codes) packed at b bits in
    uint8 words (each row padded to a multiple of 8 values), one scale and one zero per group of
    ``group_size`` entries of each, its σ and its width. Width 0 costs nothing.

    With ``lean`` metadata (format version 3, :class:`~prinmix_jax.formats.SVDQuantDelta`) the width is
    implied by the index's width group (no ``width_bits``), a factor with a single group folds its scale into
    σ (no ``scale_bits`` for it), and widths up to ``zero_free_max_bits`` (symmetric grids) store no zeros.

    Returns:
      int64 array, one cost per entry of ``widths``.
    """
    out = []
    for b in widths:
        if b == 0:
            out.append(0)
            continue
        codes = 8 * b * (math.ceil(m / 8) + math.ceil(n / 8))
        groups = (num_groups(m, group_size), num_groups(n, group_size))
        if not lean:
            out.append(codes + (scale_bits + zero_bits) * sum(groups) + sigma_bits + width_bits)
            continue
        meta = sigma_bits
        for g in groups:
            meta += (scale_bits if g > 1 else 0) * g + (zero_bits * g if b > zero_free_max_bits else 0)
        out.append(codes + meta)
    return np.asarray(out, dtype=np.int64)
