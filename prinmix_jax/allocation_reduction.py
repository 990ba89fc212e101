"""Exact reduction of the allocation problem before the MILP solver sees it (method.md §3).

The allocation is a multiple-choice knapsack. Its Lagrangian bound of the budget constraint gives
reduced-cost fixing (as in core algorithms for knapsack problems): for a multiplier ``λ ≥ 0`` every
feasible choice ``x`` has ``Σ e·x ≥ L(λ) + Σ rc·x`` with
``L(λ) = Σ_i min_b (e[i,b] + λ c[i,b]) − λ C`` and reduced costs
``rc[i,b] = e[i,b] + λ c[i,b] − min_b'(e[i,b'] + λ c[i,b'])``. The choice ``argmin_b (e + λc)`` at the
smallest ``λ`` that fits the budget is feasible with error ``U``, so a pair with ``rc[i,b] > U − L(λ)``
is in no optimal solution and is removed; indices with one pair left are fixed. On the error tables
of real deltas only a small fraction of the pairs stays, so a global allocation over every matrix of
a model does not cost the memory and time of the full MILP.
"""
from __future__ import annotations

import numpy as np


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
