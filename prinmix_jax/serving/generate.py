"""Mixed-batch generation through a :class:`~prinmix_jax.serving.DeltaBank`: prefill, then a ``lax.scan`` of
one-token steps against a preallocated KV cache, every row through its own delta; greedy or sampled
(temperature, top-p) per row. The decode loop is :func:`prinmix_jax.evaluation.cached_decode`, the one
greedy evaluation uses (with the model's own decoder block).

Shapes are padded to buckets (rows to a power of two, prompt length to a multiple of 8, new tokens to a
multiple of 8) so that a server compiles a handful of programs, not one per request.
"""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from prinmix_jax.evaluation import cached_decode
from prinmix_jax.serving.forward import bucket, patched_model

__all__ = ["bank_logits", "generate", "ContextLengthError"]


class ContextLengthError(ValueError):
    """A prompt plus the tokens asked for is longer than the model's context."""


@functools.partial(jax.jit, static_argnames=("config", "spec"))
def bank_logits(params, state, config, spec, ids, slots):
    """Full-forward logits (B, T, V) float32, row j through slot ``slots[j]``."""
    return patched_model(config, params, state, slots, spec)(ids).astype(jnp.float32)


def _pick(logits, temperature, top_p, keys, step):
    """Next token per row: argmax where ``temperature <= 0``, else a sample of ``softmax(logits / T)``
    restricted to the smallest set of tokens whose probability reaches ``top_p``. The sampling branch (a sort
    of the vocabulary per row, several times the cost of a small model's decode step on CPU) only runs when
    some row samples (``lax.cond``: one compiled program either way)."""
    greedy = jnp.argmax(logits, -1).astype(jnp.int32)
    return jax.lax.cond(jnp.any(temperature > 0), _sample, lambda *a: greedy,
                        logits, temperature, top_p, keys, step, greedy)


def _sample(logits, temperature, top_p, keys, step, greedy):
    lg = logits / jnp.maximum(temperature, 1e-6)[:, None]
    order = jnp.argsort(-lg, axis=-1)
    sorted_lg = jnp.take_along_axis(lg, order, -1)
    probs = jax.nn.softmax(sorted_lg, -1)
    keep_sorted = (jnp.cumsum(probs, -1) - probs) < top_p[:, None]
    masked = jnp.where(keep_sorted, sorted_lg, -jnp.inf)
    row_keys = jax.vmap(jax.random.fold_in, (0, None))(keys, step)
    choice = jax.vmap(jax.random.categorical)(row_keys, masked)
    sample = jnp.take_along_axis(order, choice[:, None], -1)[:, 0].astype(jnp.int32)
    return jnp.where(temperature > 0, sample, greedy)


@functools.partial(jax.jit, static_argnames=("config", "spec", "max_new_tokens"))
def _generate(params, state, config, spec, ids, pad, slots, temperature, top_p, seeds, max_new_tokens):
    keys = jax.vmap(jax.random.key)(seeds)
    return cached_decode(patched_model(config, params, state, slots, spec), config, ids, pad, max_new_tokens,
                         lambda logits, step: _pick(logits, temperature, top_p, keys, step),
                         params["embed_tokens"]["weight"].dtype)


def _per_row(value, n: int, name: str, cast):
    vals = list(value) if isinstance(value, (list, tuple, np.ndarray)) else [value] * n
    if len(vals) != n:
        raise ValueError(f"{name}: {len(vals)} values for {n} prompts")
    return [cast(v) for v in vals]


def generate(bank, prompts: Sequence[Sequence[int]], models, max_new_tokens, *, temperature=0.0, top_p=1.0,
             seed=0, eos_id: int | None = None, pad_id: int = 0) -> list[list[int]]:
    """Continuations of every prompt, row j through ``models[j]`` (a delta name, or None for the base).

    Args:
      bank: the :class:`~prinmix_jax.serving.DeltaBank`.
      prompts: token id lists (at least one token each).
      models: one delta name (or None) per prompt.
      max_new_tokens: tokens per prompt (an int or one per prompt, each >= 1).
      temperature: 0 (greedy) or a sampling temperature; one value or one per prompt.
      top_p: nucleus-sampling mass (one value or one per prompt).
      seed: sampling seed(s); a row's sample depends only on its own seed, prompt and model.
      eos_id: generation stops after this token (it is kept in the output).
      pad_id: the id used for left padding (never attended).

    Raises:
      ContextLengthError: a prompt plus its new tokens exceeds ``max_position_embeddings``.
      KeyError: an unknown model name.
    """
    n = len(prompts)
    if n == 0:
        return []
    prompts = [list(map(int, p)) for p in prompts]
    news = _per_row(max_new_tokens, n, "max_new_tokens", int)
    temps = _per_row(temperature, n, "temperature", float)
    tops = _per_row(top_p, n, "top_p", float)
    seeds = _per_row(seed, n, "seed", lambda s: int(s) % (2 ** 32))
    ctx = bank.config.max_position_embeddings
    for p, k in zip(prompts, news):
        if not p:
            raise ValueError("every prompt needs at least one token")
        if k < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {k}")
        if len(p) + k > ctx:
            raise ContextLengthError(f"the prompt ({len(p)} tokens) plus {k} new tokens exceeds the model's context "
                                     f"of {ctx} tokens")
    slots = list(bank.slot_ids(models))
    rows = bucket(n)
    plen = -(-max(len(p) for p in prompts) // 8) * 8
    new = -(-max(news) // 8) * 8
    ids = np.full((rows, plen), pad_id, np.int32)
    pad = np.full(rows, plen - 1, np.int32)
    ids[n:, -1] = prompts[0][-1]
    for r, pr in enumerate(prompts):
        ids[r, plen - len(pr):] = pr
        pad[r] = plen - len(pr)

    def col(vals, fill, dtype):
        return jnp.asarray(np.array(vals + [fill] * (rows - n), dtype))

    out = _generate(bank.params, bank.state, bank.config, bank.spec, jnp.asarray(ids), jnp.asarray(pad),
                    col(slots, 0, np.int32), col(temps, 0.0, np.float32), col(tops, 1.0, np.float32),
                    col(seeds, 0, np.uint32), new)
    result = []
    for row, k in zip(np.asarray(out)[:n].tolist(), news):
        row = row[:k]
        if eos_id is not None and eos_id in row:
            row = row[:row.index(eos_id) + 1]
        result.append(row)
    return result
