"""The special-purpose allocation solver (``method="mckp"``, prinmix_jax.allocation_mckp): proven gap, exactness
against the dynamic-programming oracle, near-tie (data-free) tables, caps, global tables, infeasible budgets."""
import itertools

import numpy as np
import pytest
from test_allocation import dp_optimum, dp_optimum_capped

from prinmix_jax import CompressionConfig, allocate_bits, index_cost_bits
from prinmix_jax.allocation import allocate_bits_global
from prinmix_jax.allocation_mckp import solve_mckp

WIDTHS = (0, 2, 3, 4, 8)
# relative error of a unit-norm row at each width (V + U side), as the library's data-free tables have them
Q = np.array([1.0, 0.5056, 0.0929, 0.02025, 7.0e-5])


def datafree_table(m, n, seed=0):
    """A scaled-down data-free error table with the near-tie structure of a real one: σ² ~ i^-2 plus a
    Marchenko–Pastur noise floor, times per-width errors with a per-row jitter of 1.67/√n (correlated
    across widths), as measured on ``error_tables`` of ``long_tailed_delta`` at 512² and 1024²."""
    rng = np.random.default_rng(seed)
    r = min(m, n)
    y = r / max(m, n)
    a, b = (1 - np.sqrt(y)) ** 2, (1 + np.sqrt(y)) ** 2
    x = np.linspace(a, b, 4001)
    dens = np.sqrt(np.maximum((b - x) * (x - a), 0)) / np.maximum(x, 1e-12)
    cdf = np.concatenate([[0], np.cumsum(0.5 * (dens[1:] + dens[:-1]) * np.diff(x))])
    mp = np.interp((np.arange(r) + 0.5) / r, cdf / cdf[-1], x)[::-1]
    s2 = np.arange(1, r + 1.0) ** -2
    s2 = np.sort(s2 + 0.15 * s2.sum() / r * mp)[::-1]
    jit = 1 + 1.67 / np.sqrt(n) * (0.9 * rng.standard_normal((r, 1)) + 0.44 * rng.standard_normal((r, 5)))
    return s2[:, None] * Q * np.where(np.asarray(WIDTHS) == 0, 1.0, jit)


