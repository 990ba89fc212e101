"""Bit allocation (method.md §3): a 0/1 integer program solved with CVXPY and a MILP backend.

    minimise    Σ_i Σ_b e[i, b] · x[i, b]
    subject to  Σ_b x[i, b] = 1                      for every singular index i
                Σ_i Σ_b c[i, b] · x[i, b] ≤ C        (storage budget in bits)
                x[i, b] ≤ y[b],  Σ_b y[b] ≤ f_max    (only with a cap on distinct widths)

It is a multiple-choice knapsack; ``tests/`` checks it against an exact dynamic program.
"""
from __future__ import annotations

import math
import time
import warnings
from typing import NamedTuple

import cvxpy as cp
import numpy as np

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
    """
    widths: np.ndarray
    choice: np.ndarray
    objective: float
    cost_bits: int
    solver: str
    status: str
    seconds: float


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


def _solver_kwargs(name: str, time_limit: float | None, options: dict | None, gap: float = 0.0) -> dict:
    opts = dict(options or {})
    if name == "HIGHS":
        opts.setdefault("mip_rel_gap", gap)
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
                  solver_options: dict | None = None) -> Allocation:
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
        default, used by :class:`CompressionConfig`) takes seconds.
      solver_options: extra keyword arguments for ``Problem.solve``.

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
    # Scale the objective to O(1) for the solver; the reported objective is unscaled.
    emax = float(e.max())
    e_s = e / emax if emax > 0 else e
    x = cp.Variable((r, nw), boolean=True)
    # Costs are integers, so "≤ C" is "≤ C + 0.5": the slack absorbs solver tolerances
    # without admitting any over-budget integer choice.
    cons = [cp.sum(x, axis=1) == 1, cp.sum(cp.multiply(c, x)) <= budget_bits + 0.5]
    if max_widths is not None:
        if max_widths < 1:
            raise ValueError(f"max_widths must be >= 1, got {max_widths}")
        y = cp.Variable(nw, boolean=True)
        cons += [x <= cp.reshape(y, (1, nw), order="C"), cp.sum(y) <= max_widths]
    prob = cp.Problem(cp.Minimize(cp.sum(cp.multiply(e_s, x))), cons)
    try:
        with warnings.catch_warnings():   # an inaccurate answer is reported below as an error
            warnings.filterwarnings("ignore", message="Solution may be inaccurate")
            prob.solve(solver=name, **_solver_kwargs(name, time_limit, solver_options, mip_rel_gap))
    except cp.error.SolverError as exc:
        raise ValueError(f"MILP solver {name} failed: {exc}") from exc
    if prob.status != cp.OPTIMAL:
        hint = " (budget too small for the allowed widths?)" if "infeasible" in str(prob.status) else ""
        raise ValueError(f"bit allocation not solved to optimality: solver {name} returned "
                         f"status {prob.status!r}{hint}")
    choice = np.argmax(np.asarray(x.value), axis=1)
    cost = int(c[np.arange(r), choice].sum())
    if cost > budget_bits:
        raise ValueError(f"solver {name} returned a choice of {cost} bits over the budget {budget_bits}")
    w = np.asarray(widths, dtype=np.int64)[choice]
    obj = float(e[np.arange(r), choice].sum())
    return Allocation(w, choice, obj, cost, name, "optimal", time.perf_counter() - t0)


def allocate_bits_global(tables, costs, budget_bits: int, widths, *, normalize: bool = True,
                         max_widths: int | None = None, solver: str = "HIGHS",
                         time_limit: float | None = None, mip_rel_gap: float = 0.0,
                         solver_options: dict | None = None):
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
      max_widths, solver, time_limit, mip_rel_gap, solver_options: as in :func:`allocate_bits`.

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
                          mip_rel_gap=mip_rel_gap, solver_options=solver_options)
    return np.split(alloc.widths, np.cumsum(sizes)[:-1]), alloc
