"""Bit allocation (method.md §3): a multiple-choice knapsack, solved with a proven optimality gap.

    minimise    Σ_i Σ_b e[i, b] · x[i, b]
    subject to  Σ_b x[i, b] = 1                      for every singular index i
                Σ_i Σ_b c[i, b] · x[i, b] ≤ C        (storage budget in bits)
                x[i, b] ≤ y[b],  Σ_b y[b] ≤ f_max    (only with a cap on distinct widths)

Two methods (``allocate_bits(method=...)``):

- ``"mckp"`` (default): the special-purpose solver of :mod:`prinmix_jax.allocation_mckp` (exact LP bound,
  its integer part completed by a dynamic program over the unused budget). When its answer is not already
  proven within the asked gap of the LP bound, the problem left after reduced-cost fixing goes to the MILP
  solver in a **count formulation**: the costs take one value per width and cost class (a matrix shape), so
  ``x`` may be continuous and only the number of indices of each class at each width, ``n[t, b]``, is
  integer. For fixed counts the ``x`` polytope is a transportation polytope (totally unimodular, integral
  vertices), so the optimum is the 0/1 problem's, while the branch and bound runs over a handful of
  integers instead of thousands of near-tied binaries (data-free 4096×4096: about 1 s instead of minutes).
- ``"milp"``: the 0/1 formulation above handed to the CVXPY solver (after the exact Lagrangian reduction of
  :mod:`prinmix_jax.allocation_reduction` when a gap > 0 is asked for).

Either way only a proven answer is returned: the MCKP bound, or an OPTIMAL status from CVXPY. The gap
(``CompressionConfig.ilp_gap``) is the whole problem's, relative to its lower bound. ``tests/`` checks both
methods against an exact dynamic program. The costs ``c`` come from :func:`prinmix_jax.costs.index_cost_bits`
(re-exported here).
"""
from __future__ import annotations

import math
import time
import warnings
from typing import NamedTuple

import cvxpy as cp
import numpy as np
import scipy.sparse as sp

from prinmix_jax.allocation_mckp import reduced_keep, solve_mckp
from prinmix_jax.allocation_reduction import lagrangian_reduction
from prinmix_jax.costs import index_cost_bits

__all__ = ["ALLOCATION_METHODS", "MILP_SOLVERS", "Allocation", "allocate_bits", "allocate_bits_global", "check_solver",
           "index_cost_bits", "lagrangian_reduction", "milp_solvers_installed"]

#: CVXPY solvers that can solve mixed-integer linear programs (when installed).
MILP_SOLVERS = ("HIGHS", "SCIPY", "GLPK_MI", "CBC", "SCIP", "GUROBI", "CPLEX", "MOSEK", "XPRESS", "COPT", "CUOPT")
#: ``allocate_bits(method=...)``: the special-purpose solver (with the count MILP when needed), or the 0/1 MILP.
ALLOCATION_METHODS = ("mckp", "milp")


