"""The slot layout of a :class:`~prinmix_jax.serving.DeltaBank`: every delta of the bank occupies one slot of
fixed-shape device arrays, so adding or removing a delta rewrites a slot and never changes a shape (no
recompilation).

Per compressed linear (``"<block>/<name>"``, ``"embed_tokens"``, ``"lm_head"``) the bank holds one tree:

* ``mode="packed"`` (the stored form): one group per width ``w`` (1–8) with the arrays of
  :class:`~prinmix_jax.formats.SVDQuantDelta` stacked over slots and padded to a rank capacity ``c_w``:
  ``v_codes (S, c_w, w·⌈n/8⌉) uint8``, ``v_scale``/``v_zero (S, c_w, ⌈n/g⌉)``, the same for ``Ûᵀ`` rows
  (``u_*``, length m) and ``sigma (S, c_w) float32`` (0 on padding rows, so they add exactly nothing). A
  :class:`~prinmix_jax.formats.LowRankDelta` goes into group ``16`` (``v``, ``u`` float16, sigma 1).
* ``mode="factors"``: the dequantised factors ``v (S, R, n)``, ``u (S, R, m)`` (``Ûᵀ``) in the factor dtype
  and ``sigma (S, R) float32``, padded to a rank capacity R.

Norm and bias deltas are dense ``(S, *shape) float32`` arrays. Slot 0 is all zeros: the base itself.
A capacity is the largest rank any layer of that linear needs among the deltas the bank was sized for,
rounded up to a multiple of ``rank_multiple``; a later delta that needs more raises
:class:`SlotCapacityError` (size the bank for it: :meth:`DeltaBank.from_deltas` with every delta, or
``rank_capacity``).
"""
from __future__ import annotations

import math

import numpy as np

from prinmix_jax.delta_tree import param_groups
from prinmix_jax.formats import LowRankDelta, SignDelta, SVDQuantDelta
from prinmix_jax.models.llama.params import LINEAR_NAMES, block_param_table, global_param_table

__all__ = ["SlotCapacityError", "UnsupportedDeltaError", "delta_entries", "linear_shapes", "capacities",
           "empty_state", "slot_arrays"]

LOWRANK_GROUP = 16


class SlotCapacityError(ValueError):
    """A delta needs a larger rank (or another width) than the bank's slots were sized for."""


class UnsupportedDeltaError(ValueError):
    """A delta the bank cannot serve factored (a BitDelta sign matrix, a dense embedding delta)."""


def linear_shapes(cfg) -> dict[str, tuple[int, int]]:
    """``{key: (m, n)}`` of every linear the bank can hold a delta for (``"<b>/<name>"``, embeddings, head)."""
    shapes = {}
    d, f, q, kv = cfg.hidden_size, cfg.intermediate_size, cfg.q_dim, cfg.kv_dim
    per = {"q_proj": (q, d), "k_proj": (kv, d), "v_proj": (kv, d), "o_proj": (d, q), "gate_proj": (f, d),
           "up_proj": (f, d), "down_proj": (d, f)}
    for b in range(cfg.num_layers):
        for name in LINEAR_NAMES:
            shapes[f"{b}/{name}"] = per[name]
    shapes["embed_tokens"] = (cfg.vocab_size, d)
    if not cfg.tie_word_embeddings:
        shapes["lm_head"] = (cfg.vocab_size, d)
    return shapes


def dense_shapes(cfg) -> dict[str, tuple]:
    """``{key: shape}`` of the norm and bias tensors (``"<b>/input_layernorm/weight"``, ``"norm/weight"``)."""
    block, glob = param_groups(cfg)
    bshape = {p: s for _, p, s in block_param_table(cfg)}
    gshape = {p: s for _, p, s in global_param_table(cfg)}
    shapes = {}
    for b in range(cfg.num_layers):
        for p, kind in block:
            if kind in ("norms", "biases"):
                shapes[f"{b}/" + "/".join(p)] = bshape[p]
    for p, kind in glob:
        if kind in ("norms", "biases"):
            shapes["/".join(p)] = gshape[p]
    return shapes


def _kind_name(key: str) -> str:
    return key.split("/")[-1]


