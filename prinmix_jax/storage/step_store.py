"""The step store: an Orbax ``CheckpointManager`` with one step per finished unit of work (globals, then
each decoder block), whose array leaves every process of a multi-host run writes itself (:class:`OwnedArray`).
"""
from __future__ import annotations

import dataclasses
import logging
import os
import warnings

import numpy as np

from prinmix_jax.storage.format import DeltaFormatError, meta_digest

__all__ = ["StepStore", "OwnedArray", "owned_tree", "quiet_orbax"]

def quiet_orbax():
    logging.getLogger("absl").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="orbax")


@dataclasses.dataclass(frozen=True)
class OwnedArray:
    """An array leaf of a step that one process writes: ``value`` is the data on process ``owner`` and None
    on the others (which know only its shape and dtype, from the step metadata)."""
    value: np.ndarray | None
    shape: tuple
    dtype: np.dtype
    owner: int = 0

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))


def owned_tree(arrays: dict, meta: dict, owner, me: int) -> dict:
    """The arrays tree of one step with :class:`OwnedArray` leaves.

    Args:
      arrays: this process's part of the tree (as from :func:`encode_step`): the linears it compressed and
        the dense deltas it owns (or all of them).
      meta: the complete step metadata (every process's entries), as from :func:`encode_step` merged.
      owner: ``owner(kind, name) -> process index`` with kind ``"linears"`` or ``"dense"``.
      me: this process's index.
    """
    tree: dict = {}
    for name, e in meta["linears"].items():
        if e["kind"] != "matrix" or not e["sha256"]:
            continue
        p = owner("linears", name)
        mine = arrays.get("linears", {}).get(name, {}) if p == me else {}
        node = tree.setdefault("linears", {}).setdefault(name, {})
        for k, (shape, dt) in e["arrays"].items():
            if p == me and k not in mine:
                raise ValueError(f"array linears/{name}/{k} is owned by this process but missing")
            node[k] = OwnedArray(mine.get(k), tuple(shape), np.dtype(dt), p)
    for path, e in meta["dense"].items():
        if e["kind"] != "store":
            continue
        p = owner("dense", path)
        src, node, parts = arrays.get("dense", {}), tree.setdefault("dense", {}), path.split("/")
        for q in parts[:-1]:
            src, node = src.get(q, {}) if p == me else {}, node.setdefault(q, {})
        node[parts[-1]] = OwnedArray(src[parts[-1]] if p == me else None, tuple(e["shape"]), np.dtype(e["dtype"]), p)
    return tree


def _owned_array_handler():
    """An Orbax ``NumpyHandler`` that writes an :class:`OwnedArray` on its owner process.

    Orbax's own ``NumpyHandler`` writes numpy leaves on process 0 only, and its ``ArrayHandler`` refuses
    arrays that live on one host in multi-host runs; this handler lets every process write what it holds
    (into its ``ocdbt.process_<i>`` folder, merged by Orbax at commit). It records the leaves as
    ``np.ndarray``, so the standard handler reads them back. Relies on orbax-checkpoint 0.12 internals
    (pinned in ``pyproject.toml``).
    """
    import asyncio

    import orbax.checkpoint as ocp
    from orbax.checkpoint._src.multihost import multihost
    from orbax.checkpoint._src.serialization import ocdbt_utils
    from orbax.checkpoint._src.serialization import tensorstore_utils as ts_utils

    class OwnedArrayHandler(ocp.type_handlers.NumpyHandler):
        async def _background_serialize(self, values, infos, args=None):
            args = args or [ocp.SaveArgs()] * len(values)
            writes = []
            for v, info, arg in zip(values, infos, args):
                await info.await_path_creation()
                spec = ts_utils.build_array_write_spec(
                    info=info, arg=arg, global_shape=v.shape, local_shape=v.shape, dtype=v.dtype,
                    use_ocdbt=info.is_ocdbt_checkpoint,
                    process_index=ocdbt_utils.get_process_index_for_subdir(use_ocdbt=info.is_ocdbt_checkpoint),
                    metadata_key=self._metadata_key).json
                if multihost.process_index() == v.owner:   # registered for OwnedArray leaves only
                    writes.append(self._open_and_write(np.asarray(v.value), spec, info.ts_context))
            await asyncio.gather(*writes)

    return OwnedArrayHandler(deepcopy_host_arrays=False)


def _short(e: BaseException, limit: int = 240) -> str:
    msg = " ".join(f"{type(e).__name__}: {e}".split())
    return msg if len(msg) <= limit else msg[:limit] + "…"


# ----- the step store ----------------------------------------------------------------------------
_STORE_DIRS: set[str] = set()   # directories of the step stores opened in this process


