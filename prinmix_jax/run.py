"""The step loop of a compress run: step 0 (the globals), then one step per decoder block, each written to
the step store as soon as it is finished; then the summary, and the atomic publication of ``OUT``.

Calibration hidden states flow from block to block: ``"parallel"`` through the fine-tuned blocks (the
Hessians come from the same pass), ``"sequential"`` through the compressed blocks, read back from the
(shared) checkpoint. A resumed run replays the hidden states through the finished blocks.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import sys
import time
from typing import Any, Callable, NamedTuple

import jax
import numpy as np

from prinmix_jax.config import CompressionConfig
from prinmix_jax.delta_tree import block_deltas, global_deltas, merge_block
from prinmix_jax.distributed import barrier, broadcast_int
from prinmix_jax.models.calibration import block_forward, block_forward_with_hessians, embed
from prinmix_jax.policy import ParamPolicy
from prinmix_jax.run_summary import build_summary, result_problems
from prinmix_jax.sources import read_ahead
from prinmix_jax.step_compress import (STACK_SPLIT_BYTES, compress_entries, owned_stacks,
                                       preload_kept_svds, read_ahead_blocks, save_step, split_deltas,
                                       started_together, svd_stacks, svd_window, with_hessians)
from prinmix_jax.storage import decode_step, publish, write_summary
from prinmix_jax.svd_store import SVD_DIR

__all__ = ["RunPlan", "run_steps", "progress_bar"]


@dataclasses.dataclass(frozen=True)
class RunPlan:
    """The settings and constants of one compress run (everything but the model sources and the store).

    Attributes:
      work, out: the working folder (``out + ".partial"``) and the final output folder.
      model_config: the fine-tuned model's ``ModelConfig``.
      block_table, global_table: ``(path, kind)`` lists (:func:`~prinmix_jax.delta_tree.param_groups`).
      config, method, policy: what to compress and how.
      calibration_mode: ``"parallel"`` or ``"sequential"``.
      ids: calibration token ids ``(N, T)``, or None (data-free); ``calibration``: their provenance.
      mesh: the device mesh for the stacked SVD / error tables.
      identity: the run identity (decides whether an unfinished run may be resumed).
      widths: ``{(block, name): widths}`` of a global allocation, or None; ``widths_digest``: its SHA-256.
      chunk_size: calibration sequences per jitted step.
      overwrite, progress: replace an existing ``out``; show progress bars.
      log: receives one-line status messages.
      stop_after_steps: stop after this many steps (tests of resume); None = run to the end.
      t_start: ``time.perf_counter()`` when the run started.
      svd_store: the global scope's :class:`~prinmix_jax.svd_store.SVDStore` (SVDs of the first pass
        for the second), or None.
    """
    work: str
    out: str
    model_config: Any
    block_table: list
    global_table: list
    config: CompressionConfig
    method: str
    policy: ParamPolicy
    calibration_mode: str
    ids: np.ndarray | None
    calibration: dict | None
    mesh: Any
    identity: dict
    widths: dict | None = None
    widths_digest: str | None = None
    chunk_size: int = 8
    overwrite: bool = False
    progress: bool = False
    log: Callable[[str], None] = lambda message: None
    stop_after_steps: int | None = None
    t_start: float = 0.0
    svd_store: Any = None

    @property
    def num_steps(self) -> int:
        return self.model_config.num_layers + 1


def progress_bar(enabled: bool, total: int, initial: int, desc: str):
    """A tqdm bar on stderr (disabled: a no-op bar)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="step", disable=not enabled, file=sys.stderr,
                dynamic_ncols=True)


def _largest_ranks(widths) -> dict | None:
    """The largest kept rank of every linear name over the model (see :func:`compress_entries`)."""
    if widths is None:
        return None
    u_ranks = {}
    for (_, name), w in widths.items():
        u_ranks[name] = max(u_ranks.get(name, 0), int(np.count_nonzero(w)))
    return u_ranks


def _step_meta(plan: RunPlan, step: int, t0: float, digests: tuple[str, str]) -> dict:
    return {"step": step, "block": None if step == 0 else step - 1, "seconds": time.perf_counter() - t0,
            "widths_digest": plan.widths_digest, "base_digest": digests[0], "finetuned_digest": digests[1]}


def _compress_globals(plan: RunPlan, store, base_src, ft_src) -> None:
    """Step 0: the embedding, final norm and output head (data-free), read one tensor at a time
    (:func:`~prinmix_jax.delta_tree.global_deltas`). The large deltas (the embedding and head) are read again
    when compressed (:class:`~prinmix_jax.delta_tree.DeferredDelta`): one of them is held at a time."""
    t0 = time.perf_counter()
    digests, deltas = global_deltas(plan.global_table, base_src, ft_src, defer_bytes=STACK_SPLIT_BYTES)
    items, dense = split_deltas(plan.global_table, deltas, plan.policy)
    entries = compress_entries(items, plan.config, plan.method, plan.mesh, 0)
    save_step(store, 0, items, entries, dense, _step_meta(plan, 0, t0, digests))


