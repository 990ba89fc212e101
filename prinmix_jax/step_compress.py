"""One step of a compress run: the deltas of a step's tensors, the compression of its matrices (same-shape
matrices that share an input Hessian as one stack), and writing the step (every process writes what it
compressed; see :mod:`prinmix_jax.distributed` for who owns what)."""
from __future__ import annotations

from typing import NamedTuple

import jax
import numpy as np

from prinmix_jax.compress import compress_stack
from prinmix_jax.delta_tree import entry_name, get_path
from prinmix_jax.distributed import allgather_json, owner
from prinmix_jax.models import HESSIAN_FOR_LINEAR, LINEAR_NAMES
from prinmix_jax.storage import DenseEntry, MatrixEntry, ZeroEntry, encode_step, owned_tree

__all__ = ["StepItem", "step_items", "dense_entry", "compress_entries", "save_step"]

_INFO_KEYS = ("rel_output_error", "budget_bits", "nbytes", "seconds", "solver", "allocation_seconds",
              "seconds_error_table", "seconds_u", "v_damp", "u_damp", "rtc_damp")


class StepItem(NamedTuple):
    """A matrix of a step to compress: its entry name, delta ``(m, n)`` float32, input Hessian (or None:
    data-free) and the Hessian's key (matrices are stacked only with the same shape and key)."""
    name: str
    delta: np.ndarray
    hessian: np.ndarray | None
    hessian_key: str


def dense_entry(delta: np.ndarray, mode: str, store_dtype: str):
    """The storage entry of a parameter that is not compressed (``mode``: ``"store"`` or ``"skip"``)."""
    if not np.any(delta):
        return ZeroEntry(delta.shape)
    if mode == "skip":
        return DenseEntry("skip", delta.shape, max_abs=float(np.max(np.abs(delta))))
    return DenseEntry("store", delta.shape, array=delta.astype(store_dtype))


def step_items(table, base_tree: dict, ft_tree: dict, policy, hessians=None) -> tuple[list[StepItem], dict]:
    """Splits a step's deltas into the matrices to compress and the dense entries, by ``policy``.

    Args:
      table: the step's ``(path, kind)`` list (:func:`~prinmix_jax.delta_tree.param_groups`).
      base_tree, ft_tree: the step's base and fine-tuned params (float32 NumPy).
      policy: the run's :class:`~prinmix_jax.policy.ParamPolicy`.
      hessians: the block's calibration Hessians (``{key: (n, n)}``) or None (data-free, and the globals).

    Returns:
      ``(items, dense)``: the matrices, block linears in forward order (the order fixes which process
      compresses which), and ``{"a/b": DenseEntry | ZeroEntry}``.
    """
    items, dense = [], {}
    for path, kind in table:
        d = np.asarray(get_path(ft_tree, path), np.float32) - np.asarray(get_path(base_tree, path), np.float32)
        if kind == "linear":
            hk = HESSIAN_FOR_LINEAR[path[-2]]
            items.append(StepItem(path[-2], d, None if hessians is None else np.asarray(hessians[hk], np.float32),
                                  hk))
        elif getattr(policy, kind) == "compress":      # embedding / output head: data-free
            items.append(StepItem(entry_name(path), d, None, "none"))
        else:
            dense["/".join(path)] = dense_entry(d, getattr(policy, kind), policy.store_dtype)
    order = {n: i for i, n in enumerate(LINEAR_NAMES)}
    items.sort(key=lambda it: order.get(it.name, len(order)))   # stable: the globals keep the table's order
    return items, dense


def _json_info(info: dict, cm) -> dict:
    out = {}
    for k in _INFO_KEYS:
        if k in info and info[k] is not None:
            v = info[k]
            out[k] = v if isinstance(v, str) else float(v)
    out["rank"] = None if cm.rank is None else int(cm.rank)
    if cm.bits is not None:
        u, c = np.unique(np.asarray(cm.bits), return_counts=True)
        out["widths"] = {str(int(b)): int(n) for b, n in zip(u, c)}
    return out


def compress_entries(items: list[StepItem], config, method: str, mesh, step: int, widths=None,
                     u_ranks=None) -> dict:
    """Compresses this process's share of a step's ``items``; returns ``{name: MatrixEntry | ZeroEntry}`` in
    ``items`` order.

    ``widths``: optional ``{name: (r,) widths}`` from a global allocation; ``u_ranks`` then maps every
    linear name to its largest kept rank over the model, and each shape's U step is padded to the largest
    of its names (one set of U programs per shape for the whole model).
    """
    me = jax.process_index()
    entries, groups = {}, {}
    for j, it in enumerate(items):
        if owner(step, j) != me:
            continue
        if not np.any(it.delta):
            entries[it.name] = ZeroEntry(it.delta.shape, {"rel_output_error": 0.0, "nbytes": 0})
            continue
        groups.setdefault((it.delta.shape, it.hessian_key), []).append(it)
    for members in groups.values():
        shape = members[0].delta.shape
        hs = None if members[0].hessian is None else np.stack([m.hessian for m in members])
        ws = None if widths is None else [widths[m.name] for m in members]
        ur = None if u_ranks is None else max(u_ranks.get(it.name, 0) for it in items if it.delta.shape == shape)
        results = compress_stack(np.stack([m.delta for m in members]), hs, config, method, mesh=mesh, widths=ws,
                                 u_rank=ur, return_info=True)
        for m, (cm, info) in zip(members, results):
            entries[m.name] = MatrixEntry(cm, _json_info(info, cm))
    return {it.name: entries[it.name] for it in items if it.name in entries}


def save_step(store, step: int, items: list[StepItem], local: dict, dense: dict, extra_meta: dict) -> dict:
    """Writes one step: this process's ``local`` linear entries (of the ordered ``items``) and the dense
    deltas; every process writes the arrays it owns. Returns the complete step metadata."""
    arrays, meta = encode_step(local, dense)
    merged = {}
    for part in allgather_json(meta["linears"]):
        merged.update(part)
    meta["linears"] = {it.name: merged[it.name] for it in items}
    meta["nbytes"] = int(sum(e["nbytes"] for e in meta["linears"].values())
                         + sum(e["nbytes"] for e in meta["dense"].values()))
    meta.update(extra_meta)
    owners = {("linears", it.name): owner(step, j) for j, it in enumerate(items)}
    owners.update({("dense", path): owner(step, len(items) + k) for k, path in enumerate(dense)})
    store.save(step, owned_tree(arrays, meta, lambda kind, name: owners[kind, name], jax.process_index()), meta)
    return meta
