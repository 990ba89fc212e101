"""PrinMix (method.md §1–4) and the uniform-width baseline, which share the error-table path.

Both run the SVD, the exact error table of every index at every width (GPTQ of V, §2) plus the
optional U-side estimate, choose widths from the table (PrinMix: the ILP of §3; uniform: one width
for the top-k indices), then the U step. Given widths (a global allocation) skip the table.
"""
from __future__ import annotations

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from prinmix_jax.allocation import allocate_bits
from prinmix_jax.core.gptq import HIGHEST, GPTQFactor, GPTQResult
from prinmix_jax.core.error_table import error_table, row_hessian_norms, select_rows, u_error_estimate
from prinmix_jax.core.mesh import run_sharded
from prinmix_jax.methods.base import Method, Stack
from prinmix_jax.methods.shared import (cheapest_index_bits, check_widths, gptq_kw, hessian_stack, index_costs,
                                        max_kept_rank, quantize_stack, stack_energy, stack_svd, svd_kwargs,
                                        svd_rank)
from prinmix_jax.methods.v_step import fixed_width_rows, offer_v_passes, stack_rows


@functools.cache
def _error_table_fn(**kw):
    return lambda v, s, h, r, d, damp: error_table(v, s, h, damp, GPTQFactor(r, d), **kw)


@functools.cache
def _error_table_identity_fn(**kw):
    """:func:`_error_table_fn` under the identity Hessian (data-free): round-to-nearest passes, nothing n×n."""
    return lambda v, s, damp: error_table(v, s, None, damp, **kw)


#: The row axes of :func:`error_table`'s outputs (:func:`~prinmix_jax.core.mesh.run_stack_rows`): ``e`` (k, nw)
#: and the passes (nnz, k, ...) by row; the damping of the passes (nnz,) depends on the Hessian only.
TABLE_ROWS = (0, GPTQResult(1, 1, 1, 1, None))


def allocation_tables(u, sigma, v, h_all, cfg, mesh, *, rank: int | None = None, energy=None):
    """The tables the allocation sees for a stack: the exact V-step table (method.md §2), plus the U-side
    estimate when ``cfg.u_error``; returns ``(tables float64 (B, r, nw), the V GPTQ passes)``.

    The GPTQ passes run on the k rows of ``v`` only. When the SVD was truncated (k < ``rank`` =
    ``min(m, n)``) the table is completed to ``rank`` rows by :func:`pad_tail` from ``energy`` (B,)
    (:func:`~prinmix_jax.methods.shared.stack_energy`), so that its column ``e[:, 0]`` still sums to the
    matrix's ``‖ΔW X‖² / N`` (the normalisation of the global allocation) and no tail index is kept.

    ``h_all`` (B, n, n), or ``None`` for a data-free stack: the identity, under which the GPTQ passes are
    round-to-nearest and are computed as such (the same bytes, without an n×n set-up per pass).

    The rows of V are spread over the devices (:func:`~prinmix_jax.core.mesh.run_stack_rows`): GPTQ's error
    feedback stays in a row, so a device needs only its rows and their Hessian. For the same V the passes are
    the same bytes on any device count, the table within 1e-6 relative (its batched ``(V − V̂) H (V − V̂)ᵀ``
    may round with the batch).
    """
    kw = dict(widths=cfg.bits, **gptq_kw(cfg))
    t = time.perf_counter()
    e, passes = stack_rows(_error_table_fn(**kw), _error_table_identity_fn(**kw), mesh, (v, sigma), h_all,
                           cfg.damp, out_rows=TABLE_ROWS, settings=gptq_kw(cfg))
    # the V step of the global scope's second pass takes its rows from these passes if they are kept
    offer_v_passes(v, h_all, passes, (time.perf_counter() - t) / max(1, sum(b > 0 for b in cfg.bits)), cfg)
    tables = np.asarray(e, np.float64)
    if cfg.u_error:
        d0 = np.asarray(e)[:, :, cfg.bits.index(0)] if 0 in cfg.bits else None    # σ² V H Vᵀ, already in the table
        tables = tables + _u_error_tables(u, sigma, v, h_all, cfg, d0)
    if rank is not None and rank > tables.shape[1]:
        tables = pad_tail(tables, rank, energy, cfg.bits)
    return tables, passes


