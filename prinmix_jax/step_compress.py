"""One step of a compress run: the deltas of a step's tensors, the compression of its matrices (same-shape
matrices that share an input Hessian as one stack), and writing the step (every process writes what it
compressed; see :mod:`prinmix_jax.distributed` for who owns what), and how a step's (or a window of
blocks') stack SVDs and GPTQ set-ups are started together on a mesh of several devices. The SVDs kept between the global
scope's two passes live in :mod:`prinmix_jax.svd_store`."""
from __future__ import annotations

import contextlib
from typing import NamedTuple

import jax
import numpy as np

from prinmix_jax.compress import compress_stack, svd_request
from prinmix_jax.core.factors import factor_settings, prefetch_factors, using_prefetched_factors
from prinmix_jax.core.mesh import default_mesh, on_cpu
from prinmix_jax.core.svd import (active_prefetched, prefetch_svds, reusing_svds, svd_settings,
                                  using_prefetched_svds)
from prinmix_jax.delta_tree import entry_name, get_path, is_zero, materialise
from prinmix_jax.distributed import allgather_json, owner
from prinmix_jax.methods import get_method
from prinmix_jax.methods.shared import gptq_kw
from prinmix_jax.models import HESSIAN_FOR_LINEAR, LINEAR_NAMES
from prinmix_jax.storage import DenseEntry, MatrixEntry, ZeroEntry, encode_step, owned_tree
from prinmix_jax.svd_store import svd_key

__all__ = ["StepItem", "step_items", "with_hessians", "split_deltas", "dense_entry", "compress_entries", "owned_stacks", "svd_stacks",
           "spread_factors", "started_together", "save_step"]

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
    deltas = {tuple(path): np.asarray(get_path(ft_tree, path), np.float32)
              - np.asarray(get_path(base_tree, path), np.float32) for path, _ in table}
    return split_deltas(table, deltas, policy, hessians)


def with_hessians(items: list[StepItem], hessians: dict) -> list[StepItem]:
    """``items`` with their block's calibration Hessians (``{key: (n, n)}``, e.g. on a device) as float32 host
    arrays, one per key: q, k and v share one array (one host copy, and one GPTQ set-up,
    :func:`~prinmix_jax.core.factors.stack_factors`)."""
    host = {k: np.asarray(hessians[k], np.float32) for k in dict.fromkeys(it.hessian_key for it in items)}
    return [it._replace(hessian=host[it.hessian_key]) for it in items]


def split_deltas(table, deltas: dict, policy, hessians=None) -> tuple[list[StepItem], dict]:
    """:func:`step_items` of deltas already taken: ``deltas`` maps each path of ``table`` to its float32
    delta or a :class:`~prinmix_jax.delta_tree.DeferredDelta` (read when compressed; read now if stored
    dense). The dict is emptied, so that its caller holds no second reference."""
    items, dense = [], {}
    for path, kind in table:
        d = deltas.pop(tuple(path))
        if kind == "linear":
            hk = HESSIAN_FOR_LINEAR[path[-2]]
            items.append(StepItem(path[-2], d, None if hessians is None else np.asarray(hessians[hk], np.float32),
                                  hk))
        elif getattr(policy, kind) == "compress":      # embedding / output head: data-free
            items.append(StepItem(entry_name(path), d, None, "none"))
        else:
            dense["/".join(path)] = dense_entry(materialise(d), getattr(policy, kind), policy.store_dtype)
        del d
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
                     u_ranks=None, svd_store=None) -> dict:
    """Compresses this process's share of a step's ``items``; returns ``{name: MatrixEntry | ZeroEntry}`` in
    ``items`` order.

    ``widths``: optional ``{name: (r,) widths}`` from a global allocation; ``u_ranks`` then maps every
    linear name to its largest kept rank over the model, and each shape's U step is padded to the largest
    of its names (one set of U programs per shape for the whole model). ``svd_store``: an
    :class:`~prinmix_jax.svd_store.SVDStore` holding SVDs of the first pass, keyed ``"{block}/{name}"`` (decoder blocks only).
    An item's delta may be a :class:`~prinmix_jax.delta_tree.DeferredDelta`: it is read right before its
    stack is compressed and dropped after, so no large delta waits while another is compressed.
    """
    entries, chunks = owned_stacks(items, step, mesh)
    store = svd_store if step > 0 else None
    # On several devices the stacks' SVDs and GPTQ set-ups start together (started_together): their deltas are
    # read up front and held. On one device, one stack's deltas at a time. A caller that started this step's
    # with other steps' (a window of blocks) leaves them active: they stay.
    together = (started_together(svd_stacks(chunks, step, widths), config, method, mesh, store)
                if active_prefetched() is None else contextlib.nullcontext({}))
    with together as held:
        for c, members in enumerate(chunks):
            shape = members[0].delta.shape
            hs = None if members[0].hessian is None else [m.hessian for m in members]
            ws = None if widths is None else [widths[m.name] for m in members]
            ur = None if u_ranks is None else max(u_ranks.get(it.name, 0) for it in items
                                                  if it.delta.shape == shape)
            keys = [svd_key(step - 1, m.name) for m in members]
            deltas = held.pop(c, None) or [materialise(m.delta) for m in members]   # a deferred delta is read now
            with reusing_svds(store, keys):
                results = compress_stack(deltas, hs, config, method, mesh=mesh, widths=ws, u_rank=ur,
                                         return_info=True)
            del deltas
            for m, (cm, info) in zip(members, results):
                entries[m.name] = MatrixEntry(cm, _json_info(info, cm))
    return {it.name: entries[it.name] for it in items if it.name in entries}


