"""``compress_matrix`` / ``compress_stack``: deltas, end to end (method.md §1–4 and Baselines).

This module validates the inputs and hands them to the method chosen by name from the registry
(:mod:`prinmix_jax.methods`: one unit per method, the shared steps in
:mod:`prinmix_jax.methods.shared`). The helpers of those modules that callers use are re-exported here.
"""
from __future__ import annotations

import time

import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from prinmix_jax.allocation import check_solver
from prinmix_jax.config import METHODS, CompressionConfig
from prinmix_jax.core.mesh import BATCH_AXIS, default_mesh, single_device_mesh
from prinmix_jax.methods import REGISTRY, Stack, get_method
from prinmix_jax.methods.baselines import DELTACOME_BITS, DELTACOME_SCHEDULE
from prinmix_jax.methods.prinmix import stack_tables, table_rows, table_svd, table_svd_rank
from prinmix_jax.methods.shared import (gptq_kw, hessian_stack, max_kept_rank, output_error, pack_svd,
                                        padded_u_inputs, rank_bucket, reconstruct)

__all__ = ["BATCH_AXIS", "DELTACOME_BITS", "DELTACOME_SCHEDULE", "METHODS", "REGISTRY", "check_settings",
           "compress_matrix", "compress_stack", "default_mesh", "error_tables", "gptq_kw", "max_kept_rank",
           "output_error", "pack_svd", "padded_u_inputs", "rank_bucket", "reconstruct"]



def _validate(delta, hessian):
    d = np.asarray(delta)
    if d.ndim != 2:
        raise ValueError(f"delta must be a 2-D (out, in) matrix, got shape {d.shape}")
    if d.size == 0:
        raise ValueError(f"delta is empty (shape {d.shape})")
    if not np.issubdtype(d.dtype, np.floating) and d.dtype != jnp.bfloat16:
        raise ValueError(f"delta must be a floating-point array, got {d.dtype}")
    d = d.astype(np.float32, copy=False)     # no copy of a float32 delta: a 7B embedding is 2.1 GB
    if not np.all(np.isfinite(d)):
        raise ValueError("delta contains NaN or Inf")
    n = d.shape[1]
    if hessian is None:
        return d, None
    h = np.asarray(hessian)
    if h.shape != (n, n):
        raise ValueError(f"hessian must be ({n}, {n}) for a delta with {n} input features, got {h.shape}")
    h = h.astype(np.float32, copy=False)
    if not np.all(np.isfinite(h)):
        raise ValueError("hessian contains NaN or Inf")
    return d, h


def check_settings(shapes: dict, cfg: CompressionConfig, method: str, scope: str = "matrix") -> None:
    """Refuses settings that cannot give a useful result, before any work is done.

    Args:
      shapes: ``{"blocks": [(m, n), ...], "globals": [(m, n), ...]}``: the decoder-block linears (which
        share one budget under the global scope) and the matrices compressed outside the blocks.
      cfg: the compression settings.
      method: one of :data:`~prinmix_jax.config.METHODS`.
      scope: ``"matrix"`` or ``"global"``.

    Raises:
      ValueError: in the words of the CLI's options, when the global allocation lacks width 0, when
        ``bits`` has no 0 and storing every singular vector exceeds a matrix's budget (the ILP would be
        infeasible), or when the budget cannot keep a single singular vector of any matrix (every
        matrix would be stored as zero).
    """
    meth = get_method(method)
    blocks, glob = list(shapes.get("blocks", ())), list(shapes.get("globals", ()))
    meth.check_settings(blocks, glob, cfg, scope)
    everything = blocks + glob
    if not meth.follows_budget or not everything:
        return
    one = meth.one_index_bits
    if scope == "global" and blocks:
        fits = sum(cfg.budget_bits(m, n) for m, n in blocks) >= min(one(m, n, cfg) for m, n in blocks)
        fits = fits or any(cfg.budget_bits(m, n) >= one(m, n, cfg) for m, n in glob)
    else:
        fits = any(cfg.budget_bits(m, n) >= one(m, n, cfg) for m, n in everything)
    if not fits:
        m, n = max(everything, key=lambda s: s[0] * s[1])
        raise ValueError(f"ratio {cfg.ratio:.4g} (--ratio) leaves no room for a single singular vector: one "
                         f"costs {one(m, n, cfg) // 8} bytes in a {m}x{n} matrix whose budget "
                         f"is {cfg.budget_bits(m, n) // 8} bytes, so every matrix would be stored as zero; raise "
                         "the ratio (1/16 = 1 bit per parameter)")