def pad_tail(tables, rank: int, energy, bits) -> np.ndarray:
    """(B, k, nw) tables of the top k indices → (B, rank, nw): the rows k.. stand for the indices a truncated
    SVD did not compute. They share the rest of the energy, ``e[i, 0] = (energy − Σ_{j<k} e[j, 0]) /
    (rank − k)``, and keeping one at any width costs that plus the matrix's whole energy (a pair no optimal
    allocation picks, which the Lagrangian reduction removes at once)."""
    _, k, nw = tables.shape
    z = bits.index(0)
    energy = np.asarray(energy, np.float64)
    tail = np.maximum(energy - tables[:, :, z].sum(axis=1), 0.0) / (rank - k)          # (B,)
    penalty = np.where(energy > 0, energy, 1.0)
    rows = np.repeat((tail + penalty)[:, None, None], rank - k, axis=1) * np.ones((1, 1, nw))
    rows[:, :, z] = tail[:, None]
    return np.concatenate([tables, rows], axis=1)


def _whiten_factor(h, damp):
    """Lower Cholesky factor ``L`` of ``H + damp · mean(diag H) · I`` (``H = L Lᵀ``; an empty or non-finite
    mean diagonal counts as 1)."""
    n = h.shape[0]
    md = jnp.mean(jnp.diag(h))
    md = jnp.where(jnp.isfinite(md) & (md > 0), md, 1.0)
    return jnp.linalg.cholesky(h + (damp * md) * jnp.eye(n, dtype=h.dtype))


def _whiten(d, h, damp):
    low = _whiten_factor(h, damp)
    return jnp.matmul(d, low, precision=HIGHEST), low


def _unwhiten(v, low, scale):   # V' L⁻¹: rows of V with the metric of H
    return scale * jax.scipy.linalg.solve_triangular(low, v.T, lower=True, trans=1).T


def table_svd(stack, rank: int | None):
    """``(U, σ, V)`` of a table method's stack: :func:`~prinmix_jax.methods.shared.stack_svd`, or with
    ``cfg.whiten`` and a calibration Hessian the SVD in the metric of the layer's inputs (project choice,
    after SVD-LLM's truncation-aware whitening):

        ΔW L = U Σ V'   (H + λ·mean(diag H)·I = L Lᵀ),    V = V' L⁻¹,    so  ΔW = U Σ V.

    U keeps orthonormal columns, so the error table still splits exactly over indices (method.md §1), and
    ``V_i H V_iᵀ ≈ 1``: σ_i² is what dropping index i costs in output error, and the top k indices are the
    best rank-k output approximation instead of the best rank-k weight approximation.
    """
    cfg = stack.cfg
    if not cfg.whiten or stack.pairs[0][1] is None:
        return stack_svd(stack, rank)
    damp = np.float32(cfg.whiten_damp)
    dw, low = run_sharded(_whiten, stack.mesh, stack.deltas(), stack.hessians(), damp)
    dw, low = np.asarray(dw), np.asarray(low)
    white = dataclasses.replace(stack, pairs=[(dw[i], p[1]) for i, p in enumerate(stack.pairs)])
    u, sigma, v = stack_svd(white, rank)
    v = run_sharded(_unwhiten, stack.mesh, v, low, np.float32(1))
    return u, sigma, v


def table_svd_rank(stack) -> int | None:
    """The truncated SVD rank of a table method's stack (:func:`~prinmix_jax.methods.shared.svd_rank` of the
    most indices its budget keeps), or ``None`` for the full SVD."""
    m, n = stack.shape
    return svd_rank(m, n, stack.cfg, max_kept_rank(m, n, stack.cfg))


def table_rows(stack, u, sigma, v, given=None):
    """The SVD a table method's GPTQ passes run on: under ``cfg.svd="auto"`` a full SVD (taken where the
    Gram SVD would not pay) is cut to the rank a truncated one would have had (``svd_rank`` with
    ``"gram"``: ``k_max`` plus its margin), so the error tables and the V step cost ``k`` rows, not
    ``min(m, n)`` (a 7B ``down_proj``: 1704 of 4096), and the tail is completed by :func:`pad_tail` as for
    a truncated SVD. ``cfg.svd="full"`` keeps every row (the reference), as do widths given beyond ``k``.

    Returns:
      ``(u, sigma, v)``, cut or as given.
    """
    cfg = stack.cfg
    m, n = stack.shape
    k = sigma.shape[1]
    if cfg.svd != "auto" or k < min(m, n):
        return u, sigma, v
    cut = svd_rank(m, n, dataclasses.replace(cfg, svd="gram"), max_kept_rank(m, n, cfg))
    if cut is None or cut >= k or (given is not None and np.asarray(given)[:, cut:].any()):
        return u, sigma, v
    return u[:, :, :cut], sigma[:, :cut], v[:, :cut]


