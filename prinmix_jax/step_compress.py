"""One step of a compress run: the deltas of a step's tensors, the compression of its matrices (same-shape
matrices that share an input Hessian as one stack), and writing the step (every process writes what it
compressed; see :mod:`prinmix_jax.distributed` for who owns what), and :class:`SVDStore`, which keeps the
global scope's SVDs, and its error tables' GPTQ passes of V, between its two passes."""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import threading
import time
from typing import NamedTuple

import jax
import numpy as np

from prinmix_jax.compress import compress_stack, svd_request
from prinmix_jax.core.mesh import default_mesh
from prinmix_jax.core.svd import (active_prefetched, prefetch_svds, reusing_svds, svd_settings,
                                  using_prefetched_svds)
from prinmix_jax.delta_tree import entry_name, get_path, is_zero, materialise
from prinmix_jax.distributed import allgather_json, owner
from prinmix_jax.models import HESSIAN_FOR_LINEAR, LINEAR_NAMES
from prinmix_jax.storage import DenseEntry, MatrixEntry, ZeroEntry, encode_step, owned_tree

__all__ = ["StepItem", "step_items", "split_deltas", "dense_entry", "compress_entries", "owned_stacks", "svd_stacks",
           "save_step", "SVDStore", "SVD_DIR"]

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
    :class:`SVDStore` holding SVDs of the first pass, keyed ``"{block}/{name}"`` (decoder blocks only).
    An item's delta may be a :class:`~prinmix_jax.delta_tree.DeferredDelta`: it is read right before its
    stack is compressed and dropped after, so no large delta waits while another is compressed.
    """
    entries, chunks = owned_stacks(items, step, mesh)
    store = svd_store if step > 0 else None
    # On several devices the stacks' SVDs start together (each stack on devices of its own): their deltas are
    # read up front and held. On one device, one stack's deltas at a time. A caller that started this step's
    # SVDs with other steps' (:func:`spread_stack_svds` over a window of blocks) leaves them active: they stay.
    held, prefetched = {}, None
    if active_prefetched() is None:
        held, prefetched = spread_stack_svds(svd_stacks(chunks, step, widths), config, method, mesh, store)
    with contextlib.nullcontext() if prefetched is None else using_prefetched_svds(prefetched):
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
    (:meth:`SVDStore.preload`; a no-op in the first pass or without a store). ``items`` may still lack their
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
    if default_mesh(mesh).devices.flat[0].platform == "cpu" and not WINDOW_ON_CPU:
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
    if default_mesh(mesh).devices.flat[0].platform == "cpu" and not READ_AHEAD_ON_CPU:
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
      store: the :class:`SVDStore` the stacks' SVDs go through, or ``None``.

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


# ----- SVDs kept between the two passes of the global scope --------------------------------------
#: The folder of the work folder (``OUT.partial``) where :class:`SVDStore` keeps SVDs.
SVD_DIR = "svd-reuse"
#: Disk throughput (bytes/s) assumed until the store has timed its own writes.
SVD_DISK_BYTES_PER_S = 500e6
#: Free disk space a kept SVD must leave.
SVD_DISK_RESERVE_BYTES = 4 << 30
SVD_POLICIES = ("auto", "always", "never")
_FACTORS = ("u", "s", "v")
#: What :meth:`SVDStore.keep_passes` keeps of a V pass (:class:`~prinmix_jax.core.gptq.GPTQResult` less ``q``).
_PASS_ARRAYS = ("codes", "scale", "zero", "damp")


def svd_key(block: int, name: str) -> str:
    """The :class:`SVDStore` key of decoder block ``block``'s linear ``name`` (both passes use it)."""
    return f"{block}/{name}"


