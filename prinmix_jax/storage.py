"""Delta checkpoints: an Orbax ``CheckpointManager`` with one step per finished unit of work, plus a
top-level JSON metadata file. The on-disk layout::

    OUT/
      prinmix_delta.json         top-level metadata; written last, its presence marks a complete delta
      hf/                        config.json and tokenizer files of the fine-tuned checkpoint (for apply)
      steps/                     orbax.checkpoint.CheckpointManager directory
        metadata/                root metadata: the run identity (used to decide whether a resume is valid)
        0/                       step 0: the globals (embed_tokens, final norm, lm_head)
        1/ ... L/                step b+1: decoder block b
          arrays/                orbax PyTree (numpy leaves, OCDBT), only when the step stores any array:
                                   linears/<name>/<field>   compressed matrices (formats.to_state arrays)
                                   dense/<path...>          stored dense deltas (norms, biases, ...)
          meta/                  JSON (JsonSave): per entry its kind, to_state metadata, info, byte
                                   count and SHA-256 of every array; the base fingerprint of this step;
                                   ``meta_sha256``, the SHA-256 of the rest of this JSON (see _meta_digest)

Per compressed matrix ``linears/<name>`` holds exactly the arrays of :func:`prinmix_jax.formats.to_state`:
for :class:`~prinmix_jax.formats.SVDQuantDelta` ``sigma_<b>``, ``v_codes_<b>``, ``v_scale_<b>``,
``v_zero_<b>``, ``u_codes_<b>``, ``u_scale_<b>``, ``u_zero_<b>`` per width ``b`` and ``widths``; for
:class:`~prinmix_jax.formats.LowRankDelta` ``us``, ``v``; for :class:`~prinmix_jax.formats.SignDelta`
``signs``, ``scale``. Zero-size arrays (Orbax refuses them) are kept out of the tree and recorded in the
entry's ``empty`` metadata. (There are no permutations to store: GPTQ's act-order permutation is undone
before packing, so the codes are in natural order.)

Multi-host writes: every array leaf is an :class:`OwnedArray` naming the process that holds it (the
process that compressed the matrix); in a ``jax.distributed`` run each process writes the arrays it owns
into its own ``ocdbt.process_<i>`` folder of the step and Orbax's primary process merges the OCDBT
manifests when it commits the step. The written tree is an ordinary numpy PyTree: any Orbax reader
(``ocp.StandardCheckpointer().restore(".../steps/3/arrays")``) opens it, with any number of processes.

Fingerprint of the base (format v1): for every step, SHA-256 over ``name\\0shape\\0`` and the float32
little-endian bytes of every base tensor of that step (HF names, sorted); the model fingerprint is SHA-256
of ``"prinmix-fingerprint-v1"`` and the step digests in step order. It is computed while streaming (no
extra pass), is independent of the storage dtype (bf16/f16 values are exact in float32) and lets ``apply``
refuse a wrong base block by block.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import warnings
from typing import Any

import numpy as np

from prinmix_jax.formats import CompressedMatrix, from_state, to_state

__all__ = ["FORMAT", "FORMAT_VERSION", "META_FILE", "STEPS_DIR", "HF_DIR", "DeltaFormatError",
           "FingerprintMismatchError", "StepStore", "BlockDelta", "DeltaCheckpoint", "load_delta",
           "MatrixEntry", "ZeroEntry", "DenseEntry", "encode_step", "decode_step", "owned_tree", "OwnedArray",
           "tensor_digest", "combine_fingerprint",
           "OUTPUT_MARKER", "is_prinmix_output", "write_output_marker", "check_output_location", "publish"]

FORMAT = "prinmix-delta"
FORMAT_VERSION = 1
META_FILE = "prinmix_delta.json"
STEPS_DIR = "steps"
HF_DIR = "hf"


class DeltaFormatError(ValueError):
    """A delta checkpoint is missing, incomplete, corrupted or of an unknown format version."""


class FingerprintMismatchError(ValueError):
    """The base weights differ from the ones the delta was computed against."""


def _quiet_orbax():
    logging.getLogger("absl").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="orbax")


# ----- fingerprints ------------------------------------------------------------------------------
def tensor_digest(named_tensors) -> str:
    """SHA-256 (hex) over ``(name, array)`` pairs, sorted by name, of the float32 values."""
    h = hashlib.sha256()
    for name, arr in sorted(named_tensors, key=lambda x: x[0]):
        a = np.ascontiguousarray(np.asarray(arr, dtype=np.float32)).astype("<f4", copy=False)
        h.update(f"{name}\0{list(a.shape)}\0".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def combine_fingerprint(step_digests) -> str:
    """The model fingerprint from the per-step digests (step order)."""
    h = hashlib.sha256(b"prinmix-fingerprint-v1")
    for d in step_digests:
        h.update(b"\n" + d.encode())
    return h.hexdigest()


# ----- encoding one step -------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class MatrixEntry:
    """A compressed decoder-block (or embedding / head) linear and its JSON-able ``info``."""
    matrix: CompressedMatrix
    info: dict


@dataclasses.dataclass(frozen=True)
class ZeroEntry:
    """A delta that is exactly zero: only its ``shape`` is recorded (and ``info``, for linears)."""
    shape: tuple
    info: dict | None = None


@dataclasses.dataclass(frozen=True)
class DenseEntry:
    """A dense delta (norm, bias, or an embedding / head the policy stores or skips).

    ``kind="store"``: ``array`` is stored as given. ``kind="skip"``: nothing is stored; ``shape`` and the
    delta's largest absolute value ``max_abs`` are recorded.
    """
    kind: str
    shape: tuple
    array: np.ndarray | None = None
    max_abs: float | None = None

    def __post_init__(self):
        if self.kind not in ("store", "skip"):
            raise ValueError(f"unknown dense entry kind {self.kind!r}")


def _sha(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def encode_step(linears: dict[str, Any], dense: dict[str, Any]) -> tuple[dict, dict]:
    """Turns one step's results into ``(arrays tree, JSON meta)``.

    Args:
      linears: ``{name: MatrixEntry | ZeroEntry}``.
      dense: ``{"a/b/c": DenseEntry | ZeroEntry}``; the key is the param path inside the step's tree joined
        by ``/``.
    """
    arrays: dict = {}
    meta: dict = {"linears": {}, "dense": {}}
    for name, entry in linears.items():
        if isinstance(entry, MatrixEntry):
            cm, info = entry.matrix, entry.info
            st_arrays, st_meta = to_state(cm)
            keep, empty, sha, layout = {}, {}, {}, {}
            for k, a in st_arrays.items():
                a = np.asarray(a)
                if a.size == 0:
                    empty[k] = [list(a.shape), a.dtype.name]
                else:
                    keep[k] = a
                    sha[k] = _sha(a)
                    layout[k] = [list(a.shape), a.dtype.name]
            if keep:
                arrays.setdefault("linears", {})[name] = keep
            meta["linears"][name] = {"kind": "matrix", "state": st_meta, "empty": empty, "sha256": sha,
                                     "arrays": layout, "nbytes": int(cm.nbytes), "info": info}
        elif isinstance(entry, ZeroEntry):
            meta["linears"][name] = {"kind": "zero", "shape": list(entry.shape), "nbytes": 0, "info": entry.info}
        else:
            raise ValueError(f"unknown linear entry {entry!r}")
    for path, entry in dense.items():
        if isinstance(entry, DenseEntry) and entry.kind == "store":
            a = np.ascontiguousarray(entry.array)
            node = arrays.setdefault("dense", {})
            parts = path.split("/")
            for p in parts[:-1]:
                node = node.setdefault(p, {})
            node[parts[-1]] = a
            meta["dense"][path] = {"kind": "store", "shape": list(a.shape), "dtype": a.dtype.name,
                                   "nbytes": int(a.nbytes), "sha256": _sha(a)}
        elif isinstance(entry, ZeroEntry):
            meta["dense"][path] = {"kind": "zero", "shape": list(entry.shape), "nbytes": 0}
        elif isinstance(entry, DenseEntry):
            meta["dense"][path] = {"kind": "skip", "shape": list(entry.shape), "nbytes": 0,
                                   "max_abs_delta": float(entry.max_abs)}
        else:
            raise ValueError(f"unknown dense entry {entry!r}")
    meta["nbytes"] = int(sum(e["nbytes"] for e in meta["linears"].values())
                         + sum(e["nbytes"] for e in meta["dense"].values()))
    return arrays, meta


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


@dataclasses.dataclass
class BlockDelta:
    """One step of a delta: compressed linears and stored dense deltas.

    Attributes:
      linears: ``{name: CompressedMatrix or None}`` (None = the delta is exactly zero).
      dense: ``{"path/in/tree": np.ndarray or None}``; None = zero delta or skipped by the policy.
      meta: the step's JSON metadata.
    """
    linears: dict
    dense: dict
    meta: dict


def _meta_digest(meta: dict) -> str:
    """SHA-256 of a step's JSON metadata without its ``meta_sha256`` entry: of the canonical JSON (sorted
    keys, no spaces) of what a JSON round trip gives, so the writer's dict and the reader's parse agree."""
    body = json.loads(json.dumps({k: v for k, v in meta.items() if k != "meta_sha256"}))
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _check_sha(where: str, key: str, a: np.ndarray, want: str | None):
    if want is not None and _sha(a) != want:
        raise DeltaFormatError(f"{where}: array {key!r} is corrupted (SHA-256 mismatch)")


def decode_step(arrays: dict, meta: dict, where: str = "delta step") -> BlockDelta:
    """Inverse of :func:`encode_step` (validates presence, byte counts and checksums)."""
    arrays = arrays or {}
    linears, dense = {}, {}
    try:
        for name, e in meta["linears"].items():
            if e["kind"] == "zero":
                linears[name] = None
                continue
            st = {k: np.asarray(v) for k, v in arrays.get("linears", {}).get(name, {}).items()}
            for k, want in e["sha256"].items():     # every recorded array: present, its layout, its bytes
                if k not in st:
                    raise DeltaFormatError(f"{where}: array linears/{name}/{k} is missing")
                layout = e.get("arrays", {}).get(k)
                if layout is not None and (list(st[k].shape) != list(layout[0]) or st[k].dtype.name != layout[1]):
                    raise DeltaFormatError(f"{where}: array linears/{name}/{k} has shape {st[k].shape} "
                                           f"{st[k].dtype}, metadata records {layout[0]} {layout[1]}")
                _check_sha(where, f"linears/{name}/{k}", st[k], want)
            for k, (shape, dt) in e["empty"].items():
                st[k] = np.zeros(shape, np.dtype(dt))
            try:
                linears[name] = from_state(st, e["state"])
            except (ValueError, TypeError) as err:
                raise DeltaFormatError(f"{where}: matrix {name!r}: {err}") from err
        for path, e in meta["dense"].items():
            if e["kind"] != "store":
                dense[path] = None
                continue
            node = arrays.get("dense", {})
            for p in path.split("/"):
                if not isinstance(node, dict) or p not in node:
                    raise DeltaFormatError(f"{where}: stored dense delta {path!r} is missing")
                node = node[p]
            a = np.asarray(node)
            if list(a.shape) != list(e["shape"]) or a.dtype.name != e["dtype"]:
                raise DeltaFormatError(f"{where}: dense delta {path!r} has shape {a.shape} {a.dtype}, metadata "
                                       f"records {e['shape']} {e['dtype']}")
            _check_sha(where, f"dense/{path}", a, e.get("sha256"))
            dense[path] = a
    except (KeyError, TypeError) as err:
        raise DeltaFormatError(f"{where}: malformed step metadata ({err!r})") from err
    return BlockDelta(linears=linears, dense=dense, meta=meta)


def _short(e: BaseException, limit: int = 240) -> str:
    msg = " ".join(f"{type(e).__name__}: {e}".split())
    return msg if len(msg) <= limit else msg[:limit] + "…"


# ----- the step store ----------------------------------------------------------------------------
def _drop_closed_loop_reports() -> None:
    """Orbax awaits tensorstore reads on an asyncio loop of its own; when one read fails, the error is raised
    and the loop closed while other reads are still in flight, and each of those reports ``RuntimeError:
    Event loop is closed`` through ``sys.unraisablehook`` from a tensorstore thread when it finishes (at any
    moment: before the caller has even seen the error). The failure itself reaches the caller; these reports
    carry nothing, so a hook that drops them (and passes everything else on) is installed once per process."""
    import sys

    hook = sys.unraisablehook
    if getattr(hook, "_prinmix_drops_closed_loop", False):
        return

    def filtered(u):
        if isinstance(u.exc_value, RuntimeError) and str(u.exc_value) == "Event loop is closed":
            return
        hook(u)

    filtered._prinmix_drops_closed_loop = True
    sys.unraisablehook = filtered


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

        _quiet_orbax()
        _drop_closed_loop_reports()
        self._ocp = ocp
        self.directory = os.path.abspath(os.fspath(directory))
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
        meta["meta_sha256"] = _meta_digest(meta)
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
        if "meta_sha256" in meta and meta["meta_sha256"] != _meta_digest(meta):
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


# ----- reading a finished delta ------------------------------------------------------------------
class DeltaCheckpoint:
    """A finished delta checkpoint, read step by step (see :func:`load_delta`).

    Attributes:
      path: the folder.
      meta: the top-level metadata (``prinmix_delta.json``).
      num_blocks: decoder blocks in the model.
    """

    def __init__(self, path: str):
        self.path = os.path.abspath(os.fspath(path))
        if not os.path.isdir(self.path):
            hint = ""
            if os.path.isdir(self.path + ".partial"):
                hint = f"; an unfinished run is in {self.path}.partial: rerun the same compress command to finish it"
            raise FileNotFoundError(f"delta checkpoint {self.path!r} does not exist{hint}")
        mfile = os.path.join(self.path, META_FILE)
        if not os.path.isfile(mfile):
            hint = ""
            if os.path.isdir(self.path + ".partial"):
                hint = f"; an unfinished run is in {self.path}.partial: rerun the same compress command to resume"
            raise DeltaFormatError(f"{self.path}: not a complete prinmix delta checkpoint (no {META_FILE}){hint}")
        try:
            with open(mfile, encoding="utf-8") as f:
                self.meta = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DeltaFormatError(f"{mfile}: corrupted metadata (not valid JSON: {e})") from e
        if not isinstance(self.meta, dict) or self.meta.get("format") != FORMAT:
            raise DeltaFormatError(f"{mfile}: not a prinmix delta metadata file")
        if self.meta.get("format_version") != FORMAT_VERSION:
            raise DeltaFormatError(f"{mfile}: format version {self.meta.get('format_version')} is not supported "
                                   f"(this prinmix reads version {FORMAT_VERSION})")
        if "meta_sha256" in self.meta and self.meta["meta_sha256"] != _meta_digest(self.meta):
            raise DeltaFormatError(f"{mfile}: corrupted metadata (its SHA-256 does not match the content)")
        try:
            self.num_blocks = int(self.meta["model"]["num_blocks"])
            self.num_steps = int(self.meta["num_steps"])
        except (KeyError, TypeError, ValueError) as e:
            raise DeltaFormatError(f"{mfile}: metadata lacks the model/step description ({e!r})") from e
        self._store = StepStore(os.path.join(self.path, STEPS_DIR), read_only=True)
        steps = self._store.all_steps()
        if steps != list(range(self.num_steps)):
            missing = sorted(set(range(self.num_steps)) - set(steps))
            raise DeltaFormatError(f"{self.path}: delta checkpoint is truncated: step(s) {missing[:8]} of "
                                   f"{self.num_steps} are missing")

    @property
    def fingerprint(self) -> str:
        return self.meta["base"]["fingerprint"]

    @property
    def hf_dir(self) -> str | None:
        d = os.path.join(self.path, HF_DIR)
        return d if os.path.isdir(d) else None

    def step(self, step: int) -> BlockDelta:
        """Step ``step``: 0 = globals, ``b + 1`` = decoder block b."""
        if not 0 <= step < self.num_steps:
            raise ValueError(f"step {step} out of range (0..{self.num_steps - 1})")
        arrays, meta = self._store.restore(step)
        return decode_step(arrays, meta, where=f"{self.path}/{STEPS_DIR}/{step}")

    def globals(self) -> BlockDelta:
        """The embedding / final norm / output head entries."""
        return self.step(0)

    def block(self, block: int) -> BlockDelta:
        """Decoder block ``block``'s entries (linears by name, dense deltas by path inside the block)."""
        if not 0 <= block < self.num_blocks:
            raise ValueError(f"block {block} out of range (0..{self.num_blocks - 1})")
        return self.step(block + 1)

    def matrix(self, block: int, name: str) -> CompressedMatrix | None:
        """One compressed linear of a block (None when its delta is exactly zero)."""
        return self.block(block).linears[name]

    def verify(self) -> None:
        """Reads every step and checks byte counts and checksums against the metadata.

        This checks every byte a restore uses: each step's JSON metadata against its ``meta_sha256`` (steps
        written before it was recorded: unchecked); the OCDBT manifest and B-tree nodes by their CRC-32C
        (tensorstore, on read); Orbax's ``_METADATA`` by requiring every recorded array with its recorded
        shape and dtype; the array values (inline in the B-tree or in ``ocdbt.process_<i>/d/`` data files)
        by their SHA-256. The other bytes are never used: Orbax merges each process's OCDBT database into the
        step's root at commit, which leaves ``ocdbt.process_<i>/manifest.ocdbt`` and the per-process B-tree
        nodes in ``ocdbt.process_<i>/d/`` (whole files, or the tail of a data file after its values)
        unreferenced; ``commit_success.txt``, ``_CHECKPOINT_METADATA`` (timestamps, handler names: prinmix
        passes its own handlers) and ``steps/metadata`` (the run identity, read by a resumed compress) are not
        used by a restore either. Corrupting them changes nothing.
        """
        total = 0
        for s in range(self.num_steps):
            bd = self.step(s)
            got = sum(cm.nbytes for cm in bd.linears.values() if cm is not None) + \
                sum(a.nbytes for a in bd.dense.values() if a is not None)
            if got != bd.meta.get("nbytes"):
                raise DeltaFormatError(f"{self.path}: step {s} holds {got} bytes but records {bd.meta.get('nbytes')}")
            total += got
        if total != self.meta["bytes"]["total"]:
            raise DeltaFormatError(f"{self.path}: steps hold {total} bytes but {META_FILE} records "
                                   f"{self.meta['bytes']['total']}")
        for rel, want in self.meta.get("files_sha256", {}).items():
            p = os.path.join(self.path, rel)
            if not os.path.isfile(p):
                raise DeltaFormatError(f"{self.path}: {rel} is missing")
            if _file_sha256(p) != want:
                raise DeltaFormatError(f"{self.path}: {rel} is corrupted (SHA-256 mismatch)")

    def close(self) -> None:
        self._store.close()


