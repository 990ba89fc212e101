"""Bit allocation (method.md §3): a 0/1 integer program solved with CVXPY and a MILP backend.

    minimise    Σ_i Σ_b e[i, b] · x[i, b]
    subject to  Σ_b x[i, b] = 1                      for every singular index i
                Σ_i Σ_b c[i, b] · x[i, b] ≤ C        (storage budget in bits)
                x[i, b] ≤ y[b],  Σ_b y[b] ≤ f_max    (only with a cap on distinct widths)

It is a multiple-choice knapsack; ``tests/`` checks it against an exact dynamic program.

Before the solver sees it, the problem is reduced exactly (:mod:`prinmix_jax.allocation_reduction`)
when a gap > 0 is asked for (``CompressionConfig.ilp_gap``); that gap is the whole problem's and is
passed to the solver as an absolute gap. Exact proofs (gap 0) get the whole problem: a reduced core
made only of near-ties can take HiGHS minutes to prove. The costs ``c`` come from
:func:`prinmix_jax.costs.index_cost_bits` (re-exported here).
"""
from __future__ import annotations

import time
import warnings
from typing import NamedTuple

import cvxpy as cp
import numpy as np
import scipy.sparse as sp

from prinmix_jax.allocation_reduction import lagrangian_reduction
from prinmix_jax.costs import index_cost_bits

__all__ = ["MILP_SOLVERS", "Allocation", "allocate_bits", "allocate_bits_global", "check_solver",
           "index_cost_bits", "lagrangian_reduction", "milp_solvers_installed"]

#: CVXPY solvers that can solve mixed-integer linear programs (when installed).
MILP_SOLVERS = ("HIGHS", "SCIPY", "GLPK_MI", "CBC", "SCIP", "GUROBI", "CPLEX", "MOSEK", "XPRESS", "COPT", "CUOPT")


class Allocation(NamedTuple):
    """Result of :func:`allocate_bits`.

    Attributes:
      widths: (r,) chosen width of every index (0 = dropped).
      choice: (r,) column of the chosen width in the error/cost tables.
      objective: total error ``Σ e[i, b_i]`` of the choice.
      cost_bits: total storage ``Σ c[i, b_i]`` in bits (``≤`` the budget).
      solver: the CVXPY solver name used.
      status: the solver status (always ``"optimal"``).
      seconds: wall time of the solve.
      milp_pairs: (index, width) pairs left for the MILP after the Lagrangian reduction (0: the
        reduction alone proved the choice optimal).
    """
    widths: np.ndarray
    choice: np.ndarray
    objective: float
    cost_bits: int
    solver: str
    status: str
    seconds: float
    milp_pairs: int = 0


def milp_solvers_installed() -> list[str]:
    """Names of the installed CVXPY solvers that handle integer variables."""
    inst = set(cp.installed_solvers())
    return [s for s in MILP_SOLVERS if s in inst]


def check_solver(solver: str) -> str:
    """The upper-case name of ``solver``; ValueError when it is unknown or not installed."""
    name = str(solver).upper()
    installed = milp_solvers_installed()
    if name not in MILP_SOLVERS:
        raise ValueError(f"unknown MILP solver {solver!r}; known: {', '.join(MILP_SOLVERS)} "
                         f"(installed: {', '.join(installed) or 'none'})")
    if name not in installed:
        raise ValueError(f"MILP solver {name} is not installed; installed MILP solvers: "
                         f"{', '.join(installed) or 'none'}")
    return name


def _solver_kwargs(name: str, time_limit: float | None, options: dict | None, gap: float = 0.0,
                   abs_gap: float | None = None) -> dict:
    opts = dict(options or {})
    if name == "HIGHS":
        opts.setdefault("mip_rel_gap", gap)
        if abs_gap is not None:
            opts.setdefault("mip_abs_gap", abs_gap)
        if time_limit is not None:
            opts.setdefault("time_limit", float(time_limit))
    elif name == "SCIPY":
        sc = dict(opts.pop("scipy_options", {}))
        sc.setdefault("mip_rel_gap", gap)
        if time_limit is not None:
            sc.setdefault("time_limit", float(time_limit))
        opts["scipy_options"] = sc
    return opts


