"""Bit allocation (method.md §3): a 0/1 integer program solved with CVXPY and a MILP backend.

    minimise    Σ_i Σ_b e[i, b] · x[i, b]
    subject to  Σ_b x[i, b] = 1                      for every singular index i
                Σ_i Σ_b c[i, b] · x[i, b] ≤ C        (storage budget in bits)
                x[i, b] ≤ y[b],  Σ_b y[b] ≤ f_max    (only with a cap on distinct widths)

It is a multiple-choice knapsack; ``tests/`` checks it against an exact dynamic program.

Before the solver sees it, the problem is reduced exactly with the Lagrangian bound of the budget
constraint (reduced-cost fixing, as in core algorithms for knapsack problems): for a multiplier
``λ ≥ 0`` every feasible choice ``x`` has ``Σ e·x ≥ L(λ) + Σ rc·x`` with
``L(λ) = Σ_i min_b (e[i,b] + λ c[i,b]) − λ C`` and reduced costs ``rc[i,b] = e[i,b] + λ c[i,b] −
min_b'(e[i,b'] + λ c[i,b'])``. The choice ``argmin_b (e + λc)`` at the smallest ``λ`` that fits the budget
is feasible with error ``U``, so a pair with ``rc[i,b] > U − L(λ)`` is in no optimal solution and is
removed; indices with one pair left are fixed. On error tables of real deltas about 4% of the pairs
stay for the MILP (3001 of 71680 for 56 matrices; README), so a global allocation over every matrix of
a model no longer costs the memory and time of the full MILP (HiGHS needs about 2 KB per binary).
The optimality gap asked for is the whole problem's: it is passed to the solver as an absolute gap.
The reduction is used when a gap > 0 is asked for (``CompressionConfig.ilp_gap`` = 1e-4); exact proofs
(gap 0) get the whole problem, because a core made only of near-ties took HiGHS minutes to prove.
"""
from __future__ import annotations

import math
import time
import warnings
from typing import NamedTuple

import cvxpy as cp
import numpy as np
import scipy.sparse as sp

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


def index_cost_bits(m: int, n: int, widths, group_size: int | None, *, scale_bits: int = 16,
                    zero_bits: int = 8, sigma_bits: int = 32, width_bits: int = 8) -> np.ndarray:
    """Byte-exact storage cost ``c[b]`` in bits of one singular index at each width.

    An index at width ``b > 0`` stores ``u_i`` (m codes) and ``V_i`` (n codes) packed at b bits in
    uint8 words (each row padded to a multiple of 8 values), one scale and one zero per group of
    ``group_size`` entries of each, its σ and its width. Width 0 costs nothing.

    Returns:
      int64 array, one cost per entry of ``widths``.
    """
    def ngroups(length):
        return 1 if not group_size or group_size >= length else math.ceil(length / group_size)

    out = []
    for b in widths:
        if b == 0:
            out.append(0)
            continue
        codes = 8 * b * (math.ceil(m / 8) + math.ceil(n / 8))
        groups = (scale_bits + zero_bits) * (ngroups(m) + ngroups(n))
        out.append(codes + groups + sigma_bits + width_bits)
    return np.asarray(out, dtype=np.int64)


def _check_solver(solver: str) -> str:
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


def lagrangian_reduction(e: np.ndarray, c: np.ndarray, budget_bits: float, *, iters: int = 100):
    """Exact reduced-cost fixing for the multiple-choice knapsack (module docstring).

    Args:
      e: (r, nw) errors (float64, finite); c: (r, nw) non-negative costs; budget_bits: the budget.

    Returns:
      ``(keep, incumbent, lower)``: a (r, nw) bool mask of the pairs that can be in an optimal solution,
      the columns (r,) of a feasible choice whose error bounds the optimum from above, and the lower bound
      ``L(λ)`` (``(all True, None, 0.0)`` when even the cheapest choice exceeds the budget).
    """
    e = np.asarray(e, np.float64)
    c = np.asarray(c, np.float64)
    rows = np.arange(e.shape[0])

    def pick(lam):   # argmin e + λc, ties to the cheaper pair
        score = e + lam * c
        best = score.min(axis=1, keepdims=True)
        tied = score <= best
        return np.argmin(np.where(tied, c, np.inf), axis=1), best[:, 0]

    def cost(choice):
        return c[rows, choice].sum()

    if c.min(axis=1).sum() > budget_bits:
        return np.ones(e.shape, bool), None, 0.0
    lo, hi = 0.0, 1.0
    choice, _ = pick(0.0)
    if cost(choice) > budget_bits:
        while cost(pick(hi)[0]) > budget_bits:
            hi *= 2.0
            if hi > 1e300:
                return np.ones(e.shape, bool), None, 0.0
        for _ in range(iters):   # smallest λ whose choice fits: the LP dual of the budget, to precision
            mid = 0.5 * (lo + hi)
            if cost(pick(mid)[0]) > budget_bits:
                lo = mid
            else:
                hi = mid
        lam = hi
    else:
        lam = 0.0
    choice, best = pick(lam)
    choice = _fill(e, c, choice, budget_bits)
    upper = e[rows, choice].sum()
    lower = best.sum() - lam * budget_bits
    rc = e + lam * c - best[:, None]
    slack = (upper - lower) + 1e-9 * (abs(upper) + abs(lower)) + 1e-300   # conservative float margin
    keep = rc <= slack
    keep[rows, choice] = True
    return keep, choice, max(float(lower), 0.0)


def _fill(e, c, choice, budget_bits, steps: int = 64):
    """Greedy use of the budget a choice leaves: the best error drop per bit that still fits, repeated."""
    rows = np.arange(e.shape[0])
    choice = choice.copy()
    for _ in range(steps):
        left = budget_bits - c[rows, choice].sum()
        dc = c - c[rows, choice][:, None]
        de = e[rows, choice][:, None] - e
        ok = (dc <= left) & (de > 0)
        if not ok.any():
            break
        gain = np.where(ok, de / np.maximum(dc, 1e-12), -np.inf)
        i, b = np.unravel_index(np.argmax(gain), gain.shape)
        choice[i] = b
    return choice


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
        default, used by :class:`CompressionConfig`) takes well under a second after the
        Lagrangian reduction (module docstring).
      solver_options: extra keyword arguments for ``Problem.solve``.
      reduce: apply the exact Lagrangian reduction first when ``mip_rel_gap > 0`` (module docstring);
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
    name = _check_solver(solver)
    r, nw = e.shape
    t0 = time.perf_counter()
    if r == 0:
        z = np.zeros(0, np.int64)
        return Allocation(z, z, 0.0, 0, name, "optimal", 0.0)
    if max_widths is not None and max_widths < 1:
        raise ValueError(f"max_widths must be >= 1, got {max_widths}")
    # Exact proofs (gap 0) are left to the solver on the whole problem: with the reduction the core is
    # made of near-ties only, and proving its optimum to HiGHS's absolute tolerance took minutes.
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