def _drop_orphaned_read_reports(directory: str) -> None:
    """Orbax awaits tensorstore reads on an asyncio loop of its own; when one read of a damaged store fails,
    the error is raised (and reaches the caller) while the other reads are still in flight. Those report
    afterwards, at any moment, through two channels: ``RuntimeError: Event loop is closed`` through
    ``sys.unraisablehook`` from a tensorstore thread, and asyncio's "Task (or Future) exception was never
    retrieved" log record when their task is collected. Both carry nothing the caller has not been told, so hooks that drop
    them (and pass everything else on) are installed once per process; the log filter drops only records whose
    exception names a step store opened here, so a user's own asyncio errors still show."""
    import logging
    import sys

    _STORE_DIRS.add(directory)
    hook = sys.unraisablehook
    if getattr(hook, "_prinmix_drops_closed_loop", False):
        return

    def filtered(u):
        if isinstance(u.exc_value, RuntimeError) and str(u.exc_value) == "Event loop is closed":
            return
        hook(u)

    def orphaned_read(record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is None or "exception was never retrieved" not in str(record.msg):
            return True
        return not any(d in str(exc) for d in _STORE_DIRS)

    filtered._prinmix_drops_closed_loop = True
    sys.unraisablehook = filtered
    logging.getLogger("asyncio").addFilter(orphaned_read)


class StepStore:
    """An Orbax ``CheckpointManager`` holding one step per finished unit (globals, then blocks).

    Steps are written synchronously and atomically by Orbax (temporary directory, then rename); a killed
    run leaves at most an uncommitted temporary directory, which Orbax ignores, so
    :meth:`latest_step` is always the last *finished* step.

    Args:
      directory: the ``steps/`` directory.
      run_identity: JSON-able dict stored as the manager's root metadata on creation.
      read_only: open an existing store without creating anything.
    """

    def __init__(self, directory: str, run_identity: dict | None = None, *, read_only: bool = False):
        import orbax.checkpoint as ocp

        quiet_orbax()
        self._ocp = ocp
        self.directory = os.path.abspath(os.fspath(directory))
        _drop_orphaned_read_reports(self.directory)
        if read_only and not os.path.isdir(self.directory):
            raise DeltaFormatError(f"{self.directory}: no step directory")
        opts = ocp.CheckpointManagerOptions(max_to_keep=None, enable_async_checkpointing=False,
                                            create=not read_only, read_only=read_only)
        kw = {} if run_identity is None else {"metadata": {"run": run_identity}}
        from orbax.checkpoint._src.serialization import type_handler_registry as thr

        types = thr.create_type_handler_registry(*thr._DEFAULT_TYPE_HANDLERS, (OwnedArray, _owned_array_handler()))
        handlers = ocp.handlers.DefaultCheckpointHandlerRegistry()
        pytree = ocp.PyTreeCheckpointHandler(type_handler_registry=types)
        handlers.add("arrays", ocp.args.PyTreeSave, pytree)
        handlers.add("arrays", ocp.args.PyTreeRestore, pytree)
        json_handler = ocp.JsonCheckpointHandler()
        handlers.add("meta", ocp.args.JsonSave, json_handler)
        handlers.add("meta", ocp.args.JsonRestore, json_handler)
        self._mgr = ocp.CheckpointManager(self.directory, options=opts, handler_registry=handlers, **kw)

    def run_identity(self) -> dict | None:
        md = self._mgr.metadata()
        custom = getattr(md, "custom_metadata", None) or {}
        return custom.get("run")

    def all_steps(self) -> list[int]:
        self._mgr.reload()
        return sorted(int(s) for s in self._mgr.all_steps())

    def latest_step(self) -> int | None:
        steps = self.all_steps()
        return steps[-1] if steps else None

    def save(self, step: int, arrays: dict, meta: dict) -> None:
        """Writes one step (collective in multi-process runs: every process calls it with the same tree
        structure; leaves are numpy arrays, written by process 0, or :class:`OwnedArray`\\ s, written by
        their owner)."""
        ocp = self._ocp
        meta = dict(meta, has_arrays=bool(arrays))
        meta["meta_sha256"] = meta_digest(meta)
        items = {"meta": ocp.args.JsonSave(meta)}
        if arrays:
            items["arrays"] = ocp.args.PyTreeSave(arrays)
        self._mgr.save(step, args=ocp.args.Composite(**items), force=True)
        self._mgr.wait_until_finished()

    def restore_meta(self, step: int) -> dict:
        """The step's JSON metadata only (checked against its ``meta_sha256`` where it records one: steps
        written before prinmix recorded it are read unchecked)."""
        ocp = self._ocp
        try:
            meta = self._mgr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        except Exception as e:  # orbax raises many types for damaged directories
            raise DeltaFormatError(f"{self.directory}/{step}: corrupted or unreadable step metadata "
                                   f"({_short(e)})") from e
        if not isinstance(meta, dict):
            raise DeltaFormatError(f"{self.directory}/{step}: step metadata is not a JSON object")
        if "meta_sha256" in meta and meta["meta_sha256"] != meta_digest(meta):
            raise DeltaFormatError(f"{self.directory}/{step}: step metadata is corrupted (SHA-256 mismatch)")
        return meta

    def restore(self, step: int) -> tuple[dict, dict]:
        """``(arrays as numpy, meta)`` of one step, on every process whatever process wrote them."""
        ocp = self._ocp
        meta = self.restore_meta(step)
        arrays = {}
        if meta.get("has_arrays"):
            try:
                arrays = self._mgr.restore(step, args=ocp.args.Composite(arrays=ocp.args.PyTreeRestore()))["arrays"]
            except Exception as e:
                raise DeltaFormatError(f"{self.directory}/{step}: corrupted or unreadable step arrays "
                                       f"({_short(e)})") from e
        return arrays, meta

    def close(self) -> None:
        self._mgr.close()
