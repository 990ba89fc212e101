"""The per-layer input Hessians ``H = X Xᵀ / N`` (method.md §6).

Every decoder block has four Hessians, one per distinct linear input (float32, ``[in, in]``):

=========  ==========================  =====================
key        input of                    size
=========  ==========================  =====================
attn_in    q_proj, k_proj, v_proj      D x D
o_in       o_proj                      N*H x N*H
mlp_in     gate_proj, up_proj          D x D
down_in    down_proj                   F x F
=========  ==========================  =====================

*Parallel* mode (:func:`collect_hessians`): one pass of the (fine-tuned) model gives all Hessians.
*Sequential* mode is built from :func:`embed`, :func:`block_forward_with_hessians` and :func:`block_forward`:
``h = embed(...)``; for each block: ``h_next, H = block_forward_with_hessians(block_i, h)``, compress block
i with ``H``, then ``h = block_forward(compressed_block_i, h)``. :func:`collect_hessians_sequential` is
that loop with a user callback.

Accumulation runs chunk by chunk through a jitted step that adds ``Σ xᵀx`` into float32 accumulators, so
memory does not grow with the number of tokens. With a ``mesh``, each chunk's batch is sharded over the
data axis and the per-device sums are reduced by XLA.

Calibration data (:func:`tokenize_calibration`, :func:`require_tokenizer`, :func:`check_context`) lives in
:mod:`prinmix_jax.models.calibration_data` and is re-exported here.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from prinmix_jax.models.calibration_data import check_context, require_tokenizer, tokenize_calibration
from prinmix_jax.models.config import ModelConfig
from prinmix_jax.models.errors import CalibrationDataError
from prinmix_jax.models.llama.modeling import (
    layer_from_params, logits_from_params, model_from_params, params_from_model)
from prinmix_jax.models.llama.params import HESSIAN_FOR_LINEAR
from prinmix_jax.models.rope import rope_cos_sin

__all__ = ["HESSIAN_KEYS", "BlockHessians", "tokenize_calibration", "require_tokenizer", "check_context",
           "collect_hessians", "embed", "block_forward", "block_forward_with_hessians", "final_logits",
           "collect_hessians_sequential"]

HESSIAN_KEYS: tuple[str, ...] = ("attn_in", "o_in", "mlp_in", "down_in")


@dataclasses.dataclass(frozen=True)
class BlockHessians:
    """The four input Hessians of one decoder block, each ``Σ x xᵀ / num_tokens`` in float32.

    Index by Hessian key (``h["o_in"]``) or by linear name (``h["q_proj"]`` is ``h["attn_in"]``).
    """

    attn_in: jax.Array
    o_in: jax.Array
    mlp_in: jax.Array
    down_in: jax.Array
    num_tokens: int

    def __getitem__(self, key: str) -> jax.Array:
        key = HESSIAN_FOR_LINEAR.get(key, key)
        if key not in HESSIAN_KEYS:
            raise KeyError(f"{key!r}: expected one of {HESSIAN_KEYS} or a linear name {tuple(HESSIAN_FOR_LINEAR)}")
        return getattr(self, key)

    def for_linear(self, name: str) -> jax.Array:
        """The Hessian of the input of linear ``name`` (q_proj ... down_proj)."""
        return self[HESSIAN_FOR_LINEAR[name]]

    def as_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in HESSIAN_KEYS} | {"num_tokens": self.num_tokens}


# ----- jitted steps ------------------------------------------------------------------------------
def _xtx(x_btd: jax.Array, w_b: jax.Array) -> jax.Array:
    """``Σ_b w_b Σ_t x xᵀ`` in float32 at full precision."""
    xf = x_btd.astype(jnp.float32)
    return jnp.einsum("bti,btj->ij", xf * w_b[:, None, None], xf, precision=jax.lax.Precision.HIGHEST)


def _add_taps(acc: dict, taps: dict, w_b) -> dict:
    return {k: acc[k] + _xtx(taps[k], w_b) for k in HESSIAN_KEYS}


@functools.partial(jax.jit, static_argnames=("config",), donate_argnums=(0,))
def _parallel_step(acc, params, ids_bt, w_b, config: ModelConfig):
    model = model_from_params(config, params)
    b, t = ids_bt.shape
    x = model.embed(ids_bt)
    positions = jnp.broadcast_to(jnp.arange(t), (b, t))
    rope = rope_cos_sin(config, positions, x.dtype)
    new = []
    for i, layer in enumerate(model.layers):
        x, taps = layer.call_with_inputs(x, positions, capture=True, rope=rope)
        new.append(_add_taps(acc[i], taps, w_b))
    return new


@functools.partial(jax.jit, static_argnames=("config", "layer", "capture"), donate_argnums=(0,))
def _block_step(acc, block_params, x_btd, pos_bt, w_b, config: ModelConfig, layer: int, capture: bool):
    y, taps = layer_from_params(config, layer, block_params).call_with_inputs(x_btd, pos_bt, capture=capture)
    return (_add_taps(acc, taps, w_b) if capture else acc), y


def _representative_layer(config: ModelConfig, layer: int) -> int:
    """The first layer with the same attention window: blocks differ only in that, so one compiled step
    per distinct window serves every block (instead of one compile per layer)."""
    return next(i for i in range(config.num_layers) if config.window(i) == config.window(layer))


def _zeros_acc(config: ModelConfig) -> dict:
    d, q, f = config.hidden_size, config.q_dim, config.intermediate_size
    sizes = {"attn_in": d, "o_in": q, "mlp_in": d, "down_in": f}
    return {k: jnp.zeros((sizes[k], sizes[k]), jnp.float32) for k in HESSIAN_KEYS}


class _Chunker:
    """Splits the leading (batch) axis into fixed-size chunks (the last padded with zero weight) and
    places them on the mesh: batch sharded over ``axis``, everything else replicated."""

    def __init__(self, n: int, chunk_size: int, mesh: Mesh | None, axis: str | None):
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.mesh, self.axis = mesh, axis
        if mesh is not None:
            self.axis = axis or mesh.axis_names[0]
            if self.axis not in mesh.axis_names:
                raise ValueError(f"data axis {self.axis!r} is not an axis of the mesh {mesh.axis_names}")
            ndev = mesh.shape[self.axis]
            # Run under automatic (GSPMD) sharding even when the caller's mesh has Explicit axes.
            self.mesh = Mesh(mesh.devices, mesh.axis_names, axis_types=(AxisType.Auto,) * len(mesh.axis_names))
            chunk_size = -(-chunk_size // ndev) * ndev
        self.n, self.chunk = n, min(chunk_size, n) if mesh is None else chunk_size

    def replicate(self, tree):
        if self.mesh is None:
            return tree
        return jax.device_put(tree, NamedSharding(self.mesh, PartitionSpec()))

    def chunks(self, *arrays):
        """Yield ``(rows, weights, *chunked arrays)`` per chunk."""
        for start in range(0, self.n, self.chunk):
            rows = min(self.chunk, self.n - start)
            w = np.zeros((self.chunk,), np.float32)
            w[:rows] = 1.0
            out = []
            for a in arrays:
                c = a[start:start + rows]
                if rows < self.chunk:
                    pad = jnp.zeros((self.chunk - rows,) + tuple(a.shape[1:]), a.dtype)
                    c = jnp.concatenate([jnp.asarray(c), pad])
                out.append(c)
            w = jnp.asarray(w)
            if self.mesh is not None:
                out = [jax.device_put(c, NamedSharding(self.mesh, PartitionSpec(self.axis))) for c in out]
                w = jax.device_put(w, NamedSharding(self.mesh, PartitionSpec(self.axis)))
            yield rows, w, out


def _check_ids(ids, config: ModelConfig) -> np.ndarray:
    ids = np.asarray(ids)
    if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
        raise CalibrationDataError(f"calibration ids must be an int array (num_sequences, seq_len), got "
                                   f"shape {ids.shape} dtype {ids.dtype}")
    if ids.size == 0:
        raise CalibrationDataError("calibration ids are empty")
    if ids.min() < 0 or ids.max() >= config.vocab_size:
        raise CalibrationDataError(f"calibration ids span [{ids.min()}, {ids.max()}] but vocab_size is "
                                   f"{config.vocab_size} (tokenized with another tokenizer?)")
    return ids.astype(np.int32)


def _finish(acc: dict, num_tokens: int) -> BlockHessians:
    return BlockHessians(**{k: acc[k] / num_tokens for k in HESSIAN_KEYS}, num_tokens=num_tokens)


def _split(model_or_params, config):
    if isinstance(model_or_params, nnx.Module):
        return params_from_model(model_or_params), config or model_or_params.config
    if config is None:
        raise ValueError("config is required when passing a param tree")
    return model_or_params, config


# ----- parallel mode -----------------------------------------------------------------------------
def collect_hessians(model_or_params, config: ModelConfig | None = None, ids=None, *, chunk_size: int = 8,
                     mesh: Mesh | None = None, data_axis: str | None = None) -> list[BlockHessians]:
    """Parallel mode: every block's input Hessians from one pass of the model over ``ids``.

    Args:
      model_or_params: a :class:`~prinmix_jax.models.llama.modeling.CausalLM` or its param tree.
      config: the model config (taken from the model when omitted).
      ids: int token ids ``(num_sequences, seq_len)`` (see :func:`tokenize_calibration`).
      chunk_size: sequences per jitted step (rounded up to a multiple of the data-axis size).
      mesh: optional device mesh; the batch is sharded over ``data_axis`` (default: its first axis).
      data_axis: mesh axis for the batch.

    Returns:
      One :class:`BlockHessians` per decoder block, ``H = Σ x xᵀ / N`` with N = num_sequences * seq_len.
    """
    params, config = _split(model_or_params, config)
    ids = _check_ids(ids, config)
    ch = _Chunker(ids.shape[0], chunk_size, mesh, data_axis)
    params = ch.replicate(params)
    acc = ch.replicate([_zeros_acc(config) for _ in range(config.num_layers)])
    for _, w, (ids_c,) in ch.chunks(ids):
        acc = _parallel_step(acc, params, ids_c, w, config)
    return [_finish(a, ids.size) for a in acc]


# ----- sequential building blocks ----------------------------------------------------------------
def embed(params: dict, config: ModelConfig, ids) -> jax.Array:
    """Token ids ``(B, T)`` -> block-0 input hidden states ``(B, T, D)`` in the embedding dtype.

    Args:
      params: a param tree, or any dict holding ``{"embed_tokens": {"weight": [V, D]}}``.
    """
    ids = _check_ids(ids, config)
    return jnp.take(params["embed_tokens"]["weight"], jnp.asarray(ids), axis=0)


def _run_block(block_params, config, hidden, layer, positions, chunk_size, mesh, data_axis, capture):
    if hidden.ndim != 3 or hidden.shape[-1] != config.hidden_size:
        raise ValueError(f"hidden states must be (B, T, {config.hidden_size}), got {hidden.shape}")
    if not 0 <= layer < config.num_layers:
        raise ValueError(f"layer {layer} out of range for {config.num_layers} blocks")
    b, t, _ = hidden.shape
    if positions is None:
        positions = np.broadcast_to(np.arange(t, dtype=np.int32), (b, t))
    ch = _Chunker(b, chunk_size, mesh, data_axis)
    block_params = ch.replicate(block_params)
    acc = ch.replicate(_zeros_acc(config) if capture else {})
    outs = []
    for rows, w, (x_c, p_c) in ch.chunks(hidden, jnp.asarray(positions)):
        acc, y = _block_step(acc, block_params, x_c, p_c, w, config, _representative_layer(config, layer), capture)
        outs.append(y[:rows])
    nxt = jnp.concatenate(outs) if len(outs) > 1 else outs[0]
    return nxt, (_finish(acc, b * t) if capture else None)


def block_forward(block_params: dict, config: ModelConfig, hidden, *, layer: int, positions=None,
                  chunk_size: int = 8, mesh: Mesh | None = None, data_axis: str | None = None) -> jax.Array:
    """Run decoder block ``layer`` (given its param subtree) on hidden states ``(B, T, D)``.

    Args:
      block_params: ``params["layers"][layer]`` or :func:`~prinmix_jax.models.hf_io.read_block` output,
        possibly with compressed linears.
      config: the model config.
      hidden: block input ``(B, T, D)``.
      layer: block index (selects the sliding window of that layer).
      positions: optional int positions ``(B, T)``; default ``arange(T)``.
      chunk_size, mesh, data_axis: as in :func:`collect_hessians`.

    Returns:
      The block output ``(B, T, D)``.
    """
    return _run_block(block_params, config, hidden, layer, positions, chunk_size, mesh, data_axis, False)[0]


def block_forward_with_hessians(block_params: dict, config: ModelConfig, hidden, *, layer: int, positions=None,
                                chunk_size: int = 8, mesh: Mesh | None = None, data_axis: str | None = None
                                ) -> tuple[jax.Array, BlockHessians]:
    """Run block ``layer`` on ``hidden`` and accumulate its four input Hessians.

    Arguments as in :func:`block_forward`. Returns ``(block output (B, T, D), BlockHessians)`` with
    N = B * T.
    """
    return _run_block(block_params, config, hidden, layer, positions, chunk_size, mesh, data_axis, True)


_logits_step = jax.jit(logits_from_params, static_argnums=0)


def final_logits(params: dict, config: ModelConfig, hidden) -> jax.Array:
    """Final RMSNorm and output head on the last block's output: ``(B, T, D) -> (B, T, V)``.

    Args:
      params: a param tree, or any dict holding ``embed_tokens``, ``norm`` (and ``lm_head`` when untied).
    """
    globals_ = {k: params[k] for k in ("embed_tokens", "norm", "lm_head") if k in params}
    return _logits_step(config, globals_, hidden)


def collect_hessians_sequential(
        params_or_reader, config: ModelConfig, ids, *,
        update_block: Callable[[int, dict, BlockHessians], dict] | None = None,
        chunk_size: int = 8, mesh: Mesh | None = None, data_axis: str | None = None,
        dtype=None) -> list[BlockHessians]:
    """Sequential mode: block i's Hessians come from inputs that passed through blocks 0..i-1 *after*
    ``update_block`` (e.g. compression) was applied to them.

    Args:
      params_or_reader: a param tree, or a :class:`~prinmix_jax.models.hf_io.CheckpointReader` from which
        blocks are streamed one at a time (peak memory about one block plus the hidden states).
      config: the model config.
      ids: int token ids ``(num_sequences, seq_len)``.
      update_block: ``f(layer, block_params, hessians) -> new block_params`` run on each block before its
        output is propagated; None keeps the block (then the result equals :func:`collect_hessians`).
      chunk_size, mesh, data_axis: as in :func:`collect_hessians`.
      dtype: cast streamed blocks to this dtype (reader only).

    Returns:
      One :class:`BlockHessians` per block.
    """
    from prinmix_jax.models.hf_io import CheckpointReader

    reader = params_or_reader if isinstance(params_or_reader, CheckpointReader) else None
    if reader is not None:
        h = embed({"embed_tokens": {"weight": jnp.asarray(reader.read("model.embed_tokens.weight", dtype))}},
                  config, ids)
    else:
        h = embed(params_or_reader, config, ids)
    out = []
    for i in range(config.num_layers):
        block = reader.read_block(i, dtype) if reader is not None else params_or_reader["layers"][i]
        h_next, hess = block_forward_with_hessians(block, config, h, layer=i, chunk_size=chunk_size, mesh=mesh,
                                                   data_axis=data_axis)
        out.append(hess)
        if update_block is not None:
            block = update_block(i, block, hess)
            h_next = block_forward(block, config, h, layer=i, chunk_size=chunk_size, mesh=mesh,
                                   data_axis=data_axis)
        h = h_next
    return out
