"""Multi-process runs (``jax.distributed``, one process per host): start-up, which process owns which entry
of a step, and the few host-side collectives compression needs (every one is a no-op with one process)."""
from __future__ import annotations

import json
import os
import shutil
from typing import Any

import jax
import numpy as np

from prinmix_jax.storage import HF_DIR, STEPS_DIR

__all__ = ["init_distributed", "STEP_STRIDE", "owner", "allgather_bytes", "allgather_json", "allgather_arrays",
           "barrier", "broadcast_array", "broadcast_int", "check_shared"]

STEP_STRIDE = 16  # > number of entries in a step; assignment of entries to processes


def init_distributed(coordinator: str | None = None, num_processes: int | None = None,
                     process_id: int | None = None) -> None:
    """``jax.distributed.initialize`` (no arguments on Cloud TPU: the slice describes itself).

    On CPU the cross-process collectives use gloo. Call before any other JAX work.
    """
    try:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    except Exception:  # option absent in some builds
        pass
    kw = {}
    if coordinator is not None:
        kw.update(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id)
    jax.distributed.initialize(**kw)


def owner(step: int, j: int) -> int:
    """The process that compresses (and writes) entry ``j`` of ``step``."""
    return (STEP_STRIDE * step + j) % jax.process_count()


def allgather_bytes(mine: bytes) -> list[bytes]:
    """Every process's ``mine``, in process order (``[mine]`` with one process)."""
    if jax.process_count() == 1:
        return [mine]
    from jax.experimental import multihost_utils

    buf = np.frombuffer(mine, np.uint8)
    lens = np.asarray(multihost_utils.process_allgather(np.array([buf.size], np.int64))).reshape(-1)
    padded = np.zeros(max(int(lens.max()), 1), np.uint8)
    padded[:buf.size] = buf
    everything = np.asarray(multihost_utils.process_allgather(padded))
    return [everything[p, :int(lens[p])].tobytes() for p in range(jax.process_count())]


def allgather_json(obj) -> list:
    """Every process's JSON-able ``obj``, in process order."""
    return [json.loads(b.decode()) for b in allgather_bytes(json.dumps(obj).encode())]


def allgather_arrays(items: list[tuple[Any, np.ndarray]]) -> list[tuple[Any, np.ndarray]]:
    """Every process's ``(JSON-able key, array)`` pairs, concatenated in process order."""
    header = json.dumps([[k, a.dtype.str, list(a.shape)] for k, a in items]).encode()
    mine = len(header).to_bytes(8, "little") + header + b"".join(np.ascontiguousarray(a).tobytes() for _, a in items)
    out = []
    for buf in allgather_bytes(mine):
        n = int.from_bytes(buf[:8], "little")
        off = 8 + n
        for k, dt, shape in json.loads(buf[8:off].decode()):
            dt = np.dtype(dt)
            nb = int(np.prod(shape)) * dt.itemsize
            out.append((k, np.frombuffer(buf[off:off + nb], dt).reshape(shape).copy()))
            off += nb
    return out


def barrier(name: str) -> None:
    """Waits until every process reaches the barrier ``name``."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def broadcast_array(x: np.ndarray) -> np.ndarray:
    """Process 0's ``x`` on every process (every process passes an array of the same shape and dtype)."""
    if jax.process_count() == 1:
        return x
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.broadcast_one_to_all(x))


def broadcast_int(x: int) -> int:
    """Process 0's ``x`` on every process."""
    return int(broadcast_array(np.array(x, np.int64)))


def check_shared(work: str, out: str) -> None:
    """Multi-process runs write one checkpoint together: every process must see the folder process 0 made.

    Raises on every process (so none is left waiting in a collective) when some do not.
    """
    if jax.process_count() == 1:
        return
    seen = allgather_json(os.path.isfile(os.path.join(work, HF_DIR, "config.json")))
    if all(seen):
        return
    blind = [p for p, ok in enumerate(seen) if not ok]
    if jax.process_index() == 0 and not os.path.isdir(os.path.join(work, STEPS_DIR)):
        shutil.rmtree(work, ignore_errors=True)
    raise OSError(f"process(es) {blind} do not see {work!r}, which process 0 created: in a multi-process run "
                  f"the output {out!r} must be on storage every host shares (NFS/Filestore, a gcsfuse-mounted "
                  f"bucket) and every process must be given the same path")