def stack_tables(stack, u, sigma, v, h_all):
    """:func:`allocation_tables` of a stack whose SVD :func:`table_svd_rank` computed, with ``min(m, n)`` rows."""
    r = min(stack.shape)
    energy = stack_energy(stack, h_all) if v.shape[1] < r else None
    return allocation_tables(u, sigma, v, h_all, stack.cfg, stack.mesh, rank=r, energy=energy)


def _u_error_tables(u, sigma, v, h_all, cfg, d0_all=None):
    """The U-side estimate (:func:`u_error_estimate`) for a stack of matrices. ``d0_all`` (B, k): the error
    table's column of width 0, ``σ_i² V_i H V_iᵀ``, which the estimate scales (formed here when not given:
    2·k·n² flops per matrix under a Hessian)."""
    out = []
    for i in range(len(u)):
        if d0_all is not None:
            d0 = jnp.asarray(d0_all[i])
        else:
            d0 = jnp.asarray(sigma[i]) ** 2 * row_hessian_norms(jnp.asarray(v[i]),
                                                                None if h_all is None else jnp.asarray(h_all[i]))
        out.append(u_error_estimate(jnp.asarray(u[i]), d0, widths=cfg.bits, group_size=cfg.group_size,
                                    scale_dtype=cfg.scale_jnp_dtype, grid=cfg.quant_grid))
    return np.asarray(out, np.float64)


class TableMethod(Method):
    """A method that chooses each matrix's widths from its error table (:meth:`choose`)."""

    def choose(self, e: np.ndarray, active: np.ndarray, stack: Stack, info: dict) -> np.ndarray:
        """(r,) widths of one matrix from its (r, nw) table; ``active``: the indices with σ > 0."""
        raise NotImplementedError

    def v_passes_under_hessian(self):
        return True

    def svd_request(self, stack: Stack):
        if stack.cfg.whiten and stack.pairs[0][1] is not None:
            return None
        return svd_kwargs(stack.cfg, self._given_and_rank(stack)[1])

    def _given_and_rank(self, stack: Stack):
        """The checked widths given to the stack (or ``None``) and the rank of its SVD (``None``: full)."""
        m, n = stack.shape
        rank = table_svd_rank(stack)
        given = None
        if stack.widths is not None:
            given = check_widths(stack.widths, len(stack.pairs), min(m, n), stack.cfg.bits)
            if rank is not None and given[:, rank:].any():   # widths from elsewhere reach beyond the truncation
                rank = None
        return given, rank

    def compress(self, stack: Stack) -> list:
        cfg = stack.cfg
        m, n = stack.shape
        given, rank = self._given_and_rank(stack)
        u, sigma, v = table_rows(stack, *table_svd(stack, rank), given)
        sig_np = np.asarray(sigma)
        h_all = hessian_stack(stack)
        t = time.perf_counter()
        u_rank = stack.u_rank
        if given is not None:
            widths = given[:, :sig_np.shape[1]] * (sig_np > 0)
            if u_rank is None:
                u_rank = int((widths > 0).sum(axis=1).max())
            select = fixed_width_rows(stack, v, h_all, widths)
        else:
            if u_rank is None:
                u_rank = max_kept_rank(m, n, cfg)
            select = self._table_rows(stack, u, sigma, v, h_all)
        t_stage1 = (time.perf_counter() - t) / len(stack.pairs)
        if cfg.rtc:       # RTC fits U itself: the SVD's U (1.2 GB for a 7B embedding) need not wait for it
            u = None
        return quantize_stack(stack, u, sigma, h_all, select, u_rank=u_rank, rtc=cfg.rtc, t_stage1=t_stage1)

    def _table_rows(self, stack, u, sigma, v, h_all):
        """The V step from the error tables: ``select(i, info) -> (widths, V̂ rows)`` (see
        :func:`~prinmix_jax.methods.shared.quantize_stack`)."""
        cfg = stack.cfg
        tables, passes = stack_tables(stack, u, sigma, v, h_all)
        sig_np = np.asarray(sigma)
        k = sig_np.shape[1]                 # the computed indices (all min(m, n) of them for the full SVD)
        r = tables.shape[1]
        z = cfg.bits.index(0) if 0 in cfg.bits else None

        def select(i, info):
            e_i = tables[i]
            active = np.concatenate([sig_np[i] > 0, e_i[k:, z] > 0]) if r > k else sig_np[i] > 0
            w = self.choose(e_i, active, stack, info)
            w[k:] = 0                         # never chosen (pad_tail); dropping one only lowers the error
            info["error_table_objective"] = float(e_i[np.arange(r), [cfg.bits.index(b) for b in w]].sum())
            info["v_damp"] = float(np.max(np.asarray(passes.damp)[i]))
            info["svd_rank"] = int(k)
            w = w[:k]
            keep = np.nonzero(w > 0)[0]
            return w, select_rows(jax.tree.map(lambda a: np.asarray(a[i]), passes), cfg.bits, keep, w[keep])
        return select

    def one_index_bits(self, m, n, cfg):
        return cheapest_index_bits(m, n, cfg)

    def check_settings(self, blocks, globs, cfg, scope):
        if 0 in cfg.bits:
            return
        bits = ",".join(map(str, cfg.bits))
        if scope == "global":
            raise ValueError(f"bit widths {bits} (--bits) lack 0: the global allocation (--scope global, the "
                             "default for prinmix) must be able to drop singular vectors; add 0, e.g. "
                             f"--bits 0,{bits}")
        for m, n in sorted(set(blocks + globs)):
            need = min(m, n) * int(min(index_costs(m, n, cfg)))
            if need > cfg.budget_bits(m, n):
                raise ValueError(f"bit widths {bits} (--bits) lack 0, so all {min(m, n)} singular vectors of a "
                                 f"{m}x{n} matrix must be stored: at least {need // 8} bytes, but ratio "
                                 f"{cfg.ratio:.4g} (--ratio) allows {cfg.budget_bits(m, n) // 8}; add 0 to --bits")


