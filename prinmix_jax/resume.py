"""Resuming an unfinished compress run: ``OUT.partial`` is kept only when it was started with the same
settings, every finished step's inputs are unchanged and (global scope) the bit allocation is the same;
otherwise it is discarded and the run starts over."""
from __future__ import annotations

import hashlib
import os
import shutil

import jax
import numpy as np

from prinmix_jax.delta_tree import block_deltas, global_deltas
from prinmix_jax.distributed import barrier, broadcast_int
from prinmix_jax.storage import OUTPUT_MARKER, STEPS_DIR, StepStore

__all__ = ["step_digests", "reuse_or_discard", "widths_digest", "restart_if_widths_changed"]


def step_digests(step: int, base_src, ft_src, block_table, global_table) -> tuple[str, str]:
    """``(base digest, fine-tuned digest)`` of the tensors step ``step`` consumes (tensor_digest)."""
    if step == 0:       # one tensor at a time (a 7B embedding is 2.1 GB in float32)
        return global_deltas(global_table, base_src, ft_src, keep=False)[0]
    return block_deltas(block_table, base_src, ft_src, step - 1, deltas=False)[0]   # one tensor at a time


def _changed_inputs(store, num_steps, base_src, ft_src, block_table, global_table) -> str | None:
    """Why a finished step cannot be reused (its inputs changed), or None."""
    for s in store.all_steps():
        if s >= num_steps:
            break
        meta = store.restore_meta(s)
        got = step_digests(s, base_src, ft_src, block_table, global_table)
        for label, want, have in zip(("base", "fine-tuned"), (meta.get("base_digest"),
                                                             meta.get("finetuned_digest")), got):
            if want != have:
                where = "the embedding, final norm and head" if s == 0 else f"block {s - 1}"
                return (f"the {label} weights of {where} differ from the ones it compressed "
                        "(same names, shapes and sizes, other values)")
    return None


def reuse_or_discard(work, identity, base_src, ft_src, block_table, global_table, num_steps, say) -> None:
    """Keeps an unfinished run in ``work`` only if it was started with the same settings and every finished
    step's inputs (base and fine-tuned tensors, by content) are unchanged; else deletes it, if prinmix made it.
    """
    store, old = None, None
    try:
        store = StepStore(os.path.join(work, STEPS_DIR), read_only=True)
        old = store.run_identity()
    except Exception:
        pass
    if not os.path.isfile(os.path.join(work, OUTPUT_MARKER)) and old is None:
        raise FileExistsError(f"{work!r} exists but is not an unfinished prinmix run; remove it or choose "
                              "another output")
    if old != identity:
        reason = "it was started with other inputs or settings"
    else:
        reason = _changed_inputs(store, num_steps, base_src, ft_src, block_table, global_table)
    if store is not None:
        store.close()
    if reason is None:
        say(f"resuming the unfinished run in {work}")
        return
    say(f"discarding {work}: {reason}; starting over")
    shutil.rmtree(work)


def widths_digest(widths) -> str | None:
    """SHA-256 of a global allocation (``{(block, name): widths}``), None without one."""
    if widths is None:
        return None
    h = hashlib.sha256()
    for (b, name), w in sorted(widths.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        h.update(f"{b}/{name}:".encode())
        h.update(np.ascontiguousarray(w, np.int32).tobytes())
    return h.hexdigest()


def restart_if_widths_changed(store, work: str, identity: dict, wdigest, say):
    """Every step of a global allocation depends on every block's error table: when the finished steps were
    compressed with other widths (the weights changed), they are discarded.

    Returns:
      ``(store, restarted)``: the store to continue with, and whether it was emptied.
    """
    primary = jax.process_index() == 0
    if store.latest_step() is None or not broadcast_int(
            int(primary and store.restore_meta(0).get("widths_digest") != wdigest)):
        return store, False
    say(f"discarding the finished steps in {work}: the global bit allocation differs from the unfinished "
        "run's (the weights changed); starting over")
    store.close()
    steps = os.path.join(work, STEPS_DIR)
    if primary:
        shutil.rmtree(steps)
    barrier("prinmix-restart")
    return StepStore(steps, identity), True
