"""Writing outputs safely: the marker that says a folder is prinmix's own, the checks before any work
(never an input, never a folder prinmix did not write), atomic JSON, the top-level summary with its
checksums, and publishing a finished folder by rename."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from typing import Any

from prinmix_jax.storage.format import FORMAT, HF_DIR, META_FILE, meta_digest

__all__ = ["OUTPUT_MARKER", "write_output_marker", "is_prinmix_output", "check_output_location", "file_sha256",
           "write_summary", "write_json_atomic", "publish"]

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


def check_output_location(out, overwrite: bool, inputs=(), scratch_suffixes=()) -> str:
    """Absolute ``out`` after checking it can be (re)created, before any work starts.

    Refuses: ``out`` equal to or containing one of ``inputs`` (with or without ``overwrite``); an existing
    ``out`` without ``overwrite``; with ``overwrite``, an existing ``out`` that prinmix did not write (a
    file, or a folder without the output marker: see :func:`is_prinmix_output`); a missing or unwritable
    parent folder.

    Args:
      out: the output folder.
      overwrite: whether an existing prinmix output at ``out`` may be replaced.
      inputs: paths the command reads (checkpoints, calibration file); ``None`` entries are ignored.
      scratch_suffixes: folders ``out + suffix`` the command works in before publishing (``".partial"``);
        they may not hold an input either.
    """
    out = os.path.abspath(os.fspath(out))
    for folder, role in [(out, "the output")] + [(out + s, "the work folder") for s in scratch_suffixes]:
        real_folder = os.path.realpath(folder)
        for inp in inputs:
            if inp is None or not isinstance(inp, (str, os.PathLike)):
                continue
            real_in = os.path.realpath(os.fspath(inp))
            if _inside(real_in, real_folder):
                what = "is" if real_in == real_folder else "contains"
                raise ValueError(f"{role} {folder!r} {what} the input {os.fspath(inp)!r}: writing there would "
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


def file_sha256(path: str) -> str:
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
                files[f"{HF_DIR}/{name}"] = file_sha256(os.path.join(hf, name))
    out = dict(summary, files_sha256=files)
    out["meta_sha256"] = meta_digest(out)
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