def compress_matrix(delta, hessian=None, config: CompressionConfig | None = None, method: str = "prinmix",
                    *, return_info: bool = False):
    """Compresses one delta matrix under the byte budget ``config.ratio · 2 · m · n``.

    Args:
      delta: (m, n) ``W_ft − W_base`` in the ``[out, in]`` layout (any float dtype; upcast to f32).
      hessian: (n, n) input Hessian ``X Xᵀ / N`` or ``None`` for the identity (data-free).
      config: a :class:`CompressionConfig` (default settings if ``None``).
      method: ``"prinmix"``, ``"deltacome"``, ``"bitdelta"``, ``"lowrank"`` or ``"uniform"``.
      return_info: also return a dict of diagnostics (budget, bytes, allocation, timings,
        damping escalations, relative output error).

    Returns:
      A compressed matrix (:class:`SVDQuantDelta`, :class:`LowRankDelta` or :class:`SignDelta`),
      or ``(compressed, info)``.

    Raises:
      ValueError: bad shapes, NaN/Inf, empty input, an unknown method or solver, or an
        allocation that is not solved to optimality.
    """
    mesh = single_device_mesh()
    out = compress_stack([delta], None if hessian is None else [hessian], config, method, mesh=mesh,
                         return_info=return_info)
    return out[0]


def compress_stack(deltas, hessians=None, config: CompressionConfig | None = None, method: str = "prinmix",
                   *, mesh: Mesh | None = None, widths=None, u_rank: int | None = None,
                   return_info: bool = False) -> list:
    """Compresses a stack of same-shape deltas; the heavy steps run sharded over ``mesh``.

    The SVDs of all matrices run as one ``jax.jit``-compiled program whose batch axis is sharded over the
    mesh, each device taking its matrices one at a time (one matrix per device where the stack fits, no
    padding copies; several stacks' SVDs can be started together beforehand,
    :func:`~prinmix_jax.core.svd.prefetch_svds`); the GPTQ passes over the rows of V
    (error tables, the V step at given widths, Delta-CoMe's) spread the rows of the whole stack over the
    devices in fixed tiles (:func:`~prinmix_jax.core.mesh.run_stack_rows`: no padding copies, the same
    bytes on 1 and 8 devices). The allocations (host) and the U step follow per matrix (on several
    accelerators side by side, one device each: :func:`~prinmix_jax.methods.shared.per_matrix_on_devices`).
    Each result equals :func:`compress_matrix` of that matrix.

    Args:
      deltas: sequence of (m, n) arrays, or one (B, m, n) array.
      hessians: matching sequence of (n, n) Hessians, one (B, n, n) array, or ``None``.
      config, method: as in :func:`compress_matrix`.
      mesh: a 1-D :class:`jax.sharding.Mesh` (axis name ``"batch"``); default all devices.
      widths: optional per-matrix widths (one (r,) array each, values from ``config.bits``)
        decided elsewhere, e.g. by :func:`allocate_bits_global` over a whole model; the
        per-matrix allocation is then skipped (``"prinmix"`` and ``"uniform"`` only).
      u_rank: the U step of every matrix is padded (inertly) to ``rank_bucket(max(k, u_rank))`` for its
        kept rank k, and its programs compile once per padded rank. Default: the largest rank the
        budget can keep (:func:`max_kept_rank`), or with ``widths`` the largest kept rank among them, so
        that a model's blocks share one set of U programs per shape. It changes no result beyond
        float rounding.
      return_info: return ``(compressed, info)`` pairs.

    Returns:
      A list with one compressed matrix (or pair) per input.
    """
    cfg, pairs, meth = _prepare(deltas, hessians, config, method)
    if not pairs:
        return []
    m, n = pairs[0][0].shape
    stack = Stack(method=method, pairs=pairs, cfg=cfg, mesh=default_mesh(mesh), widths=widths, u_rank=u_rank,
                  return_info=return_info, t0=time.perf_counter())
    stack.infos = [{"method": method, "shape": (m, n), "budget_bits": stack.budget} for _ in pairs]
    return meth.compress(stack)


