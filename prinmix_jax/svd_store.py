"""The global scope's SVDs, and its error tables' GPTQ passes of V, kept on local disk between its two passes
(:class:`SVDStore`), so that the second pass reads them back instead of computing them again."""
from __future__ import annotations

import os
import re
import shutil
import threading
import time

import jax
import numpy as np

__all__ = ["SVDStore", "SVD_DIR", "SVD_POLICIES", "svd_key"]

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

    def holds_passes(self, keys) -> bool:
        """Whether V passes are kept for every one of ``keys`` (under any tag; nothing is read)."""
        names = set(os.listdir(self.folder)) if os.path.isdir(self.folder) else set()
        prefixes = [os.path.basename(self._path(k, "passes-")) for k in keys]
        return all(any(n.startswith(p) for n in names) for p in prefixes)

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