def _first_hidden(plan: RunPlan, store, base_src, ft_src):
    """The calibration hidden states entering block 0 (through the compressed embedding when sequential)."""
    if plan.calibration_mode == "sequential":
        table = [(p, kind) for p, kind in plan.global_table if tuple(p) == ("embed_tokens", "weight")]
        tree = merge_block(base_src.embedding(), decode_step(*store.restore(0)), table)
    else:
        tree = ft_src.embedding()
    return embed(tree, plan.model_config, plan.ids)


def _through_compressed(plan: RunPlan, store, base_b: dict, b: int, h):
    """Hidden states after the compressed block ``b`` (read back from the shared checkpoint)."""
    merged = merge_block(base_b, decode_step(*store.restore(b + 1)), plan.block_table)
    return block_forward(merged, plan.model_config, h, layer=b, chunk_size=plan.chunk_size)


def _replay_block(plan: RunPlan, store, base_src, ft_src, b: int, h):
    """Carries the calibration state through block ``b``, finished by an earlier run."""
    if h is None:
        return None
    if plan.calibration_mode == "parallel":
        return block_forward_with_hessians(ft_src.block(b), plan.model_config, h, layer=b,
                                           chunk_size=plan.chunk_size)[0]
    return _through_compressed(plan, store, base_src.block(b), b, h)


class _Block(NamedTuple):
    """A decoder block read from the sources (:func:`_load_block`, possibly in a read-ahead thread), then
    ready to compress (:func:`_read_block`: with its Hessians, ``ft`` dropped, ``h_next`` set)."""
    block: int
    items: list             # StepItems (with their Hessians once read)
    dense: dict
    digests: tuple
    ft: dict | None         # the fine-tuned block, kept for the calibration forward
    base: dict | None       # the base block, kept for the sequential calibration's forward
    h_next: Any             # hidden states after the fine-tuned block (parallel calibration), or None
    seconds: float


def _load_block(plan: RunPlan, base_src, ft_src, b: int) -> _Block:
    """Reads decoder block ``b``, takes its deltas and digests, and reads the SVDs the global scope's first
    pass kept for it: host work only (no device program), so that it can run ahead in a thread
    (:func:`~prinmix_jax.sources.read_ahead`)."""
    t0 = time.perf_counter()
    calibrated = plan.ids is not None
    keep_base = calibrated and plan.calibration_mode == "sequential"
    # one tensor of each model at a time: the deltas, the digests, and the blocks a calibration forward needs
    digests, deltas, ft_b, base_b = block_deltas(plan.block_table, base_src, ft_src, b, keep_ft=calibrated,
                                                 keep_base=keep_base)
    items, dense = split_deltas(plan.block_table, deltas, plan.policy)
    if read_ahead_blocks(plan.mesh):     # (else each stack reads its own when its turn comes: less memory)
        preload_kept_svds(plan.svd_store, items, b + 1, plan.mesh, plan.config, plan.method,
                          _block_widths(plan, b), calibrated)
    return _Block(b, items, dense, digests, ft_b, base_b, None, time.perf_counter() - t0)


def _read_block(plan: RunPlan, loaded: _Block, h) -> _Block:
    """Block ``loaded.block`` with the Hessians of its fine-tuned forward from ``h`` (calibrated)."""
    t0 = time.perf_counter()
    items, h_next = loaded.items, None
    if h is not None:
        h_next, hess = block_forward_with_hessians(loaded.ft, plan.model_config, h, layer=loaded.block,
                                                   chunk_size=plan.chunk_size)
        items = with_hessians(items, hess)
        del hess
    return loaded._replace(items=items, ft=None, h_next=h_next, seconds=loaded.seconds + time.perf_counter() - t0)


def _block_widths(plan: RunPlan, b: int) -> dict | None:
    return None if plan.widths is None else {n: w for (bb, n), w in plan.widths.items() if bb == b}


def _write_block(plan: RunPlan, store, read: _Block, u_ranks) -> None:
    """Step ``read.block + 1``: compresses the block read and writes it."""
    t0 = time.perf_counter()
    step = read.block + 1
    entries = compress_entries(read.items, plan.config, plan.method, plan.mesh, step,
                               _block_widths(plan, read.block), u_ranks, plan.svd_store)
    meta = _step_meta(plan, step, t0, read.digests)
    meta["seconds"] += read.seconds
    save_step(store, step, read.items, entries, read.dense, meta)


def _compress_block(plan: RunPlan, store, loaded: _Block, h, u_ranks):
    """Step ``b + 1``: compresses and writes decoder block ``b`` (``loaded``); returns the next hidden
    states."""
    b = loaded.block
    read = _read_block(plan, loaded, h)
    del loaded
    _write_block(plan, store, read, u_ranks)
    if read.base is None:
        return read.h_next
    base_b = read.base
    del read
    return _through_compressed(plan, store, base_b, b, h)


