"""Exact bit packing of unsigned integer codes of width 1–8 into uint8 or uint32 words.

Layout: each row is a little-endian bit stream. Value ``j`` of a row occupies bits
``[j·b, (j+1)·b)`` of the stream, bit ``t`` of the value at stream position ``j·b + t``;
stream position ``p`` is bit ``p mod w`` of word ``p // w`` (``w`` = 8 or 32). A row of
``L`` values is padded with zero values to a multiple of ``w`` values, so it takes
exactly ``b · ceil(L / w)`` words and rows never share a word: the storage of a row is
its own, which the byte-exact cost model of the allocation relies on.
"""
from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

_WORD_DTYPES = {8: np.uint8, 32: np.uint32}


def _xp(x):
    """NumPy for host arrays (no compilation per shape), jax.numpy otherwise (traceable)."""
    return np if isinstance(x, np.ndarray) else jnp


def packed_words(length: int, bits: int, word_bits: int = 8) -> int:
    """Number of words one packed row of ``length`` values at ``bits`` bits occupies."""
    _check(bits, word_bits)
    return bits * math.ceil(length / word_bits)


def packed_nbytes(length: int, bits: int, word_bits: int = 8) -> int:
    """Bytes one packed row of ``length`` values at ``bits`` bits occupies."""
    return packed_words(length, bits, word_bits) * word_bits // 8


def _check(bits: int, word_bits: int) -> None:
    if word_bits not in _WORD_DTYPES:
        raise ValueError(f"word_bits must be 8 or 32, got {word_bits}")
    if not 1 <= int(bits) <= 8:
        raise ValueError(f"bit width must be in 1..8, got {bits}")


def pack_bits(codes, bits: int, word_bits: int = 8):
    """Packs codes ``(..., L)`` with values in ``[0, 2**bits)`` into words ``(..., packed_words)``.

    Args:
      codes: unsigned integer array, last axis is packed.
      bits: width of every value, 1–8.
      word_bits: 8 (uint8 words) or 32 (uint32 words).

    Returns:
      Array of dtype uint8/uint32 with last axis ``bits * ceil(L / word_bits)``; a NumPy array
      for NumPy input, a JAX array otherwise.
    """
    _check(bits, word_bits)
    xp = _xp(codes)
    codes = xp.asarray(codes)
    *lead, length = codes.shape
    nchunk = math.ceil(length / word_bits)
    pad = nchunk * word_bits - length
    x = codes.astype(np.uint32)
    if pad:
        x = xp.pad(x, [(0, 0)] * len(lead) + [(0, pad)])
    x = x.reshape(*lead, nchunk, word_bits)
    # (..., nchunk, word_bits values, bits) -> stream of word_bits*bits bits -> (bits words, word_bits)
    stream = (x[..., None] >> xp.arange(bits, dtype=np.uint32)) & 1
    stream = stream.reshape(*lead, nchunk, bits, word_bits)
    weights = xp.left_shift(np.uint32(1), xp.arange(word_bits, dtype=np.uint32))
    words = xp.sum(stream * weights, axis=-1, dtype=np.uint32)
    return words.reshape(*lead, nchunk * bits).astype(_WORD_DTYPES[word_bits])


def unpack_bits(words, bits: int, length: int, word_bits: int = 8):
    """Inverse of :func:`pack_bits`: returns uint8 codes ``(..., length)``."""
    _check(bits, word_bits)
    xp = _xp(words)
    words = xp.asarray(words)
    *lead, nw = words.shape
    nchunk = math.ceil(length / word_bits)
    if nw != nchunk * bits:
        raise ValueError(
            f"packed row has {nw} words, expected {nchunk * bits} for {length} values at {bits} bits")
    w = words.astype(np.uint32).reshape(*lead, nchunk, bits, 1)
    stream = (w >> xp.arange(word_bits, dtype=np.uint32)) & 1          # (..., nchunk, bits, word_bits)
    stream = stream.reshape(*lead, nchunk, word_bits, bits)            # value-major
    vals = xp.sum(stream << xp.arange(bits, dtype=np.uint32), axis=-1, dtype=np.uint32)
    return vals.reshape(*lead, nchunk * word_bits)[..., :length].astype(np.uint8)

