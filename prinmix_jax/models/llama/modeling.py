"""Flax NNX decoder-only LM for the Llama family and its switches (Mistral, Qwen2, Qwen3).

Module and attribute names mirror transformers, so the NNX state path of every parameter is its Hugging
Face name without the ``model.`` prefix (``layers/3/self_attn/q_proj/weight`` <->
``model.layers.3.self_attn.q_proj.weight``). Every linear kernel is stored in the Hugging Face layout
``weight[out, in]`` and applied as ``x @ weight.T``; there is no transposition anywhere between a
checkpoint and this model.

Activations run in the parameter dtype; RMSNorm statistics, attention softmax and rope tables are computed
in float32, as transformers does.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from prinmix_jax.models.config import ModelConfig
from prinmix_jax.models.llama.params import check_block_params, check_params
from prinmix_jax.models.rope import apply_rope, rope_cos_sin

__all__ = ["Linear", "RMSNorm", "rms_norm", "Embed", "unembed", "Attention", "attend", "MLP", "DecoderLayer",
           "CausalLM", "model_from_params", "params_from_model", "layer_from_params", "logits_from_params",
           "causal_mask"]

Params = dict[str, Any]


def _normal(rngs: nnx.Rngs, shape, dtype, std=0.02):
    return (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)


class Linear(nnx.Module):
    """``y = x @ weight.T + bias`` with ``weight`` in the Hugging Face ``[out, in]`` layout."""

    def __init__(self, in_features: int, out_features: int, *, bias: bool, dtype, rngs: nnx.Rngs):
        self.weight = nnx.Param(_normal(rngs, (out_features, in_features), dtype))
        self.bias = nnx.Param(jnp.zeros((out_features,), dtype)) if bias else None

    def __call__(self, x_bti: jax.Array) -> jax.Array:
        y = jnp.einsum("...i,oi->...o", x_bti, self.weight[...])
        if self.bias is not None:
            y = y + self.bias[...]
        return y


class RMSNorm(nnx.Module):
    """Root-mean-square norm over the last axis; statistics in float32, output in the input dtype."""

    def __init__(self, dim: int, *, eps: float, dtype, rngs: nnx.Rngs):
        del rngs
        self.weight = nnx.Param(jnp.ones((dim,), dtype))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        return rms_norm(x, self.weight[...], self.eps)


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """``weight * x / rms(x)`` over the last axis; statistics in float32, output in the input dtype."""
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return weight * xf.astype(x.dtype)


class Embed(nnx.Module):
    """Token embedding ``weight[V, D]``; :meth:`attend` is the tied output head."""

    def __init__(self, vocab: int, dim: int, *, dtype, rngs: nnx.Rngs):
        self.weight = nnx.Param(_normal(rngs, (vocab, dim), dtype))

    def __call__(self, ids_bt: jax.Array) -> jax.Array:
        return jnp.take(self.weight[...], ids_bt, axis=0)

    def attend(self, x_btd: jax.Array) -> jax.Array:
        return unembed(x_btd, self.weight[...])


def unembed(x_btd: jax.Array, head_vd: jax.Array) -> jax.Array:
    """Output head: hidden (B, T, D) times ``head[V, D]`` (the tied embedding or lm_head) -> (B, T, V)."""
    return jnp.einsum("btd,vd->btv", x_btd, head_vd)


def causal_mask(seq_len: int, window: int | None = None, attention_mask: jax.Array | None = None) -> jax.Array:
    """Boolean (B or 1, T, S) mask, True where query t may attend key s.

    Args:
      seq_len: T = S.
      window: sliding-window length (key s visible iff ``t - window < s <= t``), None for full causal.
      attention_mask: optional (B, S) 1/0 padding mask of valid keys.
    """
    t = jnp.arange(seq_len)[:, None]
    s = jnp.arange(seq_len)[None, :]
    m = s <= t
    if window is not None:
        m = m & (s > t - window)
    m = m[None]
    if attention_mask is not None:
        m = m & attention_mask.astype(bool)[:, None, :]
    return m


class Attention(nnx.Module):
    """Grouped-query self-attention with rope, optional q/k/v (and o) biases and optional q/k RMSNorm."""

    def __init__(self, cfg: ModelConfig, *, dtype, rngs: nnx.Rngs):
        d, h = cfg.hidden_size, cfg.head_dim
        self.q_proj = Linear(d, cfg.q_dim, bias=cfg.qkv_bias, dtype=dtype, rngs=rngs)
        self.k_proj = Linear(d, cfg.kv_dim, bias=cfg.qkv_bias, dtype=dtype, rngs=rngs)
        self.v_proj = Linear(d, cfg.kv_dim, bias=cfg.qkv_bias, dtype=dtype, rngs=rngs)
        self.o_proj = Linear(cfg.q_dim, d, bias=cfg.o_bias, dtype=dtype, rngs=rngs)
        self.q_norm = RMSNorm(h, eps=cfg.rms_norm_eps, dtype=dtype, rngs=rngs) if cfg.qk_norm else None
        self.k_norm = RMSNorm(h, eps=cfg.rms_norm_eps, dtype=dtype, rngs=rngs) if cfg.qk_norm else None
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, h

    def qkv(self, x_btd, cos, sin):
        """Projections with q/k norm and rope: ``(q (B,T,N,H), k (B,T,K,H), v (B,T,K,H))``."""
        b, t, _ = x_btd.shape
        n, k, h = self.num_heads, self.num_kv_heads, self.head_dim
        q_btnh = self.q_proj(x_btd).reshape(b, t, n, h)
        k_btkh = self.k_proj(x_btd).reshape(b, t, k, h)
        v_btkh = self.v_proj(x_btd).reshape(b, t, k, h)
        if self.q_norm is not None:
            q_btnh, k_btkh = self.q_norm(q_btnh), self.k_norm(k_btkh)
        return apply_rope(q_btnh, cos, sin), apply_rope(k_btkh, cos, sin), v_btkh

    def __call__(self, x_btd, cos, sin, mask_bts, taps: dict | None = None):
        out_btnh = attend(*self.qkv(x_btd, cos, sin), mask_bts)
        if taps is not None:
            taps["o_in"] = out_btnh
        return self.o_proj(out_btnh)


def attend(q_btnh, k_bskh, v_bskh, mask_bts):
    """Grouped-query softmax attention (f32 scores) of T queries over S keys; returns ``(B, T, N·H)``."""
    b, t, n, h = q_btnh.shape
    k = k_bskh.shape[2]
    q_btkgh = q_btnh.reshape(b, t, k, n // k, h)
    scores = jnp.einsum("btkgh,bskh->bkgts", q_btkgh, k_bskh, preferred_element_type=jnp.float32)
    scores = scores * (h ** -0.5)
    scores = jnp.where(mask_bts[:, None, None, :, :], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v_bskh.dtype)
    return jnp.einsum("bkgts,bskh->btkgh", probs, v_bskh).reshape(b, t, n * h)


class MLP(nnx.Module):
    """SwiGLU: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, cfg: ModelConfig, *, dtype, rngs: nnx.Rngs):
        d, f = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = Linear(d, f, bias=cfg.mlp_bias, dtype=dtype, rngs=rngs)
        self.up_proj = Linear(d, f, bias=cfg.mlp_bias, dtype=dtype, rngs=rngs)
        self.down_proj = Linear(f, d, bias=cfg.mlp_bias, dtype=dtype, rngs=rngs)

    def __call__(self, x_btd, taps: dict | None = None):
        act_btf = jax.nn.silu(self.gate_proj(x_btd)) * self.up_proj(x_btd)
        if taps is not None:
            taps["down_in"] = act_btf
        return self.down_proj(act_btf)


