import itertools

import numpy as np
import pytest

from prinmix_jax import allocate_bits, index_cost_bits, milp_solvers_installed


def dp_optimum(e, c, budget):
    """Exact multiple-choice knapsack by dynamic programming over the integer budget."""
    best = np.zeros(budget + 1)
    for i in range(e.shape[0]):
        nxt = np.full(budget + 1, np.inf)
        for j in range(e.shape[1]):
            cij = int(c[i, j])
            if cij <= budget:
                cand = np.full(budget + 1, np.inf)
                cand[cij:] = best[: budget + 1 - cij] + e[i, j]
                nxt = np.minimum(nxt, cand)
        best = nxt
    return best[budget]


def dp_optimum_capped(e, c, budget, max_widths):
    """Exact optimum with at most ``max_widths`` distinct widths: DP over each allowed subset."""
    nw = e.shape[1]
    return min(dp_optimum(e[:, list(s)], c[:, list(s)], budget)
               for k in range(1, max_widths + 1) for s in itertools.combinations(range(nw), k))


def random_instance(rng):
    r = int(rng.integers(2, 12))
    widths = (0, 2, 3, 4, 8)
    sigma2 = np.sort(rng.pareto(1.5, r) + 0.01)[::-1]
    d = 4.0 ** -np.asarray(widths, float) * rng.uniform(0.5, 1.5, (r, len(widths)))
    e = sigma2[:, None] * d
    base = rng.integers(3, 9, size=(r, 1))
    c = np.where(np.asarray(widths) == 0, 0, base * np.asarray(widths) + rng.integers(0, 4, (r, len(widths))))
    budget = int(rng.integers(0, c.sum(1).max() * r // 3 + 1))
    return e, c, budget, widths


@pytest.mark.parametrize("method", ["mckp", "milp"])
@pytest.mark.parametrize("solver", ["HIGHS", "SCIPY"])
def test_matches_dynamic_programming_on_random_instances(solver, method):
    if solver not in milp_solvers_installed():
        pytest.skip(f"{solver} not installed")
    rng = np.random.default_rng(0)
    for _ in range(60):
        e, c, budget, widths = random_instance(rng)
        alloc = allocate_bits(e, c, budget, widths, solver=solver, method=method)
        assert alloc.cost_bits <= budget
        assert alloc.objective == pytest.approx(dp_optimum(e, c, budget), rel=1e-7, abs=1e-12)
        chosen = e[np.arange(e.shape[0]), alloc.choice]
        assert alloc.objective == pytest.approx(chosen.sum())
        np.testing.assert_array_equal(alloc.widths, np.asarray(widths)[alloc.choice])


def test_highs_and_scipy_agree():
    rng = np.random.default_rng(1)
    for _ in range(20):
        e, c, budget, widths = random_instance(rng)
        a = allocate_bits(e, c, budget, widths, solver="HIGHS", method="milp")
        b = allocate_bits(e, c, budget, widths, solver="SCIPY", method="milp")
        assert a.objective == pytest.approx(b.objective, rel=1e-7, abs=1e-12)


def test_cap_on_distinct_widths_matches_exhaustive_optimum():
    rng = np.random.default_rng(2)
    for _ in range(15):
        e, c, budget, widths = random_instance(rng)
        for cap in (1, 2):
            alloc = allocate_bits(e, c, budget, widths, max_widths=cap, method="milp")
            assert len(set(alloc.widths.tolist())) <= cap
            assert alloc.objective == pytest.approx(dp_optimum_capped(e, c, budget, cap), rel=1e-7, abs=1e-12)


def test_infeasible_budget_names_solver_and_status():
    e = np.ones((3, 2))
    with pytest.raises(ValueError, match=r"HIGHS.*infeasible"):
        allocate_bits(e, np.array([5, 10]), 4, (2, 4), method="milp")   # no 0 width, budget below 3 x 5
    with pytest.raises(ValueError, match=r"MCKP.*infeasible"):
        allocate_bits(e, np.array([5, 10]), 4, (2, 4))


def test_unknown_and_missing_solvers():
    e = np.ones((2, 2))
    with pytest.raises(ValueError, match="unknown MILP solver 'nope'"):
        allocate_bits(e, np.array([0, 4]), 8, (0, 2), solver="nope")
    missing = [s for s in ("GUROBI", "CPLEX", "XPRESS") if s not in milp_solvers_installed()]
    if missing:
        with pytest.raises(ValueError, match=f"{missing[0]} is not installed"):
            allocate_bits(e, np.array([0, 4]), 8, (0, 2), solver=missing[0])


def test_time_limit_is_an_error_not_a_zero_answer():
    rng = np.random.default_rng(3)
    r, widths = 3000, (0, 1, 2, 3, 4, 5, 6, 8)
    e = (rng.pareto(1.2, r)[:, None] + 1e-3) * 4.0 ** -np.asarray(widths, float) * rng.uniform(0.5, 1.5, (r, 8))
    c = np.where(np.asarray(widths) == 0, 0, rng.integers(90, 110, (r, 1)) * np.asarray(widths) + rng.integers(0, 30, (r, 8)))
    with pytest.raises(ValueError, match=r"HIGHS.*(time|limit)"):
        allocate_bits(e, c, int(c[:, 2].sum()), widths, max_widths=3, time_limit=1e-3, method="milp")


def test_bad_tables():
    with pytest.raises(ValueError, match="finite"):
        allocate_bits(np.array([[np.nan, 1.0]]), np.array([0, 2]), 4, (0, 2))
    with pytest.raises(ValueError, match=r"errors must be \(r, 2\)"):
        allocate_bits(np.ones((2, 3)), np.array([0, 2]), 4, (0, 2))


def test_index_cost_is_byte_exact_formula():
    # 2 bits, m=10, n=17, g=8: codes 2*(2+3) bytes, groups (2+3)*(2 bytes scale + 1 zero), σ 4, width 1.
    c = index_cost_bits(10, 17, (0, 2), 8)
    assert c[0] == 0
    assert c[1] == 8 * (2 * (2 + 3) + (2 + 3) * 3 + 4 + 1)


def test_gap_bounds_the_objective():
    """With a relative gap the answer is certified within it of the exact (DP) optimum."""
    rng = np.random.default_rng(4)
    for _ in range(20):
        e, c, budget, widths = random_instance(rng)
        alloc = allocate_bits(e, c, budget, widths, mip_rel_gap=1e-2, method="milp")
        best = dp_optimum(e, c, budget)
        assert best - 1e-12 <= alloc.objective <= best * (1 + 1e-2) + 1e-12


def test_lagrangian_reduction_keeps_every_pair_of_every_optimum():
    """Oracle: a pair (i, b) is in some optimal solution iff forcing it still reaches the DP optimum; every
    such pair must survive the reduction, and the incumbent must fit the budget. Duplicated rows make
    many optima (ties)."""
    from prinmix_jax.allocation import lagrangian_reduction

    rng = np.random.default_rng(7)
    removed = total = 0
    for trial in range(40):
        e, c, budget, _ = random_instance(rng)
        if trial % 2:
            e, c = np.concatenate([e, e[:2]]), np.concatenate([c, c[:2]])
        keep, inc, lower = lagrangian_reduction(e, c, budget)
        opt = dp_optimum(e, c, budget)
        if not np.isfinite(opt):
            assert inc is None and keep.all()
            continue
        assert c[np.arange(len(c)), inc].sum() <= budget
        assert lower <= opt * (1 + 1e-9) + 1e-15 <= e[np.arange(len(e)), inc].sum() * (1 + 1e-9) + 2e-15
        for i in range(e.shape[0]):
            rest = np.delete(np.arange(e.shape[0]), i)
            for b in range(e.shape[1]):
                if c[i, b] > budget:
                    continue
                forced = e[i, b] + dp_optimum(e[rest], c[rest], budget - int(c[i, b]))
                if forced <= opt * (1 + 1e-9) + 1e-15:
                    assert keep[i, b], (trial, i, b)
        removed += int((~keep).sum())
        total += keep.size
    assert removed > total // 4   # the reduction does remove pairs


def test_global_allocation_reduces_to_a_small_milp_with_the_same_optimum():
    """A model-sized global problem (60 matrices x 128 indices, long-tailed σ², 5% noise across widths):
    the MILP sees a small core, and its answer matches the full MILP's (no reduction) at the same gap."""
    from prinmix_jax.allocation import allocate_bits_global

    rng = np.random.default_rng(3)
    widths = (0, 2, 3, 4, 8)
    tables = []
    for _ in range(60):
        s2 = np.sort(rng.pareto(1.5, 128) + 0.01)[::-1]
        tables.append(s2[:, None] * 4.0 ** -np.asarray(widths, float)
                      * (1 + 0.05 * rng.standard_normal((128, 5))).clip(0.5))
    costs = [index_cost_bits(128, 128, widths, 32)] * 60
    budget = 60 * 128 * 128
    w, alloc = allocate_bits_global(tables, costs, budget, widths, mip_rel_gap=1e-4, time_limit=120, method="milp")
    assert alloc.cost_bits <= budget and sum(len(x) for x in w) == 60 * 128
    assert 0 < alloc.milp_pairs < 0.05 * 60 * 128 * 5
    _, full = allocate_bits_global(tables, costs, budget, widths, mip_rel_gap=1e-4, time_limit=120, reduce=False,
                                   method="milp")
    assert full.milp_pairs == 60 * 128 * 5 and full.cost_bits <= budget
    assert alloc.objective == pytest.approx(full.objective, rel=2e-4)
    _, mckp = allocate_bits_global(tables, costs, budget, widths, mip_rel_gap=1e-4)
    assert mckp.cost_bits <= budget and mckp.gap <= 1e-4
    assert mckp.objective <= full.objective * (1 + 1e-9) and full.objective <= mckp.objective * (1 + 2e-4)


@pytest.mark.parametrize("method,solver", [("mckp", "HIGHS"), ("milp", "HIGHS"), ("milp", "SCIPY")])
def test_errors_spanning_many_decades_under_generous_budgets(method, solver):
    """Errors from 1e-12 to 1e6 and budgets near the most expensive choice: the optimum lies many decades below
    the table's largest entry, where a solver scaled by that entry sees only zeros. The answer must still be
    the DP optimum (to the MILP solver's tolerances) and the reported lower bound a bound."""
    if solver not in milp_solvers_installed():
        pytest.skip(f"{solver} not installed")
    rng = np.random.default_rng(7)
    # the MCKP solver is exact in float64; a MILP solver is exact to its tolerances (SciPy's cannot be set)
    tol = {"mckp": 1e-9, "HIGHS": 1e-8, "SCIPY": 1e-6}["mckp" if method == "mckp" else solver]
    for _ in range(40):
        r, widths = int(rng.integers(8, 40)), (0, 2, 3, 4, 8)
        e = 10.0 ** rng.uniform(-12, 6, (r, len(widths)))
        c = rng.integers(0, 12, (r, len(widths)))
        budget = int(rng.integers((c.min(1).sum() + 3 * c.max(1).sum()) // 4, c.max(1).sum() + 1))
        opt = dp_optimum(e, c, budget)
        alloc = allocate_bits(e, c, budget, widths, method=method, solver=solver)
        assert alloc.cost_bits <= budget
        assert opt * (1 - 1e-12) <= alloc.objective <= opt * (1 + tol)
        assert alloc.lower_bound <= opt * (1 + tol)