class PrinMix(TableMethod):
    """PrinMix: widths from the allocation ILP (method.md §3), then RTC and GPTQ of U (§4)."""
    name = "prinmix"

    def choose(self, e, active, stack, info):
        cfg = stack.cfg
        r = e.shape[0]
        w = np.zeros(r, np.int64)
        idx = np.nonzero(active)[0]
        if 0 not in cfg.bits and idx.size < r:
            raise ValueError("the delta has zero singular values but bits has no 0 width to drop them")
        alloc = allocate_bits(e[idx], index_costs(*stack.shape, cfg), stack.budget, cfg.bits,
                              max_widths=cfg.max_widths, solver=cfg.solver, time_limit=cfg.time_limit,
                              mip_rel_gap=cfg.ilp_gap)
        w[idx] = alloc.widths
        info.update(allocation_objective=alloc.objective, allocation_seconds=alloc.seconds, solver=alloc.solver)
        return w


class Uniform(TableMethod):
    """Baseline: one width for all kept indices (the top-k by σ), to show why mixing matters."""
    name = "uniform"

    def choose(self, e, active, stack, info):
        w = np.zeros(e.shape[0], np.int64)
        idx = np.nonzero(active)[0]
        w[idx] = uniform_widths(e[idx], index_costs(*stack.shape, stack.cfg), stack.budget, stack.cfg.bits)
        return w


def uniform_widths(e, costs, budget, bits):
    """One width for the top-k indices: the (width, k) with the least table error under budget."""
    r = e.shape[0]
    best, best_w = None, np.zeros(r, np.int64)
    zero_err = e[:, bits.index(0)] if 0 in bits else None
    for j, b in enumerate(bits):
        if b == 0:
            continue
        k = min(r, budget // int(costs[j]))
        if zero_err is None and k < r:
            continue
        err = e[:k, j].sum() + (zero_err[k:].sum() if zero_err is not None else 0.0)
        if best is None or err < best:
            best, best_w = err, np.where(np.arange(r) < k, b, 0)
    if best is None:
        raise ValueError(f"budget of {budget} bits cannot store every index at any width of {bits}; add 0")
    return best_w
