"""Rotary position embeddings, matching ``transformers.modeling_rope_utils`` for the supported types.

Frequencies are computed on the host in float32 (as transformers does) from the static config, so they
are constants inside a jitted forward.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from prinmix_jax.models.config import ModelConfig

__all__ = ["rope_frequencies", "rope_cos_sin", "apply_rope"]


def _default_inv_freq(base: float, dim: int) -> np.ndarray:
    exponent = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    return (np.float32(1.0) / (np.float32(base) ** exponent)).astype(np.float32)


def rope_frequencies(cfg: ModelConfig, seq_len: int | None = None) -> tuple[np.ndarray, float]:
    """Inverse frequencies (``head_dim // 2``,) float32 and the cos/sin scaling factor.

    Args:
      cfg: model config; ``cfg.rope`` selects the rope type.
      seq_len: sequence length of the current call (only the "dynamic" type depends on it; transformers
        uses ``max(position_ids) + 1``, which equals the length for the default positions).
    """
    rope, dim = cfg.rope, cfg.head_dim
    base = rope.theta
    if rope.rope_type == "default":
        return _default_inv_freq(base, dim), 1.0
    if rope.rope_type == "linear":
        return (_default_inv_freq(base, dim) / np.float32(rope.factor)).astype(np.float32), 1.0
    if rope.rope_type == "dynamic":
        max_pos = cfg.max_position_embeddings
        seq = max(seq_len or max_pos, max_pos)
        base = base * ((rope.factor * seq / max_pos) - (rope.factor - 1)) ** (dim / (dim - 2))
        return _default_inv_freq(base, dim), 1.0
    if rope.rope_type == "llama3":
        inv = _default_inv_freq(base, dim)
        factor, lo, hi = rope.factor, rope.low_freq_factor, rope.high_freq_factor
        old_len = rope.original_max_position_embeddings
        low_wavelen, high_wavelen = old_len / lo, old_len / hi
        wavelen = (2 * math.pi / inv).astype(np.float32)
        inv_l = np.where(wavelen > low_wavelen, inv / np.float32(factor), inv).astype(np.float32)
        smooth = ((old_len / wavelen - lo) / (hi - lo)).astype(np.float32)
        smoothed = ((1 - smooth) * inv_l / np.float32(factor) + smooth * inv_l).astype(np.float32)
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return np.where(medium, smoothed, inv_l).astype(np.float32), 1.0
    if rope.rope_type == "yarn":
        return _yarn(cfg)
    raise ValueError(f"rope type {rope.rope_type!r} is not supported")


def _yarn(cfg: ModelConfig) -> tuple[np.ndarray, float]:
    rope, dim, base = cfg.rope, cfg.head_dim, cfg.rope.theta
    orig = rope.original_max_position_embeddings
    factor = rope.factor if rope.factor is not None else cfg.max_position_embeddings / orig

    def get_mscale(scale, mscale=1.0):
        return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0

    attention_factor = rope.attention_factor
    if attention_factor is None:
        if rope.mscale and rope.mscale_all_dim:
            attention_factor = float(get_mscale(factor, rope.mscale) / get_mscale(factor, rope.mscale_all_dim))
        else:
            attention_factor = get_mscale(factor)
    beta_fast, beta_slow = rope.beta_fast or 32, rope.beta_slow or 1

    def correction_dim(num_rot):
        return (dim * math.log(orig / (num_rot * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1).astype(np.float32)
    pos_freqs = np.float32(base) ** (np.arange(0, dim, 2).astype(np.float32) / np.float32(dim))
    extrap, interp = 1.0 / pos_freqs, 1.0 / (np.float32(factor) * pos_freqs)
    extrap_factor = 1 - ramp
    inv = interp * (1 - extrap_factor) + extrap * extrap_factor
    return inv.astype(np.float32), float(attention_factor)


def rope_cos_sin(cfg: ModelConfig, positions: jnp.ndarray, dtype) -> tuple[jnp.ndarray, jnp.ndarray]:
    """cos and sin tables (B, T, head_dim) for integer ``positions`` (B, T), cast to ``dtype``."""
    inv_freq, scale = rope_frequencies(cfg, seq_len=positions.shape[-1])
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)[None, None, :]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return (jnp.cos(emb) * scale).astype(dtype), (jnp.sin(emb) * scale).astype(dtype)


def apply_rope(x_btnh: jnp.ndarray, cos_bth: jnp.ndarray, sin_bth: jnp.ndarray) -> jnp.ndarray:
    """Rotate ``x`` (B, T, heads, H) by the tables (B, T, H), the "rotate half" convention of transformers."""
    half = x_btnh.shape[-1] // 2
    rotated = jnp.concatenate([-x_btnh[..., half:], x_btnh[..., :half]], axis=-1)
    return x_btnh * cos_bth[:, :, None, :] + rotated * sin_bth[:, :, None, :]