class DecoderLayer(nnx.Module):
    """Pre-norm decoder block: ``x + attn(norm(x))`` then ``x + mlp(norm(x))``."""

    def __init__(self, cfg: ModelConfig, layer: int, *, dtype, rngs: nnx.Rngs):
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dtype, rngs=rngs)
        self.self_attn = Attention(cfg, dtype=dtype, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dtype, rngs=rngs)
        self.mlp = MLP(cfg, dtype=dtype, rngs=rngs)
        self.config, self.layer = cfg, layer

    def __call__(self, x_btd, positions_bt=None, attention_mask=None):
        """Apply the block to hidden states (B, T, D); see :meth:`call_with_inputs`."""
        return self.call_with_inputs(x_btd, positions_bt, attention_mask, capture=False)[0]

    def call_with_inputs(self, x_btd, positions_bt=None, attention_mask=None, *, capture=True, rope=None):
        """Apply the block and return the inputs of its linear layers.

        Args:
          x_btd: hidden states (B, T, D).
          positions_bt: integer positions (B, T); default ``arange(T)``.
          attention_mask: optional (B, T) 1/0 mask of valid (non-padding) tokens.
          capture: when False the second result is None.
          rope: optional precomputed (cos, sin) tables, shared across blocks by :class:`CausalLM`.

        Returns:
          ``(y_btd, taps)`` with taps ``{"attn_in": (B,T,D), "o_in": (B,T,N*H), "mlp_in": (B,T,D),
          "down_in": (B,T,F)}``: the inputs of q/k/v, o, gate/up and down.
        """
        b, t, _ = x_btd.shape
        if rope is None:
            if positions_bt is None:
                positions_bt = jnp.broadcast_to(jnp.arange(t), (b, t))
            rope = rope_cos_sin(self.config, positions_bt, x_btd.dtype)
        mask = causal_mask(t, self.config.window(self.layer), attention_mask)
        taps = {} if capture else None
        h = self.input_layernorm(x_btd)
        if capture:
            taps["attn_in"] = h
        x_btd = x_btd + self.self_attn(h, rope[0], rope[1], mask, taps)
        h = self.post_attention_layernorm(x_btd)
        if capture:
            taps["mlp_in"] = h
        return x_btd + self.mlp(h, taps), taps