def preload_kept_svds(store, items: list[StepItem], step: int, mesh, config, method: str, widths=None,
                      calibrated: bool = False) -> None:
    """Reads the SVDs ``store`` kept for this process's stacks of a decoder block's ``items`` into memory
    (:meth:`~prinmix_jax.svd_store.SVDStore.preload`; a no-op in the first pass or without a store). ``items`` may still lack their
    Hessians: which SVD a stack takes depends only on whether it has them (``calibrated``)."""
    if store is None or step == 0:
        return
    for keys, deltas, _, ws in svd_stacks(owned_stacks(items, step, mesh)[1], step, widths):
        kw = svd_request(deltas, ["pending"] * len(deltas) if calibrated else None, config, method, widths=ws)
        if kw is not None:
            store.preload(keys, svd_settings(**kw))


def owned_stacks(items: list[StepItem], step: int, mesh) -> tuple[dict, list[list[StepItem]]]:
    """This process's share of a step's ``items``: ``({name: ZeroEntry}`` of its all-zero deltas, the stacks
    :func:`compress_entries` compresses the others in``)`` (same shape and Hessian key, :func:`stack_chunks`)."""
    me = jax.process_index()
    zeros, groups = {}, {}
    for j, it in enumerate(items):
        if owner(step, j) != me:
            continue
        if is_zero(it.delta):
            zeros[it.name] = ZeroEntry(it.delta.shape, {"rel_output_error": 0.0, "nbytes": 0})
            continue
        groups.setdefault((it.delta.shape, it.hessian_key), []).append(it)
    return zeros, [chunk for group in groups.values() for chunk in stack_chunks(group, mesh)]


def svd_stacks(chunks: list[list[StepItem]], step: int, widths=None) -> list:
    """The ``stacks`` argument of :func:`spread_stack_svds` for a step's :func:`owned_stacks`."""
    return [([svd_key(step - 1, m.name) for m in members], [m.delta for m in members],
             None if members[0].hessian is None else [m.hessian for m in members],
             None if widths is None else [widths[m.name] for m in members]) for members in chunks]


#: Whether the SVDs of a step's (or a block's) stacks start together on a mesh of several devices
#: (:func:`spread_stack_svds`). Off, each stack's SVDs run when its turn comes (the same bytes).
SPREAD_SVDS = True


def spreads_svds(mesh) -> bool:
    """Whether stacks' SVDs start together on ``mesh`` (:data:`SPREAD_SVDS`, several devices)."""
    return SPREAD_SVDS and default_mesh(mesh).size > 1


