"""Hugging Face tensor names <-> NNX param-tree paths, and access to the decoder-block linears.

The param tree is a nested dict in the NNX state layout of :class:`~.modeling.CausalLM`::

    {"embed_tokens": {"weight": [V, D]},
     "layers": {0: {"input_layernorm": {"weight": [D]},
                    "self_attn": {"q_proj": {"weight": [N*H, D], "bias": [N*H]?},
                                  "k_proj": {"weight": [K*H, D], "bias"?}, "v_proj": {...},
                                  "o_proj": {"weight": [D, N*H], "bias"?},
                                  "q_norm": {"weight": [H]}?, "k_norm": {"weight": [H]}?},
                    "post_attention_layernorm": {"weight": [D]},
                    "mlp": {"gate_proj": {"weight": [F, D]}, "up_proj": {"weight": [F, D]},
                            "down_proj": {"weight": [D, F]}}},       # biases only with mlp_bias
                1: {...}, ...},
     "norm": {"weight": [D]},
     "lm_head": {"weight": [V, D]}}                                   # absent when tied

Every linear ``weight`` is the Hugging Face ``[out, in]`` matrix, unchanged. The tables below are the whole
mapping (no regexes): ``model.layers.{i}.<suffix>`` for block tensors, and the three global tensors.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prinmix_jax.models.config import ModelConfig
from prinmix_jax.models.errors import CheckpointError

__all__ = [
    "LINEAR_NAMES", "HESSIAN_FOR_LINEAR", "linear_names", "linear_path", "hf_name", "block_param_table",
    "global_param_table", "expected_tensors", "get_linear", "set_linear", "iter_block_linears",
    "get_path", "set_path", "put_path", "num_blocks", "check_params", "check_block_params",
]

#: The seven decoder-block linears, in forward order.
LINEAR_NAMES: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

#: Which calibration Hessian (see :mod:`prinmix_jax.models.calibration`) belongs to each linear's input.
HESSIAN_FOR_LINEAR: dict[str, str] = {
    "q_proj": "attn_in", "k_proj": "attn_in", "v_proj": "attn_in", "o_proj": "o_in",
    "gate_proj": "mlp_in", "up_proj": "mlp_in", "down_proj": "down_in",
}

_LINEAR_PARENT = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
                  "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}


def linear_names() -> tuple[str, ...]:
    """The names of the decoder-block linears: q/k/v/o_proj, gate/up/down_proj."""
    return LINEAR_NAMES


def linear_path(name: str, kind: str = "weight") -> tuple[str, ...]:
    """Path of a linear's ``weight`` (or ``bias``) inside one block's param subtree.

    Example: ``linear_path("q_proj") == ("self_attn", "q_proj", "weight")``; the full-tree path is
    ``("layers", i) + linear_path(name)``.
    """
    if name not in _LINEAR_PARENT:
        raise ValueError(f"unknown linear {name!r}; expected one of {LINEAR_NAMES}")
    return (_LINEAR_PARENT[name], name, kind)


def hf_name(block: int, name: str, kind: str = "weight") -> str:
    """Hugging Face tensor name of a block linear, e.g. ``model.layers.3.self_attn.q_proj.weight``."""
    return f"model.layers.{block}." + ".".join(linear_path(name, kind))


def block_param_table(cfg: ModelConfig) -> list[tuple[str, tuple[str, ...], tuple[int, ...]]]:
    """``(hf_suffix, path_in_block, shape)`` of every tensor of one decoder block under ``cfg``.

    The HF name is ``f"model.layers.{i}.{hf_suffix}"``; the tree path is ``("layers", i) + path_in_block``.
    """
    d, f, q, kv, h = cfg.hidden_size, cfg.intermediate_size, cfg.q_dim, cfg.kv_dim, cfg.head_dim
    rows: list[tuple[str, tuple[int, ...], bool]] = [
        ("input_layernorm.weight", (d,), True),
        ("self_attn.q_proj.weight", (q, d), True),
        ("self_attn.q_proj.bias", (q,), cfg.qkv_bias),
        ("self_attn.k_proj.weight", (kv, d), True),
        ("self_attn.k_proj.bias", (kv,), cfg.qkv_bias),
        ("self_attn.v_proj.weight", (kv, d), True),
        ("self_attn.v_proj.bias", (kv,), cfg.qkv_bias),
        ("self_attn.o_proj.weight", (d, q), True),
        ("self_attn.o_proj.bias", (d,), cfg.o_bias),
        ("self_attn.q_norm.weight", (h,), cfg.qk_norm),
        ("self_attn.k_norm.weight", (h,), cfg.qk_norm),
        ("post_attention_layernorm.weight", (d,), True),
        ("mlp.gate_proj.weight", (f, d), True),
        ("mlp.gate_proj.bias", (f,), cfg.mlp_bias),
        ("mlp.up_proj.weight", (f, d), True),
        ("mlp.up_proj.bias", (f,), cfg.mlp_bias),
        ("mlp.down_proj.weight", (d, f), True),
        ("mlp.down_proj.bias", (d,), cfg.mlp_bias),
    ]
    return [(s, tuple(s.split(".")), shape) for s, shape, present in rows if present]


def global_param_table(cfg: ModelConfig) -> list[tuple[str, tuple[str, ...], tuple[int, ...]]]:
    """``(hf_name, tree_path, shape)`` of the tensors outside the decoder blocks."""
    rows = [("model.embed_tokens.weight", ("embed_tokens", "weight"), (cfg.vocab_size, cfg.hidden_size)),
            ("model.norm.weight", ("norm", "weight"), (cfg.hidden_size,))]
    if not cfg.tie_word_embeddings:
        rows.append(("lm_head.weight", ("lm_head", "weight"), (cfg.vocab_size, cfg.hidden_size)))
    return rows


def expected_tensors(cfg: ModelConfig) -> dict[str, tuple[tuple[Any, ...], tuple[int, ...]]]:
    """``{hf_name: (tree_path, shape)}`` for every tensor of a checkpoint of ``cfg``."""
    out = {n: (p, s) for n, p, s in global_param_table(cfg)}
    for i in range(cfg.num_layers):
        for suffix, path, shape in block_param_table(cfg):
            out[f"model.layers.{i}.{suffix}"] = (("layers", i) + path, shape)
    return out


def get_path(tree: dict, path: tuple) -> Any:
    """``tree[p0][p1]...``; raises ValueError naming the path when absent."""
    node = tree
    for i, p in enumerate(path):
        if not isinstance(node, dict) or p not in node:
            raise ValueError(f"param tree has no entry {'/'.join(map(str, path[:i + 1]))}")
        node = node[p]
    return node


def set_path(tree: dict, path: tuple, value: Any) -> dict:
    """A copy of ``tree`` with the leaf at ``path`` replaced; dicts along the path are shallow-copied,
    every other array is shared (no array is copied, ``tree`` is not modified)."""
    get_path(tree, path)
    if len(path) == 1:
        return {**tree, path[0]: value}
    return {**tree, path[0]: set_path(tree[path[0]], path[1:], value)}


def put_path(tree: dict, path: tuple, value: Any) -> None:
    """Sets the leaf at ``path`` of ``tree`` in place, making the dicts along it that are missing (how a tree
    is built one tensor at a time)."""
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = value


def num_blocks(params: dict) -> int:
    """Number of decoder blocks in a param tree."""
    return len(params["layers"])


def get_linear(params: dict, block: int | None, name: str) -> Any:
    """The ``[out, in]`` weight of linear ``name`` of ``block``.

    Args:
      params: a full param tree, or one block's subtree when ``block`` is None.
      block: block index, or None for a block subtree.
      name: one of :data:`LINEAR_NAMES`.
    """
    path = linear_path(name) if block is None else ("layers", block) + linear_path(name)
    return get_path(params, path)


def set_linear(params: dict, block: int | None, name: str, weight: Any) -> dict:
    """Return ``params`` with the ``[out, in]`` weight of ``name`` in ``block`` replaced (shape-checked).

    ``params`` itself is not modified; unchanged arrays are shared. ``block=None`` addresses a block subtree.
    """
    old = get_linear(params, block, name)
    if tuple(weight.shape) != tuple(old.shape):
        raise ValueError(f"new weight for block {block} {name} has shape {tuple(weight.shape)}, "
                         f"expected {tuple(old.shape)} ([out, in])")
    path = linear_path(name) if block is None else ("layers", block) + linear_path(name)
    return set_path(params, path, weight)


def iter_block_linears(params: dict) -> Iterator[tuple[int, str, Any]]:
    """Yield ``(block, name, weight[out, in])`` for every decoder-block linear, block by block in
    :data:`LINEAR_NAMES` order. Write results back with :func:`set_linear`."""
    for i in sorted(params["layers"]):
        for name in LINEAR_NAMES:
            yield i, name, get_linear(params, i, name)


def check_params(params: dict, cfg: ModelConfig) -> None:
    """Check that a param tree has exactly the tensors and shapes ``cfg`` implies.

    Raises:
      CheckpointError: naming the missing/extra tree path (and its HF tensor name) or the wrong shape.
    """
    expected = expected_tensors(cfg)
    by_path = {path: (name, shape) for name, (path, shape) in expected.items()}
    seen = set()
    for path, leaf in iter_leaves(params):
        if path not in by_path:
            raise CheckpointError(f"param tree has unexpected entry {'/'.join(map(str, path))} "
                                  f"(not part of a {cfg.architecture} with this config)")
        name, shape = by_path[path]
        if tuple(getattr(leaf, 'shape', ())) != shape:
            raise CheckpointError(f"param {'/'.join(map(str, path))} ({name}) has shape {tuple(getattr(leaf, 'shape', ()))}, "
                                  f"expected {shape}")
        seen.add(path)
    missing = [by_path[p][0] for p in by_path if p not in seen]
    if missing:
        raise CheckpointError(f"param tree lacks {len(missing)} tensor(s), e.g. {missing[:5]}")


def iter_leaves(tree, prefix=()):
    """Yields ``(path tuple, leaf)`` for every leaf of a nested dict."""
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from iter_leaves(v, prefix + (k,))
    else:
        yield prefix, tree


def check_block_params(block_params: dict, cfg: ModelConfig, block: int | None = None) -> None:
    """Like :func:`check_params` for one block's subtree (``block`` only labels the messages)."""
    where = "block" if block is None else f"block {block}"
    table = {path: shape for _, path, shape in block_param_table(cfg)}
    for path, leaf in iter_leaves(block_params):
        if path not in table:
            raise CheckpointError(f"{where} params have unexpected entry {'/'.join(map(str, path))}")
        if tuple(getattr(leaf, 'shape', ())) != table[path]:
            raise CheckpointError(f"{where} param {'/'.join(path)} has shape {tuple(getattr(leaf, 'shape', ()))}, "
                                  f"expected {table[path]}")
    missing = ["/".join(p) for p in table if p not in set(p for p, _ in iter_leaves(block_params))]
    if missing:
        raise CheckpointError(f"{where} params lack {missing}")