def exact(e, c, budget, max_widths=None):
    """The DP oracle, in units of the costs' gcd (exact: every total cost is a multiple of it)."""
    g = int(np.gcd.reduce(np.asarray(c).ravel()))
    c = np.broadcast_to(c, e.shape) // g
    if max_widths is None:
        return dp_optimum(e, c, budget // g)
    return dp_optimum_capped(e, c, budget // g, max_widths)


def check(alloc, e, c, budget, opt, gap, max_widths=None):
    c = np.broadcast_to(c, e.shape)
    rows = np.arange(e.shape[0])
    assert alloc.status == "optimal"
    assert alloc.cost_bits == c[rows, alloc.choice].sum() <= budget
    assert alloc.objective == pytest.approx(e[rows, alloc.choice].sum(), rel=1e-12)
    tol = 1e-9 * opt + 1e-15
    assert opt - tol <= alloc.objective <= opt * (1 + gap) + tol         # within the gap of the optimum
    assert alloc.lower_bound <= opt + tol                                # the bound is a bound
    assert alloc.gap <= gap + 1e-9                                       # and the reported gap is proven
    if max_widths is not None:
        assert len(np.unique(alloc.choice)) <= max_widths


def table_instance(rng, classes=2):
    """Costs that take one value per width and cost class (as per matrix shape), several rows per class."""
    tabs, costs = [], []
    for _ in range(classes):
        r = int(rng.integers(4, 14))
        s2 = np.sort(rng.pareto(1.5, r) + 0.01)[::-1]
        tabs.append(s2[:, None] * Q * rng.uniform(0.8, 1.2, (r, 5)) ** (np.asarray(WIDTHS) > 0))
        a, k = int(rng.integers(2, 7)), int(rng.integers(0, 4))
        costs.append(np.broadcast_to(np.where(np.asarray(WIDTHS) == 0, 0, a * np.asarray(WIDTHS) + k), (r, 5)))
    e, c = np.concatenate(tabs), np.concatenate(costs)
    budget = int(rng.integers(0, c[:, 2].sum() + 1))
    return e, c, budget


@pytest.mark.parametrize("gap", [0.0, 1e-2])
def test_matches_dynamic_programming(gap):
    from test_allocation import random_instance

    rng = np.random.default_rng(10)
    for trial in range(60):
        e, c, budget = table_instance(rng) if trial % 2 else random_instance(rng)[:3]
        opt = dp_optimum(e, np.broadcast_to(c, e.shape), budget)
        alloc = allocate_bits(e, c, budget, WIDTHS, mip_rel_gap=gap)
        check(alloc, e, c, budget, opt, gap)
        assert alloc.solver in ("MCKP", "MCKP+HIGHS")


def test_near_tie_datafree_copy_within_gap_of_the_optimum():
    """Scaled-down copies of the data-free 4096x4096 allocation (default config): the LP bound alone is not
    within 1e-4 of the answer (near-ties: what took HiGHS minutes on the 0/1 problem), so the count MILP
    proves it; the answer is within the stated gap of the exact (DP) optimum."""
    cfg = CompressionConfig(bits=WIDTHS)   # the widths the modelled tables have
    for (m, n), seed in itertools.product([(384, 384), (512, 512), (256, 512)], range(2)):
        e = datafree_table(m, n, seed)
        c = index_cost_bits(m, n, cfg.bits, cfg.group_size, scale_bits=cfg.scale_bits)
        budget = cfg.budget_bits(m, n)
        opt = exact(e, c, budget)
        lp = solve_mckp(e, np.broadcast_to(c, e.shape), budget)
        assert lp.objective - lp.lower > cfg.ilp_gap * lp.lower          # the near-tie structure is there
        alloc = allocate_bits(e, c, budget, cfg.bits, max_widths=cfg.max_widths, solver=cfg.solver,
                              time_limit=cfg.time_limit, mip_rel_gap=cfg.ilp_gap)
        check(alloc, e, c, budget, opt, cfg.ilp_gap)
        assert alloc.solver == "MCKP+HIGHS" and alloc.milp_pairs > 0
        exact0 = allocate_bits(e, c, budget, cfg.bits, mip_rel_gap=0.0)
        check(exact0, e, c, budget, opt, 0.0)


def test_mckp_bound_alone_proves_large_problems():
    """Many matrices of one shape in one global problem: the LP bound and the DP completion prove the gap
    without any MILP; the answer matches the 0/1 MILP's."""
    cfg = CompressionConfig(bits=WIDTHS)   # the widths the modelled tables have
    tables = [datafree_table(256, 256, s) for s in range(12)]
    c = index_cost_bits(256, 256, cfg.bits, cfg.group_size, scale_bits=cfg.scale_bits)
    budget = 12 * cfg.budget_bits(256, 256)
    w, alloc = allocate_bits_global(tables, [c] * 12, budget, cfg.bits, mip_rel_gap=cfg.ilp_gap)
    assert alloc.solver == "MCKP" and alloc.milp_pairs == 0 and alloc.gap <= cfg.ilp_gap
    assert sum(len(x) for x in w) == 12 * 256 and alloc.cost_bits <= budget
    _, milp = allocate_bits_global(tables, [c] * 12, budget, cfg.bits, mip_rel_gap=cfg.ilp_gap, method="milp")
    assert alloc.objective <= milp.objective * (1 + 1e-9)
    assert milp.objective <= alloc.objective * (1 + 2 * cfg.ilp_gap)


@pytest.mark.parametrize("gap", [0.0, 1e-2])
def test_cap_on_distinct_widths(gap):
    from test_allocation import random_instance

    rng = np.random.default_rng(11)
    for trial in range(16):
        e, c, budget = table_instance(rng) if trial % 2 else random_instance(rng)[:3]
        c = np.broadcast_to(c, e.shape)
        for cap in (1, 2, 3):
            opt = dp_optimum_capped(e, c, budget, cap)
            if not np.isfinite(opt):
                with pytest.raises(ValueError, match="infeasible"):
                    allocate_bits(e, c, budget, WIDTHS, max_widths=cap, mip_rel_gap=gap)
                continue
            check(allocate_bits(e, c, budget, WIDTHS, max_widths=cap, mip_rel_gap=gap), e, c, budget, opt, gap, cap)


def test_cap_on_a_near_tie_table():
    cfg = CompressionConfig(bits=WIDTHS)   # the widths the modelled tables have
    e = datafree_table(192, 192, 3)
    c = index_cost_bits(192, 192, cfg.bits, cfg.group_size, scale_bits=cfg.scale_bits)
    budget = cfg.budget_bits(192, 192)
    for cap in (1, 2):
        opt = exact(e, c, budget, cap)
        check(allocate_bits(e, c, budget, cfg.bits, max_widths=cap, mip_rel_gap=cfg.ilp_gap), e, c, budget, opt,
              cfg.ilp_gap, cap)


def test_global_tables_of_several_shapes_match_the_oracle():
    """The global scope: tables of three shapes (three cost vectors) under one budget, normalised."""
    cfg = CompressionConfig(bits=WIDTHS, group_size=32)
    shapes = [(96, 96), (96, 96), (160, 96), (96, 160), (160, 96)]
    tables = [datafree_table(m, n, s) * (1 + s) for s, (m, n) in enumerate(shapes)]
    costs = [index_cost_bits(m, n, cfg.bits, cfg.group_size) for m, n in shapes]
    budget = sum(cfg.budget_bits(m, n) for m, n in shapes)
    e = np.concatenate([t / t[:, 0].sum() for t in tables])
    c = np.concatenate([np.broadcast_to(k, t.shape) for k, t in zip(costs, tables)])
    opt = exact(e, c, budget)
    for gap in (0.0, 1e-4):
        w, alloc = allocate_bits_global(tables, costs, budget, cfg.bits, mip_rel_gap=gap)
        check(alloc, e, c, budget, opt, gap)
        np.testing.assert_array_equal(np.concatenate(w), np.asarray(cfg.bits)[alloc.choice])


def test_exact_ties_give_an_integral_answer():
    """Identical rows (exact ties): an optimal face of the count MILP is not integral; the answer must be."""
    e = np.tile(np.array([[1.0, 0.5, 0.1]]), (9, 1))
    c = np.array([0, 3, 5])
    for budget in (0, 4, 10, 14, 17, 31, 45):
        opt = dp_optimum(e, np.broadcast_to(c, e.shape), budget)
        check(allocate_bits(e, c, budget, (0, 2, 4)), e, c, budget, opt, 0.0)


def test_infeasible_budget_and_trivial_cases():
    with pytest.raises(ValueError, match=r"MCKP.*infeasible"):
        allocate_bits(np.ones((3, 2)), np.array([5, 10]), 4, (2, 4))          # no 0 width
    with pytest.raises(ValueError, match=r"MCKP.*infeasible"):
        allocate_bits(np.ones((2, 2)), np.array([[5, 10], [10, 5]]), 10, (2, 4), max_widths=1)   # fits with 2 widths
    assert allocate_bits(np.ones((2, 2)), np.array([[5, 10], [10, 5]]), 10, (2, 4), max_widths=2).cost_bits == 10
    a = allocate_bits(np.tile([1.0, 0.5], (3, 1)), np.array([0, 4]), 1000, (0, 2))   # all fits: the LP is integral
    assert a.solver == "MCKP" and a.gap == 0 and a.widths.tolist() == [2, 2, 2]
    z = allocate_bits(np.zeros((4, 2)), np.array([0, 4]), 3, (0, 2))
    assert z.objective == 0 and z.gap == 0
    with pytest.raises(ValueError, match="unknown allocation method"):
        allocate_bits(np.ones((1, 2)), np.array([0, 4]), 8, (0, 2), method="greedy")