def load_delta(path) -> DeltaCheckpoint:
    """Opens a finished delta checkpoint written by :func:`prinmix_jax.pipeline.compress_model`.

    Raises:
      FileNotFoundError: no such folder.
      DeltaFormatError: incomplete (interrupted), truncated, corrupted or unknown-version checkpoint.
    """
    if isinstance(path, DeltaCheckpoint):
        return path
    return DeltaCheckpoint(path)


OUTPUT_MARKER = ".prinmix-output"
#: Name prefix of a replaced output between the two renames of :func:`publish` (ours to delete).
_REPLACED = ".prinmix-replaced-"


def write_output_marker(folder: str, kind: str) -> None:
    """Marks ``folder`` as made by prinmix (``kind``: "delta", "merged"), so that ``overwrite`` may replace
    it later. Nothing without the marker (or a delta's ``prinmix_delta.json``) is ever deleted."""
    write_json_atomic(os.path.join(folder, OUTPUT_MARKER), {"tool": "prinmix-jax", "kind": kind,
                                                            "pid": os.getpid()})


def is_prinmix_output(path) -> bool:
    """Whether ``path`` is a folder prinmix wrote: it holds the output marker, or it is a finished delta
    (``prinmix_delta.json`` with the prinmix format tag; deltas written before the marker existed)."""
    path = os.fspath(path)
    if not os.path.isdir(path) or os.path.islink(path):
        return False
    if os.path.isfile(os.path.join(path, OUTPUT_MARKER)):
        return True
    try:
        with open(os.path.join(path, META_FILE), encoding="utf-8") as f:
            return json.load(f).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _inside(child: str, parent: str) -> bool:
    return child == parent or child.startswith(parent.rstrip(os.sep) + os.sep)


