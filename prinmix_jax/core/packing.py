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

import jax
import jax.numpy as jnp
import numpy as np

_WORD_DTYPES = {8: np.uint8, 32: np.uint32}


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
      for NumPy input, a JAX array otherwise (one compiled program per shape and width, not one per
      operation).
    """
    _check(bits, word_bits)
    if isinstance(codes, np.ndarray):
        return _pack_host(codes, bits, word_bits)
    return _pack_jax(jnp.asarray(codes), bits, word_bits)


def _chunk_dtype(bits: int):
    """The little-endian integer that holds one chunk of 8 values of ``bits`` bits (``bits`` bytes)."""
    return np.dtype("<u4") if bits <= 4 else np.dtype("<u8")


def _pack_host(codes, bits: int, word_bits: int):
    """:func:`pack_bits` in NumPy: every 8 values are one chunk of ``bits`` bytes of the stream, built as a
    little-endian integer ``Σ_i value_i << (bits · i)`` whose low ``bits`` bytes, in order, are the chunk; the
    stream's bytes in order are the little-endian words. (Values keep their low ``bits`` bits, through uint8,
    as in JAX.)"""
    *lead, length = codes.shape
    total = math.ceil(length / word_bits) * word_bits          # values, a multiple of 8
    dt = _chunk_dtype(bits)
    c = codes.astype(np.uint8) & np.uint8((1 << bits) - 1)
    if total > length:
        c = np.pad(c, [(0, 0)] * len(lead) + [(0, total - length)])
    c = c.reshape(*lead, total // 8, 8)
    acc = c[..., 0].astype(dt)
    for i in range(1, 8):
        acc |= c[..., i].astype(dt) << dt.type(bits * i)
    chunks = acc[..., None].view(np.uint8)[..., :bits]          # (..., total / 8, bits)
    words = np.ascontiguousarray(chunks).reshape(*lead, total // 8 * bits)
    return words if word_bits == 8 else words.view("<u4").astype(np.uint32)


def _pack_traced(codes, bits: int, word_bits: int):
    """:func:`pack_bits` in JAX (traceable)."""
    *lead, length = codes.shape
    nchunk = math.ceil(length / word_bits)
    pad = nchunk * word_bits - length
    x = codes.astype(np.uint32)
    if pad:
        x = jnp.pad(x, [(0, 0)] * len(lead) + [(0, pad)])
    x = x.reshape(*lead, nchunk, word_bits)
    # (..., nchunk, word_bits values, bits) -> stream of word_bits*bits bits -> (bits words, word_bits)
    stream = (x[..., None] >> jnp.arange(bits, dtype=np.uint32)) & 1
    stream = stream.reshape(*lead, nchunk, bits, word_bits)
    weights = jnp.left_shift(np.uint32(1), jnp.arange(word_bits, dtype=np.uint32))
    words = jnp.sum(stream * weights, axis=-1, dtype=np.uint32)
    return words.reshape(*lead, nchunk * bits).astype(_WORD_DTYPES[word_bits])


def unpack_bits(words, bits: int, length: int, word_bits: int = 8):
    """Inverse of :func:`pack_bits`: returns uint8 codes ``(..., length)`` (NumPy for NumPy input)."""
    _check(bits, word_bits)
    *lead, nw = np.shape(words)
    nchunk = math.ceil(length / word_bits)
    if nw != nchunk * bits:
        raise ValueError(
            f"packed row has {nw} words, expected {nchunk * bits} for {length} values at {bits} bits")
    if isinstance(words, np.ndarray):
        return _unpack_host(words, bits, length, word_bits)
    return _unpack_jax(jnp.asarray(words), bits, length, word_bits)


def _unpack_host(words, bits: int, length: int, word_bits: int):
    """:func:`unpack_bits` in NumPy: the bytes of the words in little-endian order are the stream, whose every
    ``bits`` bytes are one chunk of 8 values (:func:`_pack_host`)."""
    *lead, nw = words.shape
    b = np.ascontiguousarray(words, dtype=np.dtype(_WORD_DTYPES[word_bits]).newbyteorder("<")).view(np.uint8)
    nchunk = nw * word_bits // 8 // bits                      # chunks of 8 values
    dt = _chunk_dtype(bits)
    buf = np.zeros((*lead, nchunk, dt.itemsize), np.uint8)
    buf[..., :bits] = b.reshape(*lead, nchunk, bits)
    acc = buf.view(dt)[..., 0]                                # (..., nchunk)
    mask = dt.type((1 << bits) - 1)
    out = np.empty((*lead, nchunk, 8), np.uint8)
    for i in range(8):
        out[..., i] = (acc >> dt.type(bits * i)) & mask
    return np.ascontiguousarray(out.reshape(*lead, nchunk * 8)[..., :length])


def _unpack_traced(words, bits: int, length: int, word_bits: int):
    """:func:`unpack_bits` in JAX (traceable)."""
    *lead, _ = words.shape
    nchunk = math.ceil(length / word_bits)
    w = words.astype(np.uint32).reshape(*lead, nchunk, bits, 1)
    stream = (w >> jnp.arange(word_bits, dtype=np.uint32)) & 1          # (..., nchunk, bits, word_bits)
    stream = stream.reshape(*lead, nchunk, word_bits, bits)            # value-major
    vals = jnp.sum(stream << jnp.arange(bits, dtype=np.uint32), axis=-1, dtype=np.uint32)
    return vals.reshape(*lead, nchunk * word_bits)[..., :length].astype(np.uint8)


_pack_jax = jax.jit(_pack_traced, static_argnums=(1, 2))
_unpack_jax = jax.jit(_unpack_traced, static_argnums=(1, 2, 3))