#: On a mesh of several devices the SVDs of this many blocks start together (the global scope's first pass;
#: the steps of :func:`~prinmix_jax.run.run_steps` unless calibration is sequential): one block's 7 matrices
#: of unequal cost leave 8 devices idle 34–56% of its SVD time, four blocks' 28 fill them to 91–100%
#: (docs/benchmarks.md). It holds that many blocks' deltas on the host (0.8 GB per Llama-2-7B block; with
#: calibration their Hessians too).
SVD_WINDOW_BLOCKS = 4


#: Whether :func:`svd_window` holds several blocks on a mesh of *CPU* devices. Off: simulated CPU devices share
#: the host's cores, so the window would only add host memory (the SVDs' too); tests turn it on.
WINDOW_ON_CPU = False


def svd_window(mesh) -> int:
    """How many blocks' SVDs start together on ``mesh``: :data:`SVD_WINDOW_BLOCKS` on several accelerators
    (or CPU devices with :data:`WINDOW_ON_CPU`), else 1."""
    if not spreads_svds(mesh):
        return 1
    if on_cpu(mesh) and not WINDOW_ON_CPU:
        return 1
    return max(1, SVD_WINDOW_BLOCKS)


#: Whether decoder blocks are read ahead (:func:`read_ahead_blocks`) on a mesh of *CPU* devices. Off: there
#: the reading thread competes with the computation for the same cores and holds one more block; tests turn
#: it on.
READ_AHEAD_ON_CPU = False


def read_ahead_blocks(mesh, window: int = 1) -> int:
    """How many decoder blocks a pass reads ahead in a thread (:func:`~prinmix_jax.sources.read_ahead`)
    while the devices work on the blocks before: one window of blocks on accelerators (the next window's
    reads overlap the current window's compression), none on CPU devices (:data:`READ_AHEAD_ON_CPU`)."""
    if on_cpu(mesh) and not READ_AHEAD_ON_CPU:
        return 0
    return max(1, int(window))


def spread_stack_svds(stacks, config, method: str, mesh, store=None) -> tuple[dict, dict]:
    """On a mesh of several devices, starts the SVDs of several stacks at once
    (:func:`~prinmix_jax.core.svd.prefetch_svds`: each stack on devices of its own), so that a Llama block's
    q,k,v · o · gate,up · down stacks, 1–3 matrices each, keep the devices busy together instead of one
    after the other. Stacks whose SVDs ``store`` already holds, that take no plain SVD, or of matrices of
    :data:`STACK_SPLIT_BYTES` or more (whose host memory stays one stack's) are left alone.

    Args:
      stacks: ``[(keys, deltas, hessians, widths)]`` per stack: :func:`svd_key` keys, the deltas (arrays or
        :class:`~prinmix_jax.delta_tree.DeferredDelta`), Hessians and given widths (or ``None``).
      config, method, mesh: as for :func:`~prinmix_jax.compress.compress_stack`.
      store: the :class:`~prinmix_jax.svd_store.SVDStore` the stacks' SVDs go through, or ``None``.

    Returns:
      ``(held, prefetched)``: ``{stack index: deltas read}`` (read up front; pass them on rather than read
      them again) and the started SVDs for :func:`~prinmix_jax.core.svd.using_prefetched_svds`; both empty
      on one device, with :data:`SPREAD_SVDS` off, or with fewer than two stacks to start.
    """
    mesh = default_mesh(mesh)
    if not spreads_svds(mesh) or len(stacks) < 2:
        return {}, {}
    held, requests = {}, []
    for c, (keys, deltas, hs, ws) in enumerate(stacks):
        if 4 * int(np.prod(deltas[0].shape)) >= STACK_SPLIT_BYTES:   # embedding-sized: read one stack at a time
            continue
        kw = svd_request(deltas, hs, config, method, widths=ws)      # from shapes: nothing is read for it
        if kw is None or len(keys) > mesh.size or (store is not None and store.holds(keys, svd_settings(**kw))):
            continue
        held[c] = [materialise(d) for d in deltas]
        requests.append(([(k, svd_settings(**kw)) for k in keys], np.stack(held[c]), kw))
    if len(requests) < 2:
        return held, {}
    return held, prefetch_svds(requests, mesh)