def delta_entries(delta, cfg, name: str = "delta") -> tuple[dict, dict]:
    """A delta checkpoint as ``({linear key: CompressedMatrix}, {dense key: float32 array})`` (zero entries
    left out).

    Raises:
      UnsupportedDeltaError: a BitDelta matrix, or a dense (stored, not compressed) embedding / head delta.
    """
    linears, dense = {}, {}
    steps = [(None, delta.globals())] + [(b, delta.block(b)) for b in range(delta.num_blocks)]
    for b, bd in steps:
        prefix = "" if b is None else f"{b}/"
        for lname, cm in bd.linears.items():
            if cm is None:
                continue
            if isinstance(cm, SignDelta):
                raise UnsupportedDeltaError(
                    f"delta {name!r}: {prefix}{lname} is a BitDelta sign matrix (full rank); the bank serves "
                    "low-rank deltas (methods prinmix, deltacome, uniform, lowrank); merge it with prinmix apply")
            linears[prefix + lname] = cm
        for path, arr in bd.dense.items():
            if arr is None:
                continue
            if path.split("/")[0] in ("embed_tokens", "lm_head"):
                raise UnsupportedDeltaError(
                    f"delta {name!r} stores a dense {path} delta (compressed with --embeddings/--lm-head store); "
                    "the bank serves embedding and head deltas that are compressed or skipped")
            dense[prefix + path] = np.asarray(arr, np.float32)
    return linears, dense


def _groups(cm) -> dict[int, int]:
    """``{width: rank}`` of one compressed matrix (width 16: a float16 low-rank delta)."""
    if isinstance(cm, LowRankDelta):
        return {LOWRANK_GROUP: cm.rank}
    return {int(b): int(np.asarray(s).shape[0]) for b, s in zip(cm.group_bits, cm.sigma)}


def _round(k: int, multiple: int) -> int:
    return int(math.ceil(k / multiple) * multiple) if k else 0


def capacities(entry_sets, cfg, mode: str, rank_multiple: int = 1, rank_capacity: int | None = None) -> dict:
    """Rank capacity per linear kind (``"q_proj"``, ..., ``"embed_tokens"``, ``"lm_head"``): ``{kind: {width:
    c}}`` (packed) or ``{kind: {0: R}}`` (factors), the largest rank needed over layers and deltas, rounded
    up to ``rank_multiple``, at least ``rank_capacity`` for every width already needed."""
    cap: dict = {}
    for linears in entry_sets:
        for key, cm in linears.items():
            need = _groups(cm) if mode == "packed" else {0: int(cm.rank)}
            c = cap.setdefault(_kind_name(key), {})
            for w, k in need.items():
                c[w] = max(c.get(w, 0), k)
    return {kind: {w: max(_round(k, rank_multiple), rank_capacity or 0) for w, k in sorted(c.items())}
            for kind, c in cap.items()}


def _group_arrays(w: int, c: int, m: int, n: int, g: int, slots: int) -> dict:
    if w == LOWRANK_GROUP:
        return {"v": np.zeros((slots, c, n), np.float16), "u": np.zeros((slots, c, m), np.float16),
                "sigma": np.zeros((slots, c), np.float32)}
    gn, gm = math.ceil(n / min(g or n, n)), math.ceil(m / min(g or m, m))
    return {"v_codes": np.zeros((slots, c, w * math.ceil(n / 8)), np.uint8),
            "v_scale": np.zeros((slots, c, gn), np.float16), "v_zero": np.zeros((slots, c, gn), np.uint8),
            "u_codes": np.zeros((slots, c, w * math.ceil(m / 8)), np.uint8),
            "u_scale": np.zeros((slots, c, gm), np.float16), "u_zero": np.zeros((slots, c, gm), np.uint8),
            "sigma": np.zeros((slots, c), np.float32)}


def empty_state(cfg, cap: dict, mode: str, slots: int, group_size: int, factor_dtype) -> dict:
    """Zero host arrays of every slot: ``{"linears": {key: {width: group}}, "dense": {key: (S, ...)}}``."""
    lin = {}
    for key, (m, n) in linear_shapes(cfg).items():
        c = cap.get(_kind_name(key), {})
        if mode == "packed":
            lin[key] = {str(w): _group_arrays(w, k, m, n, group_size, slots) for w, k in c.items()}
        else:
            r = c.get(0, 0)
            lin[key] = {"0": {"v": np.zeros((slots, r, n), factor_dtype), "u": np.zeros((slots, r, m), factor_dtype),
                              "sigma": np.zeros((slots, r), np.float32)}} if r else {}
    dense = {k: np.zeros((slots, *s), np.float32) for k, s in dense_shapes(cfg).items()}
    return {"linears": lin, "dense": dense}