class Allocation(NamedTuple):
    """Result of :func:`allocate_bits`.

    Attributes:
      widths: (r,) chosen width of every index (0 = dropped).
      choice: (r,) column of the chosen width in the error/cost tables.
      objective: total error ``Σ e[i, b_i]`` of the choice.
      cost_bits: total storage ``Σ c[i, b_i]`` in bits (``≤`` the budget).
      solver: who proved it: ``"MCKP"`` (the special-purpose solver alone), ``"MCKP+HIGHS"`` (its count
        MILP, solved by the named CVXPY solver), or the CVXPY solver name (``method="milp"``).
      status: always ``"optimal"`` (within the asked gap).
      seconds: wall time of the solve.
      milp_pairs: (index, width) pairs left for a MILP after the reduction (0: none was needed).
      lower_bound: a proven lower bound on the optimal error (the LP bound, or the MILP solver's dual
        bound where it reports one; otherwise what its OPTIMAL status certifies).
      gap: ``(objective − lower_bound) / lower_bound`` (0 when both are 0): the proven relative gap.
    """
    widths: np.ndarray
    choice: np.ndarray
    objective: float
    cost_bits: int
    solver: str
    status: str
    seconds: float
    milp_pairs: int = 0
    lower_bound: float = float("nan")
    gap: float = float("nan")


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
        if gap == 0:   # an exact answer asked for: optimality to 1e-10 of the scaled objective, not 1e-7
            opts.setdefault("dual_feasibility_tolerance", 1e-10)
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
                  solver_options: dict | None = None, reduce: bool = True, method: str = "mckp") -> Allocation:
    """Chooses one width per index minimising the total error under a storage budget.

    Args:
      errors: (r, nw) table ``e[i, b]`` (any non-negative floats).
      costs: (nw,) or (r, nw) integer costs ``c[i, b]`` in bits.
      budget_bits: the budget ``C`` in bits.
      widths: the nw candidate widths (the table columns).
      max_widths: optional cap on the number of distinct widths used (0 counts as a width
        only if it is used).
      solver: a CVXPY MILP solver name (``"HIGHS"`` default, ``"SCIPY"``, ...): with ``method="mckp"``
        the solver of the count MILP, when one is needed.
      time_limit: seconds for the MILP solver; a solve that hits it raises (its answer is not proven).
      mip_rel_gap: relative optimality gap to prove, of the whole problem against its lower bound;
        0 = exact optimum (to the solver's tolerances). :class:`CompressionConfig` uses 1e-4.
      solver_options: extra keyword arguments for ``Problem.solve``.
      reduce: ``method="milp"`` only: apply the exact Lagrangian reduction first when ``mip_rel_gap > 0``
        (:func:`~prinmix_jax.allocation_reduction.lagrangian_reduction`); False hands the whole problem
        to the solver. (``"mckp"`` always reduces, exactly.)
      method: ``"mckp"`` (default) or ``"milp"`` (module docstring).

    Returns:
      An :class:`Allocation`.

    Raises:
      ValueError: unknown method, unknown/uninstalled solver, bad tables, an infeasible budget, or any
        MILP status other than optimal (e.g. time limit), naming the solver and status.
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
    if method not in ALLOCATION_METHODS:
        raise ValueError(f"unknown allocation method {method!r}; known: {', '.join(ALLOCATION_METHODS)}")
    if not 0 <= mip_rel_gap < 1:
        raise ValueError(f"mip_rel_gap must be in [0, 1), got {mip_rel_gap!r}")
    name = check_solver(solver)
    r = e.shape[0]
    t0 = time.perf_counter()
    if r == 0:
        z = np.zeros(0, np.int64)
        return Allocation(z, z, 0.0, 0, "MCKP" if method == "mckp" else name, "optimal", 0.0, 0, 0.0, 0.0)
    if max_widths is not None and max_widths < 1:
        raise ValueError(f"max_widths must be >= 1, got {max_widths}")
    if method == "mckp":
        choice, lower, label, pairs = _allocate_mckp(e, c, budget_bits, max_widths, name, time_limit,
                                                     solver_options, mip_rel_gap)
    else:
        choice, lower, label, pairs = _allocate_milp(e, c, budget_bits, max_widths, name, time_limit,
                                                     solver_options, mip_rel_gap, reduce)
    cost = int(c[np.arange(r), choice].sum())
    if cost > budget_bits:
        raise ValueError(f"solver {label} returned a choice of {cost} bits over the budget {budget_bits}")
    if max_widths is not None and len(np.unique(choice)) > max_widths:
        raise ValueError(f"solver {label} returned {len(np.unique(choice))} distinct widths, over the cap {max_widths}")
    w = np.asarray(widths, dtype=np.int64)[choice]
    obj = float(e[np.arange(r), choice].sum())
    lower = min(float(lower), obj)
    gap = (obj - lower) / lower if lower > 0 else (0.0 if obj <= lower else math.inf)
    return Allocation(w, choice, obj, cost, label, "optimal", time.perf_counter() - t0, pairs, lower, gap)


def _proven(upper: float, lower: float, gap: float, scale: float) -> bool:
    """``upper`` is within ``gap`` of the bound ``lower`` (relative to it), up to float rounding of the sums."""
    return upper - lower <= gap * max(lower, 0.0) + 1e-12 * scale


def _allocate_mckp(e, c, budget_bits, max_widths, name, time_limit, solver_options, gap):
    """``method="mckp"``: returns ``(choice, lower bound, solver label, MILP pairs)``."""
    r = e.shape[0]
    rows = np.arange(r)
    res = solve_mckp(e, c, budget_bits, max_widths=max_widths)
    if not res.feasible:
        raise ValueError("bit allocation not solved to optimality: solver MCKP returned status 'infeasible' "
                         "(budget too small for the allowed widths?)")
    choice, upper, lower = res.choice, res.objective, res.lower
    scale = float(e.max(axis=1).sum())
    if _proven(upper, lower, gap, scale):
        return choice, lower, "MCKP", 0
    # Reduced-cost fixing against the MCKP's answer, then the count MILP on what is left.
    keep = reduced_keep(e, c, res.lam, res.lam_lower, upper, choice)
    free = keep.sum(axis=1) > 1
    fixed = np.argmax(keep, axis=1)
    pairs = int(keep[free].sum())
    fixed_err = float(e[~free, fixed[~free]].sum())
    sub, dual = _solve_core(e[free], c[free], keep[free], budget_bits - int(c[~free, fixed[~free]].sum()),
                            max_widths, np.unique(fixed[~free]), name, time_limit, solver_options, 0.0,
                            abs_gap=gap * max(lower, 0.0), counts=True, scale=upper)
    cand = fixed.copy()
    cand[free] = sub
    obj = float(e[rows, cand].sum())
    if obj < upper:
        choice, upper = cand, obj
    if dual is not None:
        lower = max(lower, fixed_err + dual)
    else:   # the solver's OPTIMAL status certifies its absolute gap
        lower = max(lower, min(upper, obj - gap * max(lower, 0.0)))
    return choice, lower, f"MCKP+{name}", pairs


def _allocate_milp(e, c, budget_bits, max_widths, name, time_limit, solver_options, mip_rel_gap, reduce):
    """``method="milp"``: returns ``(choice, lower bound, solver label, MILP pairs)``.

    The solver sees the errors scaled by an upper bound on the optimum (a feasible choice's error), and no
    pair whose error alone exceeds that bound (it is in no optimal solution): scaled by the table's largest
    entry, an optimum far below it (a generous budget, errors spanning many decades) would sit under the
    solver's tolerances, and its "optimal" answer could be any near-zero choice. When the answer is far
    below the bound it was scaled by, the problem is solved again scaled by the answer.
    """
    # Exact proofs (gap 0) are left to the solver on the whole problem: with the reduction the core is
    # made of near-ties only, and proving its optimum to HiGHS's absolute tolerance can take minutes.
    reduce = reduce and mip_rel_gap > 0
    keep, incumbent, lower = lagrangian_reduction(e, c, budget_bits)
    if not reduce:
        keep = np.ones(e.shape, bool)
    if incumbent is not None and max_widths is not None and len(np.unique(incumbent)) > max_widths:
        keep, incumbent = np.ones(e.shape, bool), None   # the incumbent breaks the cap: its error bounds nothing
    rows = np.arange(e.shape[0])
    upper = float(e[rows, incumbent].sum()) if incumbent is not None else None
    choice, pairs = None, 0
    for _ in range(3):
        if upper is not None:
            keep = keep & (e <= upper * (1 + 1e-9))
            keep[rows, incumbent] = True
        got, dual, pairs = _milp_pass(e, c, keep, budget_bits, max_widths, name, time_limit, solver_options,
                                      mip_rel_gap, lower if reduce else None, upper)
        obj = float(e[rows, got].sum())
        if choice is None or obj < float(e[rows, choice].sum()):
            choice = got
        if upper is None or not 0 < obj < 0.5 * upper:
            break
        upper, incumbent = obj, got
    obj = float(e[rows, choice].sum())
    if dual is not None:
        lower = max(lower, dual)
    elif pairs:   # what an OPTIMAL status certifies: the relative gap
        lower = max(lower, obj * (1 - mip_rel_gap))
    else:
        lower = obj
    return choice, lower, name, pairs


def _milp_pass(e, c, keep, budget_bits, max_widths, name, time_limit, solver_options, mip_rel_gap, abs_lower,
               scale):
    """One MILP over the pairs ``keep`` leaves (indices with one pair are fixed): ``(choice, proven lower
    bound or None, pairs)``. ``abs_lower``: a lower bound that turns the relative gap into an absolute one."""
    free = keep.sum(axis=1) > 1
    choice = np.argmax(keep, axis=1)   # the single kept pair of every fixed index
    pairs = int(keep[free].sum())
    if not pairs:
        return choice, None, 0
    fixed_err = float(e[~free, choice[~free]].sum())
    # the gap is the whole problem's: as an absolute gap (the fixed indices' error is a constant)
    sub, dual = _solve_core(e[free], c[free], keep[free], budget_bits - int(c[~free, choice[~free]].sum()),
                            max_widths, np.unique(choice[~free]), name, time_limit, solver_options, mip_rel_gap,
                            abs_gap=(mip_rel_gap * abs_lower if abs_lower is not None
                                     else 0.0 if mip_rel_gap == 0 else None), scale=scale)
    choice[free] = sub
    return choice, (None if dual is None else fixed_err + dual), pairs


def _solve_core(e, c, keep, budget_bits, max_widths, fixed_cols, name, time_limit, solver_options, mip_rel_gap,
                abs_gap=None, counts=False, scale=None):
    """The MILP over the kept (index, width) pairs.

    ``fixed_cols``: the columns the fixed indices use (they count towards ``max_widths``).
    ``abs_gap``: optional absolute optimality gap (HiGHS), in the units of ``e``.
    ``scale``: what the errors are divided by for the solver (default: the largest kept error); best an
    upper bound on the optimum, so that the solver's tolerances are relative to it.
    ``counts``: the count formulation (module docstring): ``x`` continuous, one integer count per cost
    class and width.

    Returns:
      ``(choice, dual)``: the chosen column of every index, and the solver's proven lower bound on the
      core's error (in the units of ``e``; None where the solver does not report one).
    """
    r, nw = e.shape
    ii, bb = np.nonzero(keep)          # row-major: pairs grouped by index
    k = ii.size
    # Scaled to O(1) for the solver; the reported objective is recomputed from the unscaled table.
    ek = e[ii, bb]
    if not scale or scale <= 0:
        scale = float(ek.max()) if k and ek.max() > 0 else 1.0
    one_each = sp.csr_matrix((np.ones(k), (ii, np.arange(k))), shape=(r, k))
    if counts:
        x = cp.Variable(k, nonneg=True)
        # cost classes (rows with the same cost vector) x widths: one integer count each
        classes, cls = np.unique(c, axis=0, return_inverse=True)
        grp, ginv = np.unique(cls.ravel()[ii] * nw + bb, return_inverse=True)
        gcost = classes[grp // nw, grp % nw].astype(np.float64)
        to_groups = sp.csr_matrix((np.ones(k), (ginv.ravel(), np.arange(k))), shape=(grp.size, k))
        n = cp.Variable(grp.size, integer=True)
        cons = [one_each @ x == 1, to_groups @ x == n, gcost @ n <= budget_bits + 0.5]
        if max_widths is not None:
            y = cp.Variable(nw, boolean=True)
            size = np.asarray(to_groups.sum(axis=1)).ravel()
            cons += [n <= cp.multiply(size, sp.csr_matrix((np.ones(grp.size), (np.arange(grp.size), grp % nw)),
                                                          shape=(grp.size, nw)) @ y),
                     cp.sum(y) <= max_widths]
            if len(fixed_cols):
                cons.append(y[np.asarray(fixed_cols)] == 1)
    else:
        x = cp.Variable(k, boolean=True)
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
    _solve(prob, name, time_limit, solver_options, mip_rel_gap, None if abs_gap is None else abs_gap / scale)
    dual = _dual_bound(prob, name)
    xv = np.asarray(x.value)
    if counts and np.any((xv > 1e-6) & (xv < 1 - 1e-6)):
        # an optimal face, not a vertex: the transportation problem at the optimal counts has an integral
        # optimum (totally unimodular), found at the root of this 0/1 solve
        nv = np.rint(np.asarray(n.value))
        xb = cp.Variable(k, boolean=True)
        fix = cp.Problem(cp.Minimize((ek / scale) @ xb), [one_each @ xb == 1, to_groups @ xb == nv])
        _solve(fix, name, time_limit, solver_options, 0.0, None)
        xv = np.asarray(xb.value)
    first = np.lexsort((-xv, ii))[np.flatnonzero(np.r_[True, ii[1:] != ii[:-1]])]  # each index's largest x
    choice = np.zeros(r, np.int64)
    choice[ii[first]] = bb[first]
    return choice, (None if dual is None else dual * scale)


def _solve(prob, name, time_limit, solver_options, mip_rel_gap, abs_gap):
    """Solves with CVXPY; only an OPTIMAL status is accepted."""
    try:
        with warnings.catch_warnings():   # an inaccurate answer is reported below as an error
            warnings.filterwarnings("ignore", message="Solution may be inaccurate")
            prob.solve(solver=name, **_solver_kwargs(name, time_limit, solver_options, mip_rel_gap, abs_gap))
    except cp.error.SolverError as exc:
        raise ValueError(f"MILP solver {name} failed: {exc}") from exc
    if prob.status != cp.OPTIMAL:
        hint = " (budget too small for the allowed widths?)" if "infeasible" in str(prob.status) else ""
        raise ValueError(f"bit allocation not solved to optimality: solver {name} returned "
                         f"status {prob.status!r}{hint}")


def _dual_bound(prob, name):
    """The MILP solver's proven lower bound on the (scaled) objective, where it reports one."""
    if name != "HIGHS":
        return None
    try:
        v = float(prob.solver_stats.extra_stats.mip_dual_bound)
    except (AttributeError, TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def allocate_bits_global(tables, costs, budget_bits: int, widths, *, normalize: bool = True,
                         max_widths: int | None = None, solver: str = "HIGHS",
                         time_limit: float | None = None, mip_rel_gap: float = 0.0,
                         solver_options: dict | None = None, reduce: bool = True, method: str = "mckp"):
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
      max_widths, solver, time_limit, mip_rel_gap, solver_options, reduce, method: as in :func:`allocate_bits`.

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
                                 solver=solver, method=method)
    alloc = allocate_bits(np.concatenate(rows_e), np.concatenate(rows_c), budget_bits, widths,
                          max_widths=max_widths, solver=solver, time_limit=time_limit,
                          mip_rel_gap=mip_rel_gap, solver_options=solver_options, reduce=reduce, method=method)
    return np.split(alloc.widths, np.cumsum(sizes)[:-1]), alloc