def _prepare(deltas, hessians, config, method):
    """Validates the arguments shared by :func:`compress_stack` and :func:`error_tables`; returns
    ``(config, [(delta, hessian) float32 numpy], method)``."""
    cfg = config if config is not None else CompressionConfig()
    if not isinstance(cfg, CompressionConfig):
        raise ValueError(f"config must be a CompressionConfig, got {type(cfg).__name__}")
    meth = get_method(method)
    check_solver(cfg.solver)
    if hessians is not None and len(hessians) != len(deltas):
        raise ValueError(f"got {len(deltas)} deltas but {len(hessians)} hessians")
    pairs = [_validate(d, None if hessians is None else hessians[i]) for i, d in enumerate(deltas)]
    shapes = {p[0].shape for p in pairs}
    if len(shapes) > 1:
        raise ValueError(f"a stack needs same-shape deltas, got shapes {sorted(shapes)}")
    return cfg, pairs, meth


def svd_request(deltas, hessians=None, config: CompressionConfig | None = None, method: str = "prinmix", *,
                widths=None) -> dict | None:
    """The plain SVD that :func:`compress_stack` (or, for ``"prinmix"`` without widths, :func:`error_tables`)
    with these arguments takes first, as :func:`~prinmix_jax.core.svd.svd_sharded`'s keyword arguments
    (``{}``: the full SVD; :meth:`~prinmix_jax.methods.base.Method.svd_request`), or ``None`` where it takes
    none or the arguments are not a valid stack (the call itself says why). Nothing is validated or computed:
    :func:`~prinmix_jax.core.svd.prefetch_svds` starts these SVDs for several stacks at once."""
    shapes = {tuple(getattr(d, "shape", np.shape(d))) for d in deltas}    # a DeferredDelta is not read
    if len(shapes) != 1 or len(next(iter(shapes))) != 2:
        return None
    pairs = [(d, None if hessians is None else hessians[i]) for i, d in enumerate(deltas)]
    stack = Stack(method=method, pairs=pairs, cfg=config if config is not None else CompressionConfig(),
                  mesh=None, widths=widths)
    try:
        return get_method(method).svd_request(stack)
    except ValueError:             # bad widths or settings: compress_stack raises with its own message
        return None


def error_tables(deltas, hessians=None, config: CompressionConfig | None = None, *,
                 mesh: Mesh | None = None) -> list[np.ndarray]:
    """Error tables ``e[i, b]`` (method.md §2) of a stack of same-shape deltas, sharded over ``mesh``.

    This is the first pass of a global allocation: the tables of every matrix of a model go to
    :func:`allocate_bits_global`, whose widths then go to :func:`compress_stack`.

    With a truncated SVD (``config.svd``, :func:`~prinmix_jax.methods.shared.svd_rank`) the rows past its
    rank stand for the indices it did not compute (:func:`~prinmix_jax.methods.prinmix.pad_tail`): they
    carry the rest of ``‖ΔW X‖² / N`` in column 0 and are never worth keeping; :func:`compress_stack`
    with the same config computes the same SVD.

    Returns:
      One float64 array (r, len(config.bits)) per delta, ``r = min(m, n)``.
    """
    cfg, pairs, _ = _prepare(deltas, hessians, config, "prinmix")
    if not pairs:
        return []
    stack = Stack(method="prinmix", pairs=pairs, cfg=cfg, mesh=default_mesh(mesh))
    u, sigma, v = table_rows(stack, *table_svd(stack, table_svd_rank(stack)))
    return list(stack_tables(stack, u, sigma, v, hessian_stack(stack))[0])