#: Whether the GPTQ set-ups of a step's (or a window's) calibration Hessians start together on a mesh of several
#: devices (:func:`spread_factors`). Off, each stack factors its own Hessians when its turn comes (the same bytes).
SPREAD_FACTORS = True


def spread_factors(stacks, config, method: str, mesh, store=None) -> list:
    """On a mesh of several devices, starts the GPTQ set-ups of the stacks' Hessians at once, one distinct Hessian
    per device (:func:`~prinmix_jax.core.factors.prefetch_factors`), for
    :func:`~prinmix_jax.core.factors.using_prefetched_factors`: a 7B block's four (q,k,v · o · gate,up · down
    inputs), or a window's sixteen, side by side instead of one stack after another.

    Args:
      stacks: as for :func:`spread_stack_svds` (:func:`svd_stacks`); data-free stacks have nothing to factor.
      config, method: as for :func:`~prinmix_jax.compress.compress_stack`; nothing starts for a method that runs
        no GPTQ pass of V under the Hessians (:meth:`~prinmix_jax.methods.base.Method.v_passes_under_hessian`).
      mesh: the 1-D mesh.
      store: the :class:`~prinmix_jax.svd_store.SVDStore` of the global scope, or ``None``: a stack with given
        widths whose V passes it kept takes them instead (:func:`~prinmix_jax.methods.v_step.fixed_width_rows`).

    Returns:
      The started set-ups (empty on one device, with :data:`SPREAD_FACTORS` off, or with nothing to factor).
    """
    mesh = default_mesh(mesh)
    if not (SPREAD_FACTORS and spreads_svds(mesh) and get_method(method).v_passes_under_hessian()):
        return []
    hessians = [hs[0] for keys, _, hs, ws in stacks if hs is not None
                and not (ws is not None and store is not None and store.holds_passes(keys))]
    if not hessians:
        return []
    return prefetch_factors(hessians, factor_settings(config.damp, **gptq_kw(config)), mesh)


@contextlib.contextmanager
def started_together(stacks, config, method: str, mesh, store=None):
    """Starts the SVDs of ``stacks`` (:func:`spread_stack_svds`) and the GPTQ set-ups of their Hessians
    (:func:`spread_factors`) together on the mesh and, within the ``with`` block, lets the stacks' compression
    take them (:func:`~prinmix_jax.core.svd.using_prefetched_svds`,
    :func:`~prinmix_jax.core.factors.using_prefetched_factors`): a step's stacks, or a window of blocks'.

    Yields:
      ``{stack index: deltas read}`` (:func:`spread_stack_svds`' ``held``). The caller should hold ``stacks``
      no longer than needed to call this.
    """
    held, prefetched = spread_stack_svds(stacks, config, method, mesh, store)
    factors = spread_factors(stacks, config, method, mesh, store)
    del stacks       # (nor here: a block's deltas are dropped as its stacks are done, not when the window ends)
    with using_prefetched_svds(prefetched), using_prefetched_factors(factors):
        yield held


#: Matrices of at least this many float32 bytes (a 7B embedding: 0.5 GB) go to :func:`compress_stack` at most
#: one per device at a time: stacking them saves no time and multiplies the peak host memory of the SVD,
#: the error tables and the U step.
STACK_SPLIT_BYTES = 256 << 20


def stack_chunks(members: list, mesh) -> list[list]:
    """A same-shape group of step items as the stacks :func:`compress_entries` compresses: all together, or,
    for matrices of :data:`STACK_SPLIT_BYTES` or more, as many per stack as the mesh has devices (each
    matrix's result does not depend on its stack)."""
    if members[0].delta.nbytes < STACK_SPLIT_BYTES:
        return [members]
    size = max(1, jax.device_count() if mesh is None else mesh.size)
    return [members[i:i + size] for i in range(0, len(members), size)]


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