def _compress_window(plan: RunPlan, store, loads, count: int, h, u_ranks, done):
    """Steps of the next ``count`` decoder blocks of ``loads`` (consecutive) with their SVDs started together
    on the mesh, and so the GPTQ set-ups of their Hessians (:func:`~prinmix_jax.step_compress.started_together`):
    every block is read (and, with
    parallel calibration, run forward for its Hessians) first, then compressed and written in order.
    ``done(b)`` is called after each. Returns the hidden states after the last block."""
    reads, error = [], None
    for _ in range(count):
        try:
            loaded = next(loads)
        except Exception as e:      # noqa: BLE001 (re-raised below) a block that cannot be read: the blocks
            error = e               # before it are compressed and written first, as without the window
            break
        reads.append(_read_block(plan, loaded, h))
        del loaded
        h = reads[-1].h_next
    stacks = []
    for r in reads:
        stacks += svd_stacks(owned_stacks(r.items, r.block + 1, plan.mesh)[1], r.block + 1,
                             _block_widths(plan, r.block))
    with started_together(stacks, plan.config, plan.method, plan.mesh, plan.svd_store):
        del stacks
        while reads:
            read = reads.pop(0)
            _write_block(plan, store, read, u_ranks)
            done(read.block)
            del read
    if error is not None:
        raise error
    return h


def _block_windows(plan: RunPlan, start: int):
    """The decoder blocks to compress, in windows of blocks whose SVDs start together
    (:func:`~prinmix_jax.step_compress.svd_window`; one block at a time with sequential calibration, whose
    Hessians need the blocks before compressed), from step ``start`` on, up to ``plan.stop_after_steps``."""
    sequential = plan.ids is not None and plan.calibration_mode == "sequential"
    window = 1 if sequential else svd_window(plan.mesh)
    todo = list(range(max(start - 1, 0), plan.model_config.num_layers))
    if plan.stop_after_steps is not None:
        todo = todo[:max(plan.stop_after_steps - (start == 0), 0)]
    return [todo[i:i + window] for i in range(0, len(todo), window)]


def run_steps(plan: RunPlan, store, base_src, ft_src) -> dict:
    """Compresses every step not yet in ``store``, then publishes ``plan.out``.

    Returns:
      The summary (``prinmix_delta.json``), or ``{"stopped_after_steps": n}`` when ``plan.stop_after_steps``
      ended the run early.
    """
    latest = store.latest_step()
    num_steps, stop_after = plan.num_steps, plan.stop_after_steps
    start = broadcast_int(-1 if latest is None else latest) + 1
    if start > 0:
        plan.log(f"{start} of {num_steps} steps already finished; resuming")
    bar = progress_bar(plan.progress and jax.process_index() == 0, num_steps, start, "compress")
    done_this_run = 0
    if start == 0:
        _compress_globals(plan, store, base_src, ft_src)
        bar.update(1)
        done_this_run += 1
    h = None if plan.ids is None else _first_hidden(plan, store, base_src, ft_src)
    for b in range(min(max(start - 1, 0), plan.model_config.num_layers)):
        h = _replay_block(plan, store, base_src, ft_src, b, h)
    u_ranks = _largest_ranks(plan.widths)

    def done(_block):
        nonlocal done_this_run
        bar.update(1)
        done_this_run += 1
    windows = _block_windows(plan, start)
    loads = read_ahead(lambda b: _load_block(plan, base_src, ft_src, b), [b for w in windows for b in w],
                       read_ahead_blocks(plan.mesh, max(map(len, windows), default=1)))
    try:
        for blocks in windows:
            if len(blocks) == 1:
                h = _compress_block(plan, store, next(loads), h, u_ranks)
                done(blocks[0])
            else:
                h = _compress_window(plan, store, loads, len(blocks), h, u_ranks, done)
    finally:
        loads.close()
    bar.close()
    if stop_after is not None and store.latest_step() != num_steps - 1:
        store.close()
        return {"stopped_after_steps": done_this_run}
    return _finish(plan, store, base_src, ft_src)


def _finish(plan: RunPlan, store, base_src, ft_src) -> dict:
    """Every process reads the step metadata; process 0 writes the summary and publishes ``plan.out``."""
    summary = build_summary(store, plan, base_src, ft_src, time.perf_counter() - plan.t_start)
    summary["problems"] = result_problems(summary)
    store.close()
    if plan.svd_store is not None:
        plan.log(plan.svd_store.summary())
        plan.svd_store.remove()
    if jax.process_index() == 0:
        shutil.rmtree(os.path.join(plan.work, SVD_DIR), ignore_errors=True)   # the SVDs are not published
        summary = write_summary(plan.work, summary)
        publish(plan.work, plan.out, plan.overwrite)
    barrier("prinmix-published")
    return summary
