"""Whole-model compression: stream base and fine-tuned checkpoints block by block, compress every
decoder-block linear (method.md §6), treat the other parameters by a stated policy, write an Orbax delta
checkpoint (see :mod:`prinmix_jax.storage`) that resumes after a crash.

Data flow (one way): checkpoints -> deltas -> core (``compress_stack`` / ``compress_matrix``) ->
allocation -> storage -> apply (:mod:`prinmix_jax.apply`).

Work units ("steps"): step 0 = the globals (embedding, final norm, output head), step ``b + 1`` = decoder
block ``b``. Same-shape matrices of a step that share an input Hessian (k/v, gate/up, ...) are compressed
together as one stack (the SVD and error table run sharded over a device mesh when the core provides
``compress_stack``). Peak host memory is about one block of both models plus the calibration hidden states;
on a mesh of several accelerators the deltas (and Hessians) of
:data:`~prinmix_jax.step_compress.SVD_WINDOW_BLOCKS` blocks are held, so that their SVDs start together, and
on accelerators the next blocks are read in a thread meanwhile (:func:`~prinmix_jax.sources.read_ahead`).

Multi-process (``jax.distributed``, one process per host): matrix ``j`` of step ``s`` is compressed by
process ``(16 s + j) % process_count``, which also writes it: after every step the processes exchange
only the step's JSON metadata, then each writes its own arrays into the shared Orbax step (see
:mod:`prinmix_jax.storage`). With the global scope the error tables of the first pass are split the same
way, gathered (they are small), and process 0 solves the one ILP and broadcasts the widths. Sequential
calibration reads each finished step back from the shared checkpoint. Results do not depend on the number
of devices or processes.

This module checks the arguments, prepares the working folder and runs the global allocation pass; the
rest lives in:

- :mod:`prinmix_jax.sources`: reading a model step by step (:class:`~prinmix_jax.sources.ModelSource`);
- :mod:`prinmix_jax.delta_tree`: parameter kinds, ``base + delta`` of a step, the compatibility check;
- :mod:`prinmix_jax.run`: the step loop (:class:`~prinmix_jax.run.RunPlan`, calibration flow, publishing);
- :mod:`prinmix_jax.step_compress`: the entries of one step, compressed and written;
- :mod:`prinmix_jax.svd_store`: the SVDs (and V passes) the global scope's first pass keeps for its second;
- :mod:`prinmix_jax.resume`: whether an unfinished run may be resumed;
- :mod:`prinmix_jax.distributed`: who owns what, host-side collectives;
- :mod:`prinmix_jax.run_summary`: ``prinmix_delta.json`` and :func:`result_problems`.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
from typing import Callable

import jax
import numpy as np

from prinmix_jax.allocation import allocate_bits_global
from prinmix_jax.compress import check_settings, error_tables
from prinmix_jax.config import CALIBRATION_MODES, METHODS, SCOPES, CompressionConfig
from prinmix_jax.core.mesh import default_mesh
from prinmix_jax.core.svd import reusing_svds
from prinmix_jax.delta_tree import IncompatibleModelsError, block_deltas, check_compatible, merge_block, param_groups
from prinmix_jax.distributed import allgather_arrays, barrier, broadcast_array, check_shared, init_distributed
from prinmix_jax.methods.shared import index_costs
from prinmix_jax.models import LINEAR_NAMES
from prinmix_jax.models.calibration import block_forward_with_hessians, embed, tokenize_calibration
from prinmix_jax.models.hf_io import TOKENIZER_FILES
from prinmix_jax.models.llama.params import block_param_table, global_param_table
from prinmix_jax.policy import ParamPolicy
from prinmix_jax.resume import restart_if_widths_changed, reuse_or_discard, widths_digest
from prinmix_jax.run import RunPlan, progress_bar, run_steps
from prinmix_jax.run_summary import result_problems
from prinmix_jax.sources import ModelSource, NonFiniteWeightsError, read_ahead
from prinmix_jax.step_compress import (owned_stacks, read_ahead_blocks, split_deltas, started_together, svd_stacks,
                                      svd_window, with_hessians)
from prinmix_jax.svd_store import SVD_DIR, SVDStore, svd_key
from prinmix_jax.storage import (FORMAT_VERSION, HF_DIR, STEPS_DIR, WORK_SUFFIX, StepStore, check_output_location,
                                 file_sha256, write_output_marker)

__all__ = ["ParamPolicy", "compress_model", "init_distributed", "IncompatibleModelsError", "NonFiniteWeightsError",
           "result_problems", "CALIBRATION_MODES",
           "merge_block", "param_groups"]

#: What the global scope's first pass keeps of its SVDs for the second (:class:`~prinmix_jax.svd_store.SVDStore`
#: policy): ``"auto"`` (when recomputing would take longer than reading back), ``"always"``, ``"never"``.
SVD_REUSE = "auto"


def compress_model(base, finetuned, out, *, calib=None, config: CompressionConfig | None = None,
                   method: str = "prinmix", calibration_mode: str = "parallel", policy: ParamPolicy | None = None,
                   seq_len: int = 128, num_sequences: int | None = None, tokenizer_dir=None, model_config=None,
                   mesh=None, scope: str | None = None, calib_chunk_size: int = 8, overwrite: bool = False,
                   progress: bool = False,
                   log: Callable[[str], None] | None = None, _stop_after_steps: int | None = None) -> dict:
    """Compresses ``finetuned − base`` into an Orbax delta checkpoint at ``out``.

    Args:
      base, finetuned: Hugging Face checkpoint folders (or ``CheckpointReader``\\ s, ``CausalLM`` models, or
        param trees with ``model_config``) of the same architecture and shapes.
      out: output folder. Work happens in ``out + ".partial"`` (an Orbax CheckpointManager, one step per
        finished block); it is renamed to ``out`` when complete. A killed run resumes from the last
        finished step when started again with the same inputs and settings.
      calib: calibration data: a ``.txt`` file, a ``.jsonl`` with ``"text"`` (tokenized with the fine-tuned
        checkpoint's tokenizer) or pre-tokenized ``"ids"``, a ``.npy``, or an int array ``(N, T)``. ``None``
        = data-free (identity Hessians).
      config: :class:`CompressionConfig` (budget ratio, widths, group size, ...).
      method: one of :data:`prinmix_jax.METHODS`.
      calibration_mode: ``"parallel"`` (Hessians from one streamed pass of the fine-tuned model) or
        ``"sequential"`` (block b sees hidden states from already-compressed blocks 0..b-1).
      policy: :class:`ParamPolicy` for norms, biases, embeddings and output head.
      seq_len, num_sequences: calibration windows (num_sequences=None: all complete windows).
      tokenizer_dir: tokenizer folder for text (default: the fine-tuned checkpoint folder).
      model_config: ``ModelConfig`` when base/finetuned are param trees.
      mesh: device mesh for the stacked SVD / error tables (default: every local device on one axis).
      scope: ``"matrix"`` (one ILP per matrix, each within its own budget) or ``"global"`` (PrinMix only:
        a first pass computes every block linear's error table, one ILP over all of them under the sum of
        their budgets — errors relative to each matrix's ``‖ΔW X‖²`` — then the blocks are compressed
        with those widths; needs parallel calibration or data-free). ``None`` (default): ``"global"`` for
        PrinMix with parallel calibration or data-free, which measured best on the SFT pair (README),
        ``"matrix"`` otherwise.
      calib_chunk_size: calibration sequences per jitted step.
      overwrite: replace an existing ``out``.
      progress: show a progress bar on stderr.
      log: optional callable receiving one-line status messages.

    Returns:
      The top-level metadata written to ``out/prinmix_delta.json`` (bytes, ratio, fingerprint, per-matrix
      info).

    Raises:
      FileExistsError: ``out`` exists and ``overwrite`` is false.
      IncompatibleModelsError: different architectures / shapes.
      FileNotFoundError, CheckpointError, CalibrationDataError, ValueError: bad inputs or settings.
      OSError: the output location is not writable.
    """
    t_start = time.perf_counter()
    say = log or (lambda s: None)
    cfg = config if config is not None else CompressionConfig()
    scope = _check_arguments(cfg, method, calibration_mode, scope, calib)
    pol = policy if policy is not None else ParamPolicy()
    inputs = [x for x in (base, finetuned, calib, tokenizer_dir) if isinstance(x, (str, os.PathLike))]
    out = check_output_location(out, overwrite, inputs, scratch_suffixes=(WORK_SUFFIX,))
    work = out + WORK_SUFFIX

    base_src = ModelSource(base, model_config, "base")
    ft_src = ModelSource(finetuned, model_config, "fine-tuned")
    check_compatible(base_src.config, ft_src.config)
    mcfg = ft_src.config
    block_table, global_table = param_groups(mcfg)
    check_settings(_budget_shapes(mcfg, pol), cfg, method, scope)
    ids, calib_prov = (None, None)
    if calib is not None:
        ids, calib_prov = _calibration_ids(calib, ft_src, tokenizer_dir, seq_len, num_sequences)
        calib_prov["mode"] = calibration_mode
    identity = {"format_version": FORMAT_VERSION, "method": method, "scope": scope, "config": cfg.to_dict(),
                "policy": pol.to_dict(), "calibration": calib_prov, "base_header": base_src.header_digest(),
                "finetuned_header": ft_src.header_digest()}
    plan = RunPlan(work=work, out=out, model_config=mcfg, block_table=block_table, global_table=global_table,
                   config=cfg, method=method, policy=pol, calibration_mode=calibration_mode, ids=ids,
                   calibration=calib_prov, mesh=default_mesh(mesh),
                   identity=json.loads(json.dumps(identity)), chunk_size=calib_chunk_size, overwrite=overwrite,
                   progress=progress, log=say, stop_after_steps=_stop_after_steps, t_start=t_start)
    _prepare_work_dir(plan, base_src, ft_src)
    if scope == "global":
        svd_folder = os.path.join(work, SVD_DIR, f"p{jax.process_index()}")
        plan = dataclasses.replace(plan, svd_store=SVDStore(svd_folder, SVD_REUSE))
    store = StepStore(os.path.join(work, STEPS_DIR), plan.identity)
    created_here = store.latest_step() is None
    try:
        if scope == "global":
            widths = _global_widths(plan, base_src, ft_src)
            plan.svd_store.freeze()
            plan = dataclasses.replace(plan, widths=widths, widths_digest=widths_digest(widths))
        store, restarted = restart_if_widths_changed(store, work, plan.identity, plan.widths_digest, say)
        created_here = created_here or restarted
        return run_steps(plan, store, base_src, ft_src)
    except Exception:
        store.close()
        # Deterministic failures leave nothing behind when no step was finished by this run's start.
        if jax.process_index() == 0 and created_here and os.path.isdir(work):
            shutil.rmtree(work, ignore_errors=True)
        raise
    finally:
        base_src.close()
        ft_src.close()
        if plan.svd_store is not None:
            plan.svd_store.remove()


def _check_arguments(cfg, method: str, calibration_mode: str, scope: str | None, calib) -> str:
    """Refuses bad settings before any work; returns the scope (``None`` resolved to its default)."""
    if not isinstance(cfg, CompressionConfig):
        raise ValueError(f"config must be a CompressionConfig, got {type(cfg).__name__}")
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if calibration_mode not in CALIBRATION_MODES:
        raise ValueError(f"calibration_mode must be one of {CALIBRATION_MODES}, got {calibration_mode!r}")
    sequential = calib is not None and calibration_mode == "sequential"
    if scope is None:
        scope = "global" if method == "prinmix" and not sequential else "matrix"
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    if scope == "global" and method != "prinmix":
        raise ValueError(f"scope='global' allocates PrinMix widths; it does not apply to method {method!r}")
    if scope == "global" and sequential:
        raise ValueError("scope='global' needs every error table before any block is compressed, so it "
                         "cannot use sequential calibration; use calibration_mode='parallel'")
    return scope


def _prepare_work_dir(plan: RunPlan, base_src: ModelSource, ft_src: ModelSource) -> None:
    """Process 0 keeps a resumable ``work`` folder or starts a new one (with the marker and ``hf/``); then
    every process checks that it sees it."""
    work = plan.work
    if jax.process_index() == 0:
        if os.path.isdir(work) and not os.path.islink(work):
            reuse_or_discard(work, plan.identity, base_src, ft_src, plan.block_table, plan.global_table,
                             plan.num_steps, plan.log)
        elif os.path.lexists(work):
            raise FileExistsError(f"{work!r} exists and is not a folder prinmix made; remove it")
        os.makedirs(work, exist_ok=True)
        write_output_marker(work, "delta")
        hf_dst = os.path.join(work, HF_DIR)
        os.makedirs(hf_dst, exist_ok=True)
        if ft_src.path is not None:
            for fname in ("config.json",) + TOKENIZER_FILES:
                src = os.path.join(ft_src.path, fname)
                if os.path.isfile(src):
                    shutil.copyfile(src, os.path.join(hf_dst, fname))
        if not os.path.isfile(os.path.join(hf_dst, "config.json")):
            with open(os.path.join(hf_dst, "config.json"), "w", encoding="utf-8") as f:
                json.dump(plan.model_config.to_hf_dict(), f, indent=2, sort_keys=True)
    barrier("prinmix-work-dir")
    check_shared(work, plan.out)


def _budget_shapes(mcfg, pol) -> dict:
    """``{"blocks": [(m, n) of every decoder-block linear], "globals": [(m, n) compressed outside]}``."""
    blocks = [tuple(shape) for _, path, shape in block_param_table(mcfg)
              if len(shape) == 2 and path[-1] == "weight"] * mcfg.num_layers
    glob = [tuple(shape) for _, path, shape in global_param_table(mcfg)
            if len(shape) == 2 and getattr(pol, "embeddings" if path[0] == "embed_tokens" else "lm_head") == "compress"]
    return {"blocks": blocks, "globals": glob}


def _calibration_ids(calib, ft: ModelSource, tokenizer_dir, seq_len, num_sequences):
    tdir = tokenizer_dir if tokenizer_dir is not None else ft.path
    ids = tokenize_calibration(calib, tdir, seq_len=seq_len, num_sequences=num_sequences)
    prov = {"num_sequences": int(ids.shape[0]), "seq_len": int(ids.shape[1]), "tokens": int(ids.size),
            "ids_sha256": hashlib.sha256(np.ascontiguousarray(ids, np.int32).tobytes()).hexdigest()}
    if isinstance(calib, (str, os.PathLike)):
        prov.update(source=os.path.basename(os.fspath(calib)), file_sha256=file_sha256(os.fspath(calib)))
    else:
        prov["source"] = "in-memory ids"
    return ids, prov


# ----- the first pass of the global scope --------------------------------------------------------
def _my_error_tables(plan: RunPlan, base_src, ft_src) -> list:
    """``[([block, name, shape], error table)]`` of the block linears this process will compress (the
    same assignment as the second pass); all-zero deltas are left out (they store nothing).

    On several devices the deltas of a window of blocks (:func:`~prinmix_jax.step_compress.svd_window`) are
    read together, with their Hessians when calibrated (the forward in order), and their SVDs started
    together, and the GPTQ set-ups of their Hessians (:func:`~prinmix_jax.step_compress.started_together`); the
    tables then follow block by block.
    On accelerators the next blocks are read in a thread meanwhile
    (:func:`~prinmix_jax.step_compress.read_ahead_blocks`)."""
    mcfg, chunk = plan.model_config, plan.chunk_size
    mine = []
    h = None if plan.ids is None else embed(ft_src.embedding(), mcfg, plan.ids)
    bar = progress_bar(plan.progress and jax.process_index() == 0, mcfg.num_layers, 0, "error tables")
    window = svd_window(plan.mesh)
    calibrated = h is not None

    def load(b):      # host work only: it may run ahead in a thread (read_ahead); one tensor at a time
        _, deltas, ft_b, _ = block_deltas(plan.block_table, base_src, ft_src, b, digests=False, keep_ft=calibrated)
        return split_deltas(plan.block_table, deltas, plan.policy)[0], ft_b
    loads = read_ahead(load, range(mcfg.num_layers), read_ahead_blocks(plan.mesh, window))
    try:
        for w0 in range(0, mcfg.num_layers, window):
            ready = []
            for b in range(w0, min(w0 + window, mcfg.num_layers)):
                items, ft_b = next(loads)
                if h is not None:
                    h, hess = block_forward_with_hessians(ft_b, mcfg, h, layer=b, chunk_size=chunk)
                    items = with_hessians(items, hess)
                    del hess
                ft_b = None   # the tables need the deltas and Hessians only: 1.6 GB less, 7B block
                # the stacks the second pass compresses (the same owners, all-zero deltas left out: they store
                # nothing)
                ready.append((b, owned_stacks(items, b + 1, plan.mesh)[1]))
                del items
            stacks = [s for b, chunks in ready for s in svd_stacks(chunks, b + 1)]
            with started_together(stacks, plan.config, "prinmix", plan.mesh, plan.svd_store):
                del stacks
                while ready:
                    b, chunks = ready.pop(0)
                    _block_tables(plan, b, chunks, mine)
                    del chunks
                    bar.update(1)
    finally:
        loads.close()
    bar.close()
    return mine


def _block_tables(plan: RunPlan, b: int, chunks: list, mine: list) -> None:
    """Appends ``([b, name, shape], table)`` for every stack of ``chunks``
    (:func:`~prinmix_jax.step_compress.owned_stacks`; emptied as it goes)."""
    while chunks:
        members = chunks.pop(0)
        hs = None if members[0].hessian is None else [m.hessian for m in members]
        with reusing_svds(plan.svd_store, [svd_key(b, m.name) for m in members]):
            tables = error_tables([m.delta for m in members], hs, plan.config, mesh=plan.mesh)
        for m, e in zip(members, tables):
            mine.append(([b, m.name, list(m.delta.shape)], np.asarray(e)))
        del members, hs, tables


def _global_widths(plan: RunPlan, base_src, ft_src) -> dict:
    """First pass of the global scope: every block linear's error table, then one ILP. The SVDs go to
    ``plan.svd_store``, which keeps those worth reading back in the second pass.

    With several processes each computes the tables of the matrices it will compress; the tables are
    gathered and process 0 solves the ILP and broadcasts the widths, so every process uses the same
    allocation.

    Returns:
      ``{(block, linear name): (r,) widths}`` (all-zero deltas are left out: they store nothing).
    """
    cfg = plan.config
    order = {n: i for i, n in enumerate(LINEAR_NAMES)}
    tables = sorted(allgather_arrays(_my_error_tables(plan, base_src, ft_src)),
                    key=lambda kt: (kt[0][0], order[kt[0][1]]))
    keys = [(b, name) for (b, name, _), _ in tables]
    costs = [index_costs(*shape, cfg) for (_, _, shape), _ in tables]
    budget = sum(cfg.budget_bits(*shape) for (_, _, shape), _ in tables)
    sizes = [t.shape[0] for _, t in tables]
    flat = np.zeros(sum(sizes), np.int32)
    if jax.process_index() == 0 and tables:
        widths, alloc = allocate_bits_global([t for _, t in tables], costs, budget, cfg.bits,
                                             max_widths=cfg.max_widths, solver=cfg.solver, time_limit=cfg.time_limit,
                                             mip_rel_gap=cfg.ilp_gap)
        plan.log(f"global allocation over {len(keys)} matrices: {alloc.cost_bits // 8} of {budget // 8} bytes, "
                 f"{alloc.seconds:.1f} s ({alloc.solver})")
        flat = np.concatenate([np.asarray(w, np.int32) for w in widths])
    flat = broadcast_array(flat)
    return dict(zip(keys, np.split(flat, np.cumsum(sizes)[:-1]) if sizes else []))
