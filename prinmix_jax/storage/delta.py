"""Reading a finished delta checkpoint (:func:`load_delta`), with the checks of ``inspect --verify``."""
from __future__ import annotations

import json
import os

from prinmix_jax.formats import CompressedMatrix
from prinmix_jax.storage.format import (FORMAT, HF_DIR, READABLE_VERSIONS, META_FILE, STEPS_DIR, WORK_SUFFIX, BlockDelta,
                                        DeltaFormatError, decode_step, meta_digest)
from prinmix_jax.storage.outputs import file_sha256
from prinmix_jax.storage.step_store import StepStore

__all__ = ["DeltaCheckpoint", "load_delta"]

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
            if os.path.isdir(self.path + WORK_SUFFIX):
                hint = f"; an unfinished run is in {self.path}.partial: rerun the same compress command to finish it"
            raise FileNotFoundError(f"delta checkpoint {self.path!r} does not exist{hint}")
        mfile = os.path.join(self.path, META_FILE)
        if not os.path.isfile(mfile):
            hint = ""
            if os.path.isdir(self.path + WORK_SUFFIX):
                hint = f"; an unfinished run is in {self.path}.partial: rerun the same compress command to resume"
            raise DeltaFormatError(f"{self.path}: not a complete prinmix delta checkpoint (no {META_FILE}){hint}")
        try:
            with open(mfile, encoding="utf-8") as f:
                self.meta = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DeltaFormatError(f"{mfile}: corrupted metadata (not valid JSON: {e})") from e
        if not isinstance(self.meta, dict) or self.meta.get("format") != FORMAT:
            raise DeltaFormatError(f"{mfile}: not a prinmix delta metadata file")
        if self.meta.get("format_version") not in READABLE_VERSIONS:
            raise DeltaFormatError(f"{mfile}: format version {self.meta.get('format_version')} is not supported "
                                   f"(this prinmix reads versions {', '.join(map(str, READABLE_VERSIONS))})")
        self.version = int(self.meta["format_version"])
        if "meta_sha256" in self.meta and self.meta["meta_sha256"] != meta_digest(self.meta):
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
        return decode_step(arrays, meta, where=f"{self.path}/{STEPS_DIR}/{step}", version=self.version)

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
            if file_sha256(p) != want:
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