def allocate_bits(errors, costs, budget_bits: int, widths, *, max_widths: int | None = None,
                  solver: str = "HIGHS", time_limit: float | None = None, mip_rel_gap: float = 0.0,
                  solver_options: dict | None = None, reduce: bool = True) -> Allocation:
    """Chooses one width per index minimising the total error under a storage budget.

    Args:
      errors: (r, nw) table ``e[i, b]`` (any non-negative floats).
      costs: (nw,) or (r, nw) integer costs ``c[i, b]`` in bits.
      budget_bits: the budget ``C`` in bits.
      widths: the nw candidate widths (the table columns).
      max_widths: optional cap on the number of distinct widths used (0 counts as a width
        only if it is used).
      solver: a CVXPY MILP solver name (``"HIGHS"`` default, ``"SCIPY"``, ...).
      time_limit: seconds; a solve that hits it raises (its answer is not proven optimal).
      mip_rel_gap: relative optimality gap the solver must prove (HiGHS, SCIPY); 0 = exact optimum.
        Exact proofs can take minutes on thousands of indices with near-ties; 1e-4 (HiGHS's own
        default, used by :class:`CompressionConfig`) is much faster after the Lagrangian reduction.
      solver_options: extra keyword arguments for ``Problem.solve``.
      reduce: apply the exact Lagrangian reduction first when ``mip_rel_gap > 0``
        (:func:`~prinmix_jax.allocation_reduction.lagrangian_reduction`);
        False hands the whole problem to the solver.

    Returns:
      An :class:`Allocation`.

    Raises:
      ValueError: unknown/uninstalled solver, bad tables, or any status other than optimal
        (e.g. infeasible budget, time limit), naming the solver and status.
    """
    e = np.asarray(errors, dtype=np.float64)
    widths = tuple(int(b) for b in widths)
    if e.ndim != 2 or e.shape[1] != len(widths):
        raise ValueError(f"errors must be (r, {len(widths)}), got {e.shape}")
    c = np.broadcast_to(np.asarray(costs, dtype=np.int64), e.shape)
    if not np.all(np.isfinite(e)) or np.any(e < 0):
        raise ValueError("error table must be finite and non-negative")
    if np.any(c < 0):
        raise ValueError("costs must be non-negative")
    name = check_solver(solver)
    r = e.shape[0]
    t0 = time.perf_counter()
    if r == 0:
        z = np.zeros(0, np.int64)
        return Allocation(z, z, 0.0, 0, name, "optimal", 0.0)
    if max_widths is not None and max_widths < 1:
        raise ValueError(f"max_widths must be >= 1, got {max_widths}")
    # Exact proofs (gap 0) are left to the solver on the whole problem: with the reduction the core is
    # made of near-ties only, and proving its optimum to HiGHS's absolute tolerance can take minutes.
    reduce = reduce and mip_rel_gap > 0
    keep, incumbent, lower = lagrangian_reduction(e, c, budget_bits) if reduce else (np.ones(e.shape, bool), None, 0.)
    if incumbent is not None and max_widths is not None and len(np.unique(incumbent)) > max_widths:
        keep = np.ones(e.shape, bool)   # the incumbent breaks the cap: its error bounds nothing
    free = keep.sum(axis=1) > 1
    choice = np.argmax(keep, axis=1)   # the single kept pair of every fixed index
    pairs = int(keep[free].sum())
    if pairs:
        # the gap is the whole problem's: as an absolute gap (the fixed indices' error is a constant)
        sub = _solve_core(e[free], c[free], keep[free], budget_bits - int(c[~free, choice[~free]].sum()),
                          max_widths, np.unique(choice[~free]), name, time_limit, solver_options, mip_rel_gap,
                          abs_gap=mip_rel_gap * lower if mip_rel_gap > 0 else None)
        choice[free] = sub
    cost = int(c[np.arange(r), choice].sum())
    if cost > budget_bits:
        raise ValueError(f"solver {name} returned a choice of {cost} bits over the budget {budget_bits}")
    if max_widths is not None and len(np.unique(choice)) > max_widths:
        raise ValueError(f"solver {name} returned {len(np.unique(choice))} distinct widths, over the cap {max_widths}")
    w = np.asarray(widths, dtype=np.int64)[choice]
    obj = float(e[np.arange(r), choice].sum())
    return Allocation(w, choice, obj, cost, name, "optimal", time.perf_counter() - t0, pairs)