def check_output_location(out, overwrite: bool, inputs=()) -> str:
    """Absolute ``out`` after checking it can be (re)created, before any work starts.

    Refuses: ``out`` equal to or containing one of ``inputs`` (with or without ``overwrite``); an existing
    ``out`` without ``overwrite``; with ``overwrite``, an existing ``out`` that prinmix did not write (a
    file, or a folder without the output marker: see :func:`is_prinmix_output`); a missing or unwritable
    parent folder.

    Args:
      out: the output folder.
      overwrite: whether an existing prinmix output at ``out`` may be replaced.
      inputs: paths the command reads (checkpoints, calibration file); ``None`` entries are ignored.
    """
    out = os.path.abspath(os.fspath(out))
    real_out = os.path.realpath(out)
    for inp in inputs:
        if inp is None or not isinstance(inp, (str, os.PathLike)):
            continue
        real_in = os.path.realpath(os.fspath(inp))
        if _inside(real_in, real_out):
            what = "is" if real_in == real_out else "contains"
            raise ValueError(f"the output {out!r} {what} the input {os.fspath(inp)!r}: writing there would "
                             "destroy the input; choose another output folder")
    if os.path.lexists(out):
        if not overwrite:
            raise FileExistsError(f"output {out!r} already exists (pass --overwrite / overwrite=True to replace it)")
        if not is_prinmix_output(out):
            kind = "a folder prinmix did not write" if os.path.isdir(out) and not os.path.islink(out) else \
                "not a folder" if not os.path.islink(out) else "a symbolic link"
            raise FileExistsError(f"output {out!r} exists and is {kind}; --overwrite only replaces an earlier "
                                  "prinmix output (a folder with a .prinmix-output marker or prinmix_delta.json): "
                                  "remove it yourself or choose another output")
    parent = os.path.dirname(out)
    if not os.path.isdir(parent):
        raise FileNotFoundError(f"the parent folder of the output, {parent!r}, does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot write to {parent!r} (the output's parent folder is not writable)")
    _remove_replaced(out)
    return out


