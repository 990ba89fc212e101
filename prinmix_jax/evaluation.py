"""Evaluation of a model (a param tree) against the fine-tuned model: token-level KL and top-1 agreement,
perplexity, and exact-match accuracy with greedy decoding (jitted, fixed-size KV cache, ``lax.scan``).

Every function takes param trees (the NNX state layout of :class:`~prinmix_jax.models.CausalLM`), so a
compressed model is just ``apply_delta(base_params, delta)``.
"""
from __future__ import annotations

import functools
import os
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["token_metrics", "perplexity", "greedy_generate", "exact_match", "PromptTokenizer",
           "load_prompt_tokenizer", "byte_tokenizer", "decoder_block", "cached_decode"]


# ----- teacher-forced metrics --------------------------------------------------------------------
@functools.partial(jax.jit, static_argnames=("config",))
def _logits(params, config, ids):
    from prinmix_jax.models import model_from_params

    return model_from_params(config, params)(ids).astype(jnp.float32)


@functools.partial(jax.jit, static_argnames=("config",))
def _pair_sums(ref_params, params, config, ids, w):
    lr = jax.nn.log_softmax(_logits(ref_params, config, ids), -1)
    lm = jax.nn.log_softmax(_logits(params, config, ids), -1)
    kl = jnp.sum(jnp.exp(lr) * (lr - lm), -1)
    agree = (jnp.argmax(lr, -1) == jnp.argmax(lm, -1)).astype(jnp.float32)
    return jnp.sum(kl * w), jnp.sum(agree * w), jnp.sum(w)


@functools.partial(jax.jit, static_argnames=("config",))
def _nll_sums(params, config, ids, w):
    lp = jax.nn.log_softmax(_logits(params, config, ids[:, :-1]), -1)
    nll = -jnp.take_along_axis(lp, ids[:, 1:, None], -1)[..., 0]
    return jnp.sum(nll * w[:, 1:]), jnp.sum(w[:, 1:])


def padded_batches(ids, batch_size):
    """``(ids, weights)`` batches of ``batch_size`` rows; the last is padded with zero rows of weight 0, so every
    batch has one compiled shape."""
    ids = np.asarray(ids, np.int32)
    if ids.ndim != 2 or ids.shape[0] == 0 or ids.shape[1] < 2:
        raise ValueError(f"ids must be a (num_sequences, seq_len >= 2) int array, got shape {ids.shape}")
    for i in range(0, len(ids), batch_size):
        chunk = ids[i:i + batch_size]
        w = np.ones(chunk.shape, np.float32)
        if len(chunk) < batch_size:  # pad to one compiled shape
            pad = batch_size - len(chunk)
            chunk = np.concatenate([chunk, np.zeros((pad, ids.shape[1]), np.int32)])
            w = np.concatenate([w, np.zeros((pad, ids.shape[1]), np.float32)])
        yield jnp.asarray(chunk), jnp.asarray(w)


def token_metrics(ref_params: dict, params: dict, config, ids, *, batch_size: int = 8) -> dict:
    """Mean per-token ``KL(ref ‖ model)`` (nats) and top-1 agreement of the next-token distributions.

    Args:
      ref_params: the reference (fine-tuned) model's params.
      params: the model under test.
      config: their shared :class:`~prinmix_jax.models.ModelConfig`.
      ids: int tokens ``(num_sequences, seq_len)``; every position is scored.

    Returns:
      ``{"kl": float, "top1": float, "tokens": int}``.
    """
    kl = agree = n = 0.0
    for x, w in padded_batches(ids, batch_size):
        a, b, c = _pair_sums(ref_params, params, config, x, w)
        kl, agree, n = kl + float(a), agree + float(b), n + float(c)
    return {"kl": kl / n, "top1": agree / n, "tokens": int(n)}


def perplexity(params: dict, config, ids, *, batch_size: int = 8) -> float:
    """``exp`` of the mean next-token negative log-likelihood over ``ids`` ``(num_sequences, seq_len)``."""
    s = n = 0.0
    for x, w in padded_batches(ids, batch_size):
        a, c = _nll_sums(params, config, x, w)
        s, n = s + float(a), n + float(c)
    return float(np.exp(s / n))