def _solve_core(e, c, keep, budget_bits, max_widths, fixed_cols, name, time_limit, solver_options, mip_rel_gap,
                abs_gap=None):
    """The MILP over the kept (index, width) pairs; returns the chosen column of every index.

    ``fixed_cols``: the columns the fixed indices use (they count towards ``max_widths``).
    ``abs_gap``: optional absolute optimality gap (HiGHS), in the units of ``e``.
    """
    r, nw = e.shape
    ii, bb = np.nonzero(keep)          # row-major: pairs grouped by index
    k = ii.size
    # Scaled to O(1) for the solver; the reported objective is recomputed from the unscaled table.
    ek = e[ii, bb]
    scale = float(ek.max()) if k and ek.max() > 0 else 1.0
    x = cp.Variable(k, boolean=True)
    one_each = sp.csr_matrix((np.ones(k), (ii, np.arange(k))), shape=(r, k))
    # Costs are integers, so "≤ C" is "≤ C + 0.5": the slack absorbs solver tolerances
    # without admitting any over-budget integer choice.
    cons = [one_each @ x == 1, c[ii, bb] @ x <= budget_bits + 0.5]
    if max_widths is not None:
        y = cp.Variable(nw, boolean=True)
        cons += [x <= sp.csr_matrix((np.ones(k), (np.arange(k), bb)), shape=(k, nw)) @ y,
                 cp.sum(y) <= max_widths]
        if len(fixed_cols):
            cons.append(y[np.asarray(fixed_cols)] == 1)
    prob = cp.Problem(cp.Minimize((ek / scale) @ x), cons)
    try:
        with warnings.catch_warnings():   # an inaccurate answer is reported below as an error
            warnings.filterwarnings("ignore", message="Solution may be inaccurate")
            prob.solve(solver=name, **_solver_kwargs(name, time_limit, solver_options, mip_rel_gap,
                                                     None if abs_gap is None else abs_gap / scale))
    except cp.error.SolverError as exc:
        raise ValueError(f"MILP solver {name} failed: {exc}") from exc
    if prob.status != cp.OPTIMAL:
        hint = " (budget too small for the allowed widths?)" if "infeasible" in str(prob.status) else ""
        raise ValueError(f"bit allocation not solved to optimality: solver {name} returned "
                         f"status {prob.status!r}{hint}")
    xv = np.asarray(x.value)
    first = np.lexsort((-xv, ii))[np.flatnonzero(np.r_[True, ii[1:] != ii[:-1]])]  # each index's largest x
    choice = np.zeros(r, np.int64)
    choice[ii[first]] = bb[first]
    return choice


def allocate_bits_global(tables, costs, budget_bits: int, widths, *, normalize: bool = True,
                         max_widths: int | None = None, solver: str = "HIGHS",
                         time_limit: float | None = None, mip_rel_gap: float = 0.0,
                         solver_options: dict | None = None, reduce: bool = True):
    """One ILP over the singular indices of many matrices under one total budget.

    Errors of different matrices are made comparable by dividing each table by its matrix's
    ``‖ΔW X‖² / N = Σ_i e[i, 0]`` (the error of dropping every index), so the objective is the
    sum of relative output errors. Bits then flow to the matrices where they buy the most.

    Args:
      tables: list of (r_j, nw) error tables (:func:`prinmix_jax.error_tables`).
      costs: list of (nw,) per-index costs in bits, one per table (shapes differ per matrix).
      budget_bits: total budget in bits (e.g. the sum of the per-matrix budgets).
      widths: the candidate widths (the table columns); must include 0 when ``normalize``.
      normalize: divide each table by its matrix's total energy.
      max_widths, solver, time_limit, mip_rel_gap, solver_options, reduce: as in :func:`allocate_bits`.

    Returns:
      ``(per-matrix widths list, Allocation of the whole problem)``.
    """
    widths = tuple(int(b) for b in widths)
    if len(tables) != len(costs):
        raise ValueError(f"got {len(tables)} tables but {len(costs)} cost vectors")
    if normalize and 0 not in widths:
        raise ValueError("normalize=True needs width 0 among the widths (the energy column)")
    rows_e, rows_c, sizes = [], [], []
    for e, c in zip(tables, costs):
        e = np.asarray(e, np.float64)
        if normalize:
            energy = e[:, widths.index(0)].sum()
            e = e / energy if energy > 0 else e
        rows_e.append(e)
        rows_c.append(np.broadcast_to(np.asarray(c, np.int64), e.shape))
        sizes.append(e.shape[0])
    if not rows_e:
        return [], allocate_bits(np.zeros((0, len(widths))), np.zeros(len(widths), np.int64), budget_bits, widths,
                                 solver=solver)
    alloc = allocate_bits(np.concatenate(rows_e), np.concatenate(rows_c), budget_bits, widths,
                          max_widths=max_widths, solver=solver, time_limit=time_limit,
                          mip_rel_gap=mip_rel_gap, solver_options=solver_options, reduce=reduce)
    return np.split(alloc.widths, np.cumsum(sizes)[:-1]), alloc