class SVDStore:
    """SVDs computed by the global scope's first pass, kept on local disk for its second pass, and the GPTQ
    passes of V its error tables ran (:meth:`keep_passes`), from which the second pass's V step takes its rows
    instead of running GPTQ again.

    One folder per matrix (``u.npy``, ``s.npy``, ``v.npy``; written under a temporary name, then renamed;
    read with ``allow_pickle=False``), named by the matrix's key and the SVD's settings, so a second pass
    that needs another SVD (a full one) recomputes it. Host memory holds one stack at a time. The store
    lives for one ``compress_model`` call: it starts empty (what a killed run left is deleted) and is
    removed before the run is published, so nothing is trusted across changed inputs.

    Args:
      folder: this process's folder (under the work folder's :data:`SVD_DIR`).
      policy: ``"auto"``: keep a stack's SVDs when computing them took longer than writing and reading them
        back is expected to (at the throughput measured on this run's writes); ``"always"``; ``"never"``.
        Nothing is kept that would leave less than :data:`SVD_DISK_RESERVE_BYTES` free.
    """

    def __init__(self, folder: str, policy: str = "auto"):
        if policy not in SVD_POLICIES:
            raise ValueError(f"SVD reuse policy must be one of {SVD_POLICIES}, got {policy!r}")
        self.folder, self.policy, self.writing = folder, policy, True
        self.bytes_per_s = SVD_DISK_BYTES_PER_S
        self._ready = {}                   # SVDs read ahead (preload), by path, until stack_svd takes them
        self._lock = threading.Lock()      # preload runs in a read-ahead thread
        self.stats = dict(kept=0, reused=0, computed=0, bytes_kept=0, seconds_svd=0.0, seconds_write=0.0,
                          seconds_read=0.0, passes_kept=0, passes_reused=0, bytes_passes=0)
        shutil.rmtree(folder, ignore_errors=True)
        os.makedirs(folder, exist_ok=True)

    def stack_svd(self, keys, deltas, compute, settings: str):
        """``(U, σ, V)`` of a stack: the kept SVDs read back, the others computed (and, while
        :attr:`writing`, offered to the store).

        Args:
          keys: one key per matrix (:func:`svd_key`).
          deltas: returns the (B, m, n) stack (called only when something must be computed).
          compute: ``(b, m, n) -> (U, σ, V)``, the SVD of some of the deltas.
          settings: the SVD's settings (:func:`~prinmix_jax.core.svd.svd_settings`).

        Returns:
          ``compute(deltas())``'s result, or numpy arrays with the same bytes.
        """
        paths = [self._path(k, settings) for k in keys]
        with self._lock:
            ready = [self._ready.pop(p, None) for p in paths]
        got = [r if r is not None else self._read(p, _FACTORS) for p, r in zip(paths, ready)]
        miss = [i for i, g in enumerate(got) if g is None]
        if miss:
            d = deltas()
            t = time.perf_counter()
            res = jax.block_until_ready(compute(d if len(miss) == len(keys) else d[miss]))
            seconds = time.perf_counter() - t
            self.stats["computed"] += len(miss)
            self.stats["seconds_svd"] += seconds
            if len(miss) == len(keys) and not self.writing:
                return res
            res = [np.asarray(x) for x in res]
            keep = self.writing and self._worth(seconds, sum(x.nbytes for x in res))
            for j, i in enumerate(miss):
                got[i] = tuple(x[j] for x in res)
                if keep:
                    self._write(paths[i], _FACTORS, got[i])
        return tuple(np.stack([g[f] for g in got]) for f in range(len(_FACTORS)))

    def preload(self, keys, settings: str) -> None:
        """In the second pass, reads the kept SVDs of ``keys`` into memory now, for :meth:`stack_svd` to take
        later (from a read-ahead thread: the disk reads then overlap the devices' work on earlier blocks)."""
        if self.writing:
            return
        for k in keys:
            path = self._path(k, settings)
            arrays = self._read(path, _FACTORS)
            if arrays is not None:
                with self._lock:
                    self._ready[path] = arrays

    def holds(self, keys, settings: str) -> bool:
        """Whether every one of ``keys``' SVDs with ``settings`` is kept (nothing is read)."""
        return all(os.path.isdir(self._path(k, settings)) for k in keys)

    def keep_passes(self, keys, tags, passes, seconds: float) -> None:
        """Offers the GPTQ passes of V of a stack's error tables, while :attr:`writing`: kept (all but ``q``,
        which :meth:`passes`' reader recomputes from the codes) when a V step of the stack, ``seconds`` long,
        takes longer than writing and reading them back.

        Args:
          keys: one key per matrix (:func:`svd_key`).
          tags: one string per matrix naming what its passes depend on (settings, digests of its V and Hessian).
          passes: a :class:`~prinmix_jax.core.gptq.GPTQResult` whose arrays lead with (matrix, width).
          seconds: what the V step these passes replace would take for the whole stack.
        """
        if not self.writing:
            return
        per = [tuple(np.asarray(getattr(passes, f)[i]) for f in _PASS_ARRAYS) for i in range(len(keys))]
        nbytes = sum(a.nbytes for p in per for a in p)
        if not self._worth(seconds, nbytes):
            return
        for key, tag, arrays in zip(keys, tags, per):
            self._write(self._path(key, f"passes-{tag}"), _PASS_ARRAYS, arrays, kind="passes")

    def passes(self, keys, tags):
        """The kept V passes of every matrix of a stack, ``[(codes, scale, zero, damp)]``, or ``None`` (and
        nothing read) unless every one is kept under the same tag."""
        paths = [self._path(k, f"passes-{t}") for k, t in zip(keys, tags)]
        if not all(os.path.isdir(p) for p in paths):
            return None
        got = [self._read(p, _PASS_ARRAYS, kind="passes") for p in paths]
        return None if any(g is None for g in got) else got

    def _path(self, key: str, settings: str) -> str:
        return os.path.join(self.folder, re.sub(r"[^A-Za-z0-9_.-]", "_", f"{key}@{settings}"))

    def _worth(self, seconds: float, nbytes: int) -> bool:
        """Whether SVDs that took ``seconds`` to compute and hold ``nbytes`` are kept."""
        if self.policy == "never" or shutil.disk_usage(self.folder).free - nbytes < SVD_DISK_RESERVE_BYTES:
            return False
        return self.policy == "always" or seconds > 2 * nbytes / self.bytes_per_s

    def _write(self, path: str, names, arrays, kind: str = "svd") -> None:
        """Writes ``arrays`` as ``path/{name}.npy`` (into a temporary folder, then renamed)."""
        t = time.perf_counter()
        tmp = f"{path}.tmp{os.getpid()}"
        os.makedirs(tmp, exist_ok=True)
        for f, x in zip(names, arrays):
            np.save(os.path.join(tmp, f + ".npy"), np.ascontiguousarray(x), allow_pickle=False)
        os.replace(tmp, path)
        seconds = time.perf_counter() - t
        nbytes = sum(x.nbytes for x in arrays)
        self.bytes_per_s = nbytes / max(seconds, 1e-6)
        counts, size = ("kept", "bytes_kept") if kind == "svd" else ("passes_kept", "bytes_passes")
        self.stats.update({counts: self.stats[counts] + 1, size: self.stats[size] + nbytes,
                           "seconds_write": self.stats["seconds_write"] + seconds})

    def _read(self, path: str, names, kind: str = "svd"):
        """The arrays ``names`` kept at ``path`` or ``None``; in the second pass the entry is deleted once read."""
        if not os.path.isdir(path):
            return None
        t = time.perf_counter()
        try:
            arrays = tuple(np.load(os.path.join(path, f + ".npy"), allow_pickle=False) for f in names)
        except (OSError, ValueError):
            arrays = None
        if arrays is None or not self.writing:
            shutil.rmtree(path, ignore_errors=True)
        if arrays is not None:
            with self._lock:
                self.stats["reused" if kind == "svd" else "passes_reused"] += 1
                self.stats["seconds_read"] += time.perf_counter() - t
        return arrays

    def freeze(self) -> None:
        """Ends the first pass: nothing more is kept, and what is read back is deleted."""
        self.writing = False

    def remove(self) -> None:
        """Deletes the store's folder, and its parent once empty (idempotent)."""
        with self._lock:
            self._ready.clear()
        shutil.rmtree(self.folder, ignore_errors=True)
        try:
            os.rmdir(os.path.dirname(self.folder))
        except OSError:
            pass

    def summary(self) -> str:
        """One line: what was kept and reused, and what it cost."""
        s = self.stats
        return (f"SVD reuse: {s['kept']} kept ({s['bytes_kept'] / 1e6:.0f} MB), {s['reused']} read back, "
                f"{s['computed']} computed ({s['seconds_svd']:.1f} s); V passes: {s['passes_kept']} kept "
                f"({s['bytes_passes'] / 1e6:.0f} MB), {s['passes_reused']} read back; "
                f"{s['seconds_write']:.1f} s writing, {s['seconds_read']:.1f} s reading")