# ----- greedy decoding with a KV cache -----------------------------------------------------------
def decoder_block(layer, cfg, li, x, cos, sin, kc, vc, slot, key_ok):
    """One decoder block of a KV-cache decode over ``t`` new tokens written at cache slots ``slot..slot+t-1``
    (returns ``(x, kc, vc)``; shared with :mod:`prinmix_jax.serving`).

    ``key_ok`` (B, S): cache slots that hold real (non-padding) tokens; positions are slots minus padding.
    """
    from prinmix_jax.models.llama.modeling import attend

    attn = layer.self_attn
    t = x.shape[1]
    q, kk, vv = attn.qkv(layer.input_layernorm(x), cos, sin)
    kc = jax.lax.dynamic_update_slice(kc, kk.astype(kc.dtype), (0, slot, 0, 0))
    vc = jax.lax.dynamic_update_slice(vc, vv.astype(vc.dtype), (0, slot, 0, 0))
    qs = slot + jnp.arange(t)[:, None]
    ks = jnp.arange(kc.shape[1])[None, :]
    m = ks <= qs
    win = cfg.window(li)
    if win is not None:
        m = m & (ks > qs - win)
    out = attend(q, kc, vc, m[None] & key_ok[:, None, :])  # mask (B, t, S)
    x = x + attn.o_proj(out.astype(x.dtype))
    x = x + layer.mlp(layer.post_attention_layernorm(x))
    return x, kc, vc


def cached_decode(model, config, ids, pad, max_new_tokens: int, pick, cache_dtype):
    """The decode loop shared by every generator (traced, not jitted): a prefill of the left-padded ``ids``
    (B, P), then a ``lax.scan`` of one-token steps against a preallocated KV cache of ``P + max_new_tokens``
    slots, through the model's own :func:`decoder_block`.

    Args:
      model: a model with ``embed``, ``layers`` and ``logits`` (e.g. ``model_from_params``'s, or the serving
        bank's patched one).
      pad: (B,) left padding of each row (positions start at 0 on each prompt's first real token).
      pick: ``(logits (B, V) float32, step) -> (B,) int32`` next tokens; ``step`` 0 is the prefill's.
      cache_dtype: dtype of the KV cache (the params' dtype).

    Returns:
      (B, max_new_tokens) int32 tokens.
    """
    from prinmix_jax.models.rope import rope_cos_sin

    b, p = ids.shape
    s_len = p + max_new_tokens
    key_ok = jnp.arange(s_len)[None, :] >= pad[:, None]
    caches = [(jnp.zeros((b, s_len, config.num_kv_heads, config.head_dim), cache_dtype),) * 2
              for _ in range(config.num_layers)]

    def run(x, slot, caches):
        pos = jnp.maximum(slot + jnp.arange(x.shape[1])[None, :] - pad[:, None], 0)
        cos, sin = rope_cos_sin(config, pos, x.dtype)
        new = []
        for li, layer in enumerate(model.layers):
            x, kc, vc = decoder_block(layer, config, li, x, cos, sin, caches[li][0], caches[li][1], slot, key_ok)
            new.append((kc, vc))
        return model.logits(x[:, -1:])[:, 0].astype(jnp.float32), new

    logits, caches = run(model.embed(ids), 0, caches)
    tok = pick(logits, 0)

    def step(carry, i):
        tok, caches = carry
        logits, caches = run(model.embed(tok[:, None]), p + i, caches)
        return (pick(logits, i + 1), caches), tok

    (last, _), toks = jax.lax.scan(step, (tok, caches), jnp.arange(max_new_tokens - 1))
    return jnp.concatenate([toks.T, last[:, None]], axis=1) if max_new_tokens > 1 else tok[:, None]


@functools.partial(jax.jit, static_argnames=("config", "max_new_tokens"))
def _generate(params, config, ids, pad, max_new_tokens):
    from prinmix_jax.models import model_from_params

    return cached_decode(model_from_params(config, params), config, ids, pad, max_new_tokens,
                         lambda logits, step: jnp.argmax(logits, -1).astype(jnp.int32),
                         params["embed_tokens"]["weight"].dtype)