class CausalLM(nnx.Module):
    """Decoder-only causal LM (``*ForCausalLM``) for the families of :class:`ModelConfig`.

    Attributes:
      config: the :class:`ModelConfig`.
      embed_tokens, layers, norm, lm_head: as in transformers (``lm_head`` is None when tied).
    """

    def __init__(self, cfg: ModelConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.config = cfg
        self.embed_tokens = Embed(cfg.vocab_size, cfg.hidden_size, dtype=dtype, rngs=rngs)
        self.layers = nnx.List([DecoderLayer(cfg, i, dtype=dtype, rngs=rngs) for i in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dtype, rngs=rngs)
        self.lm_head = (None if cfg.tie_word_embeddings
                        else Linear(cfg.hidden_size, cfg.vocab_size, bias=False, dtype=dtype, rngs=rngs))

    def embed(self, ids_bt: jax.Array) -> jax.Array:
        """Token ids (B, T) -> hidden states (B, T, D) in the parameter dtype."""
        return self.embed_tokens(ids_bt)

    def logits(self, x_btd: jax.Array) -> jax.Array:
        """Final RMSNorm and output head: hidden (B, T, D) -> logits (B, T, V)."""
        x_btd = self.norm(x_btd)
        return self.embed_tokens.attend(x_btd) if self.lm_head is None else self.lm_head(x_btd)

    def __call__(self, input_ids: jax.Array, positions: jax.Array | None = None,
                 attention_mask: jax.Array | None = None) -> jax.Array:
        """Logits (B, T, V) for token ids (B, T).

        Args:
          input_ids: int token ids (B, T).
          positions: optional int positions (B, T); default ``arange(T)``.
          attention_mask: optional (B, T) 1/0 mask of valid keys (padding).
        """
        b, t = input_ids.shape
        x = self.embed(input_ids)
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t), (b, t))
        rope = rope_cos_sin(self.config, positions, x.dtype)
        for layer in self.layers:
            x = layer.call_with_inputs(x, positions, attention_mask, capture=False, rope=rope)[0]
        return self.logits(x)


def _abstract(factory):
    return nnx.split(nnx.eval_shape(factory))


def model_from_params(config: ModelConfig, params: Params) -> CausalLM:
    """Build a :class:`CausalLM` holding ``params`` (no random init, no copy of the arrays).

    Args:
      config: the model config.
      params: nested dict in the NNX state layout (see :mod:`prinmix_jax.models.llama.params`).

    Returns:
      The model. Works inside ``jax.jit`` too (the arrays may be tracers).
    """
    check_params(params, config)
    graphdef, state = _abstract(lambda: CausalLM(config, rngs=nnx.Rngs(0)))
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)


def layer_from_params(config: ModelConfig, layer: int, block_params: Params) -> DecoderLayer:
    """Build decoder block ``layer`` holding ``block_params`` (the subtree ``params["layers"][layer]``)."""
    check_block_params(block_params, config, layer)
    graphdef, state = _abstract(lambda: DecoderLayer(config, layer, rngs=nnx.Rngs(0), dtype=jnp.float32))
    nnx.replace_by_pure_dict(state, block_params)
    return nnx.merge(graphdef, state)


def logits_from_params(config: ModelConfig, params: Params, x_btd: jax.Array) -> jax.Array:
    """:meth:`CausalLM.logits` from a tree holding only the global params (``{"embed_tokens", "norm"[,
    "lm_head"]}``, e.g. :func:`~prinmix_jax.models.hf_io.read_globals` output): (B, T, D) -> (B, T, V)."""
    head = params["embed_tokens"] if config.tie_word_embeddings else params["lm_head"]
    return unembed(rms_norm(x_btd, params["norm"]["weight"], config.rms_norm_eps), head["weight"])


def params_from_model(model: nnx.Module) -> Params:
    """The model's parameters as a plain nested dict (the NNX state layout; arrays are not copied)."""
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))
