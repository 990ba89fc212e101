"""The delta format in memory and in JSON: constants, errors, the base fingerprint, one step's entries
(:class:`MatrixEntry`, :class:`ZeroEntry`, :class:`DenseEntry`) and their encoding into an arrays tree plus
JSON metadata with a SHA-256 of every array (:func:`encode_step` / :func:`decode_step`). The layout on disk
is described in ``docs/format.md``.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

import numpy as np

from prinmix_jax.core.quantizer import HALF_ZERO_MAX_BITS
from prinmix_jax.formats import CompressedMatrix, SVDQuantDelta, from_state, to_state

__all__ = ["FORMAT", "FORMAT_VERSION", "META_FILE", "STEPS_DIR", "HF_DIR", "WORK_SUFFIX", "DeltaFormatError",
           "FingerprintMismatchError", "tensor_digest", "TensorDigest", "combine_fingerprint", "MatrixEntry", "ZeroEntry",
           "DenseEntry", "encode_step", "BlockDelta", "meta_digest", "decode_step", "array_sha256",
           "READABLE_VERSIONS", "upgrade_v1"]

FORMAT = "prinmix-delta"
FORMAT_VERSION = 3
#: Versions this prinmix reads. Version 1 stored the zero points of widths 1–2 as integers (the min–max grid
#: only); version 2 stores them in half steps (:func:`prinmix_jax.core.quantizer.stored_zero`); version 3
#: may hold matrices with lean index metadata (:class:`~prinmix_jax.formats.SVDQuantDelta`, ``lean``), whose
#: implied leaves are not stored.
READABLE_VERSIONS = (1, 2, 3)
META_FILE = "prinmix_delta.json"
STEPS_DIR = "steps"
HF_DIR = "hf"
#: Suffix of the folder a compress run works in before it is renamed to the output.
WORK_SUFFIX = ".partial"


class DeltaFormatError(ValueError):
    """A delta checkpoint is missing, incomplete, corrupted or of an unknown format version."""


class FingerprintMismatchError(ValueError):
    """The base weights differ from the ones the delta was computed against."""


# ----- fingerprints ------------------------------------------------------------------------------
def tensor_digest(named_tensors) -> str:
    """SHA-256 (hex) over ``(name, array)`` pairs, sorted by name, of the float32 values."""
    h = TensorDigest()
    for name, arr in sorted(named_tensors, key=lambda x: x[0]):
        h.update(name, arr)
    return h.hexdigest()


class TensorDigest:
    """:func:`tensor_digest` fed one tensor at a time, in name order, so that the tensors need not be
    held together (a 7B model's embedding and head are 2.1 GB each in float32)."""

    def __init__(self):
        self._h, self._last = hashlib.sha256(), None

    def update(self, name: str, arr) -> None:
        a = np.asarray(arr)
        self.begin(name, a.shape)
        self.update_rows(a)

    def begin(self, name: str, shape) -> None:
        """Starts tensor ``name`` of ``shape``; its values follow through :meth:`update_rows`."""
        if self._last is not None and name < self._last:
            raise ValueError(f"tensor {name!r} after {self._last!r}: a digest takes tensors in name order")
        self._last = name
        self._h.update(f"{name}\0{[int(d) for d in shape]}\0".encode())

    def update_rows(self, rows) -> None:
        """The next block of rows (first axis) of the tensor begun last, in order."""
        a = np.ascontiguousarray(np.asarray(rows, dtype=np.float32)).astype("<f4", copy=False)
        self._h.update(memoryview(a).cast("B"))

    def hexdigest(self) -> str:
        return self._h.hexdigest()


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


def array_sha256(a: np.ndarray) -> str:
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
                    sha[k] = array_sha256(a)
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
                                   "nbytes": int(a.nbytes), "sha256": array_sha256(a)}
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


def meta_digest(meta: dict) -> str:
    """SHA-256 of a step's JSON metadata without its ``meta_sha256`` entry: of the canonical JSON (sorted
    keys, no spaces) of what a JSON round trip gives, so the writer's dict and the reader's parse agree."""
    body = json.loads(json.dumps({k: v for k, v in meta.items() if k != "meta_sha256"}))
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _check_sha(where: str, key: str, a: np.ndarray, want: str | None):
    if want is not None and array_sha256(a) != want:
        raise DeltaFormatError(f"{where}: array {key!r} is corrupted (SHA-256 mismatch)")


def upgrade_v1(cm):
    """A matrix read from a format-1 checkpoint in this version's terms: the zero points of its width-1 and
    width-2 groups (integers in version 1) doubled into half steps. Other entries are returned unchanged."""
    if not isinstance(cm, SVDQuantDelta) or not any(b <= HALF_ZERO_MAX_BITS for b in cm.group_bits):
        return cm

    def half(zeros):
        return tuple(np.asarray(z) * 2 if b <= HALF_ZERO_MAX_BITS else z for z, b in zip(zeros, cm.group_bits))
    return dataclasses.replace(cm, v_zero=half(cm.v_zero), u_zero=half(cm.u_zero))


def decode_step(arrays: dict, meta: dict, where: str = "delta step", version: int = FORMAT_VERSION) -> BlockDelta:
    """Inverse of :func:`encode_step` (validates presence, byte counts and checksums); a step of format
    ``version`` 1 is upgraded (:func:`upgrade_v1`)."""
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
                if version == 1:
                    linears[name] = upgrade_v1(linears[name])
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