def greedy_generate(params: dict, config, prompts: Sequence[Sequence[int]], max_new_tokens: int, *,
                    eos_id: int | None = None, pad_id: int = 0, batch_size: int = 64) -> list[list[int]]:
    """Greedy continuation of every prompt (token id lists), ``max_new_tokens`` each, truncated after EOS.

    Prompts are left-padded to a common length (rounded up to a multiple of 8) with positions that start at
    0 on each prompt's first real token, so the result equals argmax decoding with a full forward pass.
    The whole decode runs in one jitted call per batch (prefill, then a ``lax.scan`` of one-token steps
    against a preallocated KV cache of ``prompt_len + max_new_tokens`` slots).
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    prompts = [list(map(int, p)) for p in prompts]
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    out: list[list[int]] = []
    plen = -(-max(len(p) for p in prompts) // 8) * 8
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i:i + batch_size]
        real = len(chunk)
        chunk = chunk + [chunk[0]] * (batch_size - real) if len(prompts) > batch_size else chunk
        ids = np.full((len(chunk), plen), pad_id, np.int32)
        pad = np.zeros(len(chunk), np.int32)
        for r, pr in enumerate(chunk):
            ids[r, plen - len(pr):] = pr
            pad[r] = plen - len(pr)
        gen = np.asarray(_generate(params, config, jnp.asarray(ids), jnp.asarray(pad), max_new_tokens))[:real]
        for row in gen.tolist():
            if eos_id is not None and eos_id in row:
                row = row[:row.index(eos_id) + 1]
            out.append(row)
    return out


# ----- exact match -------------------------------------------------------------------------------
class PromptTokenizer:
    """Prompt encoding / answer decoding for :func:`exact_match`.

    Attributes:
      encode: ``text -> ids`` of a prompt (including any BOS the model expects).
      decode: ``ids -> text`` of a generated answer (special tokens dropped).
      eos_id: the end-of-sequence id (generation stops there), or None.
      pad_id: id used for left padding (never attended).
    """

    def __init__(self, encode: Callable[[str], list[int]], decode: Callable[[list[int]], str],
                 eos_id: int | None, pad_id: int = 0):
        self.encode, self.decode, self.eos_id, self.pad_id = encode, decode, eos_id, pad_id


def byte_tokenizer() -> PromptTokenizer:
    """The SFT pair's byte tokenizer (BOS + UTF-8 bytes)."""
    from prinmix_jax.sft.tokenizer import EOS_ID, PAD_ID, decode, encode

    return PromptTokenizer(lambda s: encode(s, bos=True), decode, EOS_ID, PAD_ID)


def load_prompt_tokenizer(path: str | os.PathLike, purpose: str = "encode prompts",
                          hint: str = "save the model's tokenizer there") -> PromptTokenizer:
    """A checkpoint folder's Hugging Face tokenizer; BOS is prepended when the tokenizer has one and does not
    add it itself.

    Raises:
      CalibrationDataError: the folder holds no tokenizer files (``purpose`` and ``hint`` complete the
        message, see :func:`~prinmix_jax.models.calibration.require_tokenizer`), or they cannot be loaded.
    """
    from prinmix_jax.models.calibration import require_tokenizer
    from prinmix_jax.models.errors import CalibrationDataError

    path = require_tokenizer(path, purpose, hint)
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as e:  # transformers raises many types here
        raise CalibrationDataError(f"{path}: cannot load its tokenizer ({e})") from e
    bos = tok.bos_token_id

    def enc(text):
        ids = list(tok(text)["input_ids"])
        if bos is not None and (not ids or ids[0] != bos):
            ids = [bos] + ids
        return ids

    def dec(ids):
        ids = list(ids)
        if tok.eos_token_id is not None and tok.eos_token_id in ids:
            ids = ids[:ids.index(tok.eos_token_id)]
        return tok.decode(ids, skip_special_tokens=True)

    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    return PromptTokenizer(enc, dec, tok.eos_token_id, pad)


def exact_match(params: dict, config, examples: Sequence[dict], tokenizer: PromptTokenizer, *,
                max_new_tokens: int | None = None, batch_size: int = 64) -> dict:
    """Exact-match accuracy of greedy answers on ``[{"prompt": ..., "answer": ...}, ...]``.

    A prediction is the decoded continuation up to EOS; it matches when it equals the answer after stripping
    surrounding whitespace. ``max_new_tokens`` defaults to the longest encoded answer + 2.

    Returns:
      ``{"accuracy": float, "correct": int, "total": int, "predictions": [str, ...]}``.
    """
    if not examples:
        raise ValueError("no examples")
    prompts = [tokenizer.encode(ex["prompt"]) for ex in examples]
    if max_new_tokens is None:
        max_new_tokens = max(len(tokenizer.encode(ex["answer"])) for ex in examples) + 2
    gens = greedy_generate(params, config, prompts, max_new_tokens, eos_id=tokenizer.eos_id,
                           pad_id=tokenizer.pad_id, batch_size=batch_size)
    preds = [tokenizer.decode(g) for g in gens]
    correct = sum(p.strip() == ex["answer"].strip() for p, ex in zip(preds, examples))
    return {"accuracy": correct / len(examples), "correct": int(correct), "total": len(examples),
            "predictions": preds}