def _remove_replaced(out: str) -> None:
    """Deletes outputs that a killed :func:`publish` had moved aside (``OUT.prinmix-replaced-*``, marked)."""
    parent, name = os.path.split(out)
    try:
        names = os.listdir(parent)
    except OSError:
        return
    for n in names:
        p = os.path.join(parent, n)
        if n.startswith(name + _REPLACED) and is_prinmix_output(p):
            shutil.rmtree(p, ignore_errors=True)


def _file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_summary(work_dir: str, summary: dict) -> dict:
    """Writes the top-level metadata of a finished delta: ``summary`` plus ``files_sha256`` (the files of
    ``hf/``, which apply copies into the merged checkpoint) and ``meta_sha256`` (of the rest of the JSON),
    both checked by :meth:`DeltaCheckpoint.verify` / on open. Returns the written dict."""
    hf = os.path.join(work_dir, HF_DIR)
    files = {}
    if os.path.isdir(hf):
        for name in sorted(os.listdir(hf)):
            if os.path.isfile(os.path.join(hf, name)):
                files[f"{HF_DIR}/{name}"] = _file_sha256(os.path.join(hf, name))
    out = dict(summary, files_sha256=files)
    out["meta_sha256"] = _meta_digest(out)
    write_json_atomic(os.path.join(work_dir, META_FILE), out)
    return out


def write_json_atomic(path: str, obj: Any) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def publish(work_dir: str, out: str, overwrite: bool) -> None:
    """Moves a finished ``work_dir`` to ``out``.

    An existing ``out`` is replaced only when ``overwrite`` and it is a prinmix output; it is first moved
    aside to a fresh ``OUT.prinmix-replaced-*`` name (never a name that exists), so nothing the tool did
    not create is deleted, even by a kill between the two renames (the next run removes the moved-aside
    folder).
    """
    if os.path.lexists(out):
        if not overwrite:
            raise FileExistsError(f"output {out!r} already exists (pass --overwrite / overwrite=True to replace it)")
        if not is_prinmix_output(out):
            raise FileExistsError(f"output {out!r} exists and was not written by prinmix; it is left as it is")
        parent, name = os.path.split(out)
        import tempfile

        old = tempfile.mkdtemp(prefix=name + _REPLACED, dir=parent)
        os.rmdir(old)   # a fresh unique name (mkdtemp made it); the rename below takes it
        os.replace(out, old)
        os.replace(work_dir, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(work_dir, out)