def _check_group_size(key: str, cm, m: int, n: int, group_size: int, name: str) -> None:
    if not isinstance(cm, SVDQuantDelta) or not cm.sigma:
        return
    for length in (m, n):
        eff = min(cm.group_size or length, length)
        if eff != min(group_size or length, length):
            raise SlotCapacityError(f"delta {name!r}: {key} uses quantisation groups of {cm.group_size}, the bank's "
                                    f"slots hold groups of {group_size}; serve deltas of one --group-size together")


def _fill_linear(key, cm, cap_groups: dict, m: int, n: int, mode: str, factor_dtype, name: str) -> dict:
    """One linear's arrays for one slot (no slot axis), padded to the capacities; raises SlotCapacityError."""
    out = {}
    need = _groups(cm) if mode == "packed" else {0: int(cm.rank)}
    for w, k in need.items():
        if k > cap_groups.get(w, 0):
            what = f"rank {k} at {w} bits" if mode == "packed" else f"rank {k}"
            raise SlotCapacityError(
                f"delta {name!r}: {key} needs {what} but the bank's slots hold {cap_groups.get(w, 0)}; build the bank "
                "with this delta among its initial ones (DeltaBank.from_deltas / prinmix serve --delta) or a larger "
                "rank_capacity")
    if mode == "factors":
        r = cap_groups[0]
        u, s, v = (np.asarray(a, np.float32) for a in cm.factors())
        k = s.shape[0]
        out["0"] = {"v": np.zeros((r, n), factor_dtype), "u": np.zeros((r, m), factor_dtype),
                    "sigma": np.zeros((r,), np.float32)}
        out["0"]["v"][:k], out["0"]["u"][:k], out["0"]["sigma"][:k] = v, u.T, s
        return out
    if isinstance(cm, LowRankDelta):
        c = cap_groups[LOWRANK_GROUP]
        grp = {"v": np.zeros((c, n), np.float16), "u": np.zeros((c, m), np.float16),
               "sigma": np.zeros((c,), np.float32)}
        grp["v"][:cm.rank], grp["u"][:cm.rank], grp["sigma"][:cm.rank] = np.asarray(cm.v), np.asarray(cm.us), 1.0
        return {str(LOWRANK_GROUP): grp}
    for i, w in enumerate(cm.group_bits):
        arrays = {"sigma": cm.sigma[i], "v_codes": cm.v_codes[i], "v_scale": cm.v_scale[i], "v_zero": cm.v_zero[i],
                  "u_codes": cm.u_codes[i], "u_scale": cm.u_scale[i], "u_zero": cm.u_zero[i]}
        grp = {}
        for f, a in arrays.items():
            a = np.asarray(a)
            z = np.zeros((cap_groups[int(w)], *a.shape[1:]), a.dtype)
            z[:a.shape[0]] = a
            grp[f] = z
        out[str(int(w))] = grp
    return out


def slot_arrays(cfg, cap: dict, mode: str, group_size: int, factor_dtype, entries: tuple[dict, dict],
                name: str = "delta") -> dict:
    """One slot's content (the :func:`empty_state` tree without the slot axis) for a delta's entries."""
    linears, dense = entries
    state = empty_state(cfg, cap, mode, 1, group_size, factor_dtype)
    state = {"linears": {k: {w: {f: a[0] for f, a in grp.items()} for w, grp in v.items()}
                         for k, v in state["linears"].items()},
             "dense": {k: a[0] for k, a in state["dense"].items()}}
    shapes = linear_shapes(cfg)
    for key, cm in linears.items():
        if key not in shapes:
            raise UnsupportedDeltaError(f"delta {name!r} holds a matrix {key!r} that this base has no slot for")
        m, n = shapes[key]
        if mode == "packed":
            _check_group_size(key, cm, m, n, group_size, name)
        state["linears"][key].update(_fill_linear(key, cm, cap.get(_kind_name(key), {}), m, n, mode, factor_dtype,
                                                  name))
    for key, arr in dense.items():
        if key not in state["dense"]:
            raise UnsupportedDeltaError(f"delta {name!r} holds a dense delta {key!r} that this base has no slot for")
        state["dense"][key] = arr.reshape(state["dense"][key].shape)
    return state
