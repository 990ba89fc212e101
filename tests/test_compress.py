"""compress_matrix end to end: quality ordering, byte accounting, pytree form, bad input."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prinmix_jax import (METHODS, CompressionConfig, SVDQuantDelta, allocate_bits, allocate_bits_global,
                         compress_matrix, compress_stack, error_tables, from_state, to_state)
from prinmix_jax.compress import pack_svd
from prinmix_jax.core.gptq import GPTQResult
from prinmix_jax.methods.shared import index_costs
from prinmix_jax.synthetic import long_tailed_delta


@pytest.mark.parametrize("shape", [(256, 256), (704, 256), (128, 256)])
def test_method_ordering_at_one_sixteenth(shape):
    d, h = long_tailed_delta(*shape, seed=sum(shape))
    cfg = CompressionConfig(ratio=1 / 16)
    err, table = {}, {}
    for method in METHODS:
        cm, info = compress_matrix(d, h, cfg, method, return_info=True)
        err[method] = info["rel_output_error"]
        table[method] = info.get("error_table_objective")
        assert cm.method == method
    assert err["prinmix"] < err["deltacome"] < err["lowrank"], err
    assert err["prinmix"] < err["bitdelta"], err
    # The ILP is optimal (within its proven gap) for the error it models: no uniform width does better there.
    # (End to end, after RTC and the U step, uniform can come close; it is not asserted.)
    assert table["prinmix"] <= table["uniform"] * (1 + cfg.ilp_gap), table


@pytest.mark.parametrize("method", ["prinmix", "deltacome", "uniform"])
@pytest.mark.parametrize("calibrated", [True, False])
def test_recorded_error_is_that_of_the_packed_result(method, calibrated):
    # The SVD methods record the error from the padded GPTQ factors (no program per rank); it must be the
    # error of what is stored, i.e. of the result unpacked from its codes, scales and zeros.
    d, h = long_tailed_delta(200, 136, seed=11)
    h = h if calibrated else None
    cm, info = compress_matrix(d, h, CompressionConfig(group_size=64), method, return_info=True)
    approx = np.asarray(cm.reconstruct(), np.float64)
    hh = np.eye(d.shape[1]) if h is None else np.asarray(h, np.float64)
    e = np.asarray(d, np.float64) - approx
    want = np.sqrt(np.sum((e @ hh) * e) / np.sum((d @ hh) * d))
    assert 0 < want < 1
    np.testing.assert_allclose(info["rel_output_error"], want, rtol=1e-4)


def test_u_step_compiles_once_per_shape_whatever_the_kept_ranks():
    # The U step is padded to the largest rank the budget allows, so matrices of one shape share its
    # programs however many indices their allocations keep (over a model's blocks, programs per rank
    # bucket were the growth of peak memory).
    from prinmix_jax.compress import max_kept_rank, rank_bucket
    from prinmix_jax.core.rtc import rtc_target, u_hessian

    cfg = CompressionConfig(ratio=0.25)
    jax.clear_caches()
    ranks = []
    for decay in (0.0, 1.0, 3.0):
        d, h = long_tailed_delta(128, 256, seed=1, decay=decay, noise=0.01)
        ranks.append(compress_matrix(d, h, cfg).rank)
    assert max(ranks) <= max_kept_rank(128, 256, cfg)
    assert len({rank_bucket(k) for k in ranks}) > 1, ranks      # per-rank buckets would compile several
    assert rtc_target._cache_size() == 1 and u_hessian._cache_size() == 1
    # Given widths (a global allocation): padded to the largest kept rank of the stack.
    jax.clear_caches()
    d = np.stack([long_tailed_delta(128, 256, seed=s)[0] for s in range(3)])
    widths = [np.where(np.arange(128) < k, 2, 0) for k in (20, 45, 90)]
    out = compress_stack(d, None, cfg, widths=widths)
    assert [cm.rank for cm in out] == [20, 45, 90]
    assert rtc_target._cache_size() == 1


def _leaf_bytes(cm):
    return sum(np.asarray(x).nbytes for x in jax.tree.leaves(cm))


# Each shape compiles its own programs (most of this test's time), so one per layout case: tall with U's last
# group partial (88 = 2 x 32 + 24) and V in whole groups; wide (the SVD of the transpose), whole groups on both
# sides; under one group (the lean layout folds each factor's single scale into sigma); one row (nothing fits:
# rank 0). The square 128x128 case (whole groups, tall path) added none of its own.
@pytest.mark.parametrize("shape", [(88, 64), (64, 96), (8, 8), (1, 40)])
@pytest.mark.parametrize("method", METHODS)
def test_nbytes_is_the_stored_bytes_and_within_budget(shape, method):
    d, h = long_tailed_delta(*shape, seed=3)
    cfg = CompressionConfig(group_size=32)
    cm = compress_matrix(d, h, cfg, method)
    arrays, meta = to_state(cm)
    assert cm.nbytes == sum(a.nbytes for a in arrays.values()) == meta["nbytes"]
    back = from_state(arrays, meta)           # nothing the matrix needs was left out of the stored arrays
    np.testing.assert_array_equal(np.asarray(back.reconstruct()), np.asarray(cm.reconstruct()))
    if method in ("prinmix", "deltacome", "uniform"):
        assert cm.lean and (cm.nbytes < _leaf_bytes(cm) or cm.rank == 0)   # the widths leaf at least is implied
        if method == "prinmix":   # the layout follows cfg.lean in pack_svd, the same code for all three methods
            full = compress_matrix(d, h, dataclasses.replace(cfg, index_metadata="full"), method)
            assert not full.lean and full.nbytes == _leaf_bytes(full)
    else:
        assert cm.nbytes == _leaf_bytes(cm)
    budget = cfg.ratio * 2 * shape[0] * shape[1]
    slack = 4 if method == "bitdelta" else 0      # BitDelta: 1 bit/param plus its one float32 scale
    if method == "bitdelta":
        assert cm.nbytes == shape[0] * -(-shape[1] // 8) + 4
    else:
        assert cm.nbytes <= budget + slack
    assert cm.reconstruct().shape == shape


@pytest.mark.parametrize("shape", [(11008, 4096), (512, 3584), (4096, 4096)])
def test_real_model_shapes_pack_within_budget(shape):
    """Allocation + packing at real LLM shapes (no GPTQ: codes are synthetic)."""
    m, n = shape
    cfg = CompressionConfig()
    r = min(m, n)
    sigma = np.arange(1, r + 1, dtype=np.float64) ** -0.8
    e = sigma[:, None] ** 2 * 4.0 ** -np.asarray(cfg.bits, float)
    costs = index_costs(m, n, cfg)
    budget = cfg.budget_bits(m, n)
    alloc = allocate_bits(e, costs, budget, cfg.bits)
    keep = np.nonzero(alloc.widths)[0]
    w = alloc.widths[keep]
    k = keep.size
    rng = np.random.default_rng(0)
    codes_v = (rng.integers(0, 256, (k, n)) % (2 ** w[:, None])).astype(np.uint8)
    codes_u = (rng.integers(0, 256, (m, k)) % (2 ** w[None, :])).astype(np.uint8)
    g = cfg.group_size
    zero = ((2.0 ** w - 1) / 2)[:, None]           # the symmetric grid's (lean metadata stores no zero there)
    v_res = GPTQResult(None, codes_v, np.ones((k, -(-n // g))), np.broadcast_to(zero, (k, -(-n // g))), None)
    u_res = GPTQResult(None, codes_u, np.ones((k, -(-m // g))), np.broadcast_to(zero, (k, -(-m // g))), None)
    cm = pack_svd((m, n), sigma[keep], w, v_res, u_res, cfg, "prinmix")
    assert cm.nbytes == sum(a.nbytes for a in to_state(cm)[0].values()) == alloc.cost_bits // 8
    assert cm.nbytes <= cfg.ratio * 2 * m * n


def test_compressed_matrix_is_a_pytree_and_round_trips_through_state():
    d, h = long_tailed_delta(64, 96, seed=4)
    cm = compress_matrix(d, h, CompressionConfig(group_size=32))
    assert isinstance(cm, SVDQuantDelta)
    leaves, treedef = jax.tree.flatten(cm)
    assert all(isinstance(x, jax.Array) for x in leaves)
    again = jax.tree.unflatten(treedef, leaves)
    np.testing.assert_array_equal(again.reconstruct(), cm.reconstruct())
    doubled = jax.jit(lambda c: c.reconstruct())(cm)            # static widths: traceable
    np.testing.assert_allclose(doubled, cm.reconstruct(), rtol=1e-6, atol=1e-7)
    arrays, meta = to_state(cm)
    back = from_state(arrays, meta)
    np.testing.assert_array_equal(back.reconstruct(), cm.reconstruct())
    assert back.nbytes == cm.nbytes
    arrays.pop(next(iter(arrays)))
    with pytest.raises(ValueError, match="lacks arrays"):
        from_state(arrays, meta)
    x = np.random.default_rng(0).standard_normal((5, 96)).astype(np.float32)
    np.testing.assert_allclose(cm.apply(x), x @ np.asarray(cm.reconstruct()).T, rtol=1e-4, atol=1e-5)


def test_bits_reports_kept_widths_in_sigma_order_and_respects_max_widths():
    d, h = long_tailed_delta(96, 128, seed=5)
    cm = compress_matrix(d, h, CompressionConfig(group_size=32, max_widths=2))
    assert len(set(cm.bits.tolist())) <= 2
    assert cm.bits.size == cm.rank > 0
    assert set(cm.bits.tolist()) <= {2, 3, 4, 8}


def test_all_zero_delta_compresses_to_zero():
    for method in METHODS:
        cm = compress_matrix(np.zeros((16, 24), np.float32), None, CompressionConfig(group_size=8), method)
        assert np.all(np.asarray(cm.reconstruct()) == 0), method


def test_data_free_and_bfloat16_input():
    d, _ = long_tailed_delta(64, 64, seed=6)
    cm, info = compress_matrix(jnp.asarray(d, jnp.bfloat16), None, CompressionConfig(group_size=32),
                               return_info=True)
    assert info["rel_output_error"] < 0.6
    assert cm.nbytes <= 64 * 64 * 2 / 16


def test_stack_equals_single_matrices_on_eight_devices():
    assert len(jax.devices()) == 8
    pairs = [long_tailed_delta(32, 48, seed=s) for s in range(3)]       # 3 -> padded to 8
    cfg = CompressionConfig(group_size=16)
    for method in ("prinmix", "deltacome"):
        stacked = compress_stack([p[0] for p in pairs], [p[1] for p in pairs], cfg, method)
        for cm, (d, h) in zip(stacked, pairs):
            single = compress_matrix(d, h, cfg, method)
            a, ma = to_state(cm)
            b, mb = to_state(single)
            assert ma == mb and a.keys() == b.keys()
            for k in a:
                np.testing.assert_array_equal(a[k], b[k])


@pytest.mark.parametrize("delta,hessian,match", [
    (np.zeros((4, 4, 4)), None, "2-D"),
    (np.zeros((0, 4)), None, "empty"),
    (np.array([[1.0, np.nan], [0.0, 1.0]]), None, "NaN or Inf"),
    (np.array([[1.0, np.inf], [0.0, 1.0]]), None, "NaN or Inf"),
    (np.ones((3, 4)), np.eye(3), r"hessian must be \(4, 4\)"),
    (np.ones((3, 4)), np.full((4, 4), np.nan), "hessian contains NaN"),
    (np.array([["a"]]), None, "floating-point"),
])
def test_bad_input_raises_value_error(delta, hessian, match):
    with pytest.raises(ValueError, match=match):
        compress_matrix(delta, hessian)


def test_bad_config_and_method():
    for kw, match in [({"ratio": 0}, "ratio"), ({"ratio": -1.0}, "ratio"), ({"ratio": float("nan")}, "ratio"),
                      ({"bits": (0,)}, "no nonzero width"), ({"bits": (0, 9)}, "0..8"),
                      ({"group_size": 0}, "group_size"), ({"scale_dtype": "int8"}, "scale_dtype")]:
        with pytest.raises(ValueError, match=match):
            CompressionConfig(**kw)
    with pytest.raises(ValueError, match="unknown method 'svd'"):
        compress_matrix(np.ones((4, 4)), method="svd")
    with pytest.raises(ValueError, match="unknown MILP solver"):
        compress_matrix(np.ones((4, 4)), config=dataclasses.replace(CompressionConfig(), solver="magic"))
    with pytest.raises(ValueError, match="config must be a CompressionConfig"):
        compress_matrix(np.ones((4, 4)), config={"ratio": 0.1})


def test_budget_too_small_without_zero_width_is_a_clear_error():
    d, _ = long_tailed_delta(32, 32, seed=7)
    with pytest.raises(ValueError, match="infeasible"):
        compress_matrix(d, None, CompressionConfig(bits=(2, 3), group_size=8))


def test_global_allocation_beats_per_matrix_under_the_same_total_budget():
    shapes = [(48, 64), (48, 64), (96, 64)]
    pairs = [long_tailed_delta(m, n, seed=20 + i, decay=0.6 + 0.4 * i) for i, (m, n) in enumerate(shapes)]
    cfg = CompressionConfig(group_size=16)
    tables, costs, budgets, local = [], [], [], []
    for d, h in pairs:
        (e,) = error_tables([d], [h], cfg)
        c = index_costs(*d.shape, cfg)
        tables.append(e)
        costs.append(c)
        budgets.append(cfg.budget_bits(*d.shape))
        local.append(allocate_bits(e, c, budgets[-1], cfg.bits, mip_rel_gap=cfg.ilp_gap))   # as compress_matrix
    widths, alloc = allocate_bits_global(tables, costs, sum(budgets), cfg.bits)
    assert alloc.cost_bits <= sum(budgets)
    rel = lambda e, w: e[np.arange(e.shape[0]), [cfg.bits.index(b) for b in w]].sum() / e[:, 0].sum()
    global_obj = sum(rel(e, w) for e, w in zip(tables, widths))
    local_obj = sum(rel(e, a.widths) for e, a in zip(tables, local))
    assert global_obj <= local_obj + 1e-12
    assert global_obj == pytest.approx(alloc.objective)
    # Given widths skip the per-matrix ILP; with the per-matrix ILP's widths the result is identical.
    d, h = pairs[0]
    (given,) = compress_stack([d], [h], cfg, widths=[local[0].widths])
    ref = compress_matrix(d, h, cfg)
    a, ma = to_state(given)
    b, mb = to_state(ref)
    assert ma == mb
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    with pytest.raises(ValueError, match="not among the candidate bits"):
        compress_stack([d], [h], cfg, widths=[np.full(local[0].widths.shape, 5)])


def test_u_error_term_lowers_the_end_to_end_error():
    """Allocating on V-step + estimated U-step error beats the V-only table (project choice, default on)."""
    gains = []
    for shape in [(128, 128), (64, 160)]:
        d, h = long_tailed_delta(*shape, seed=40 + shape[1])
        cfg = CompressionConfig(group_size=32)
        _, on = compress_matrix(d, h, cfg, return_info=True)
        _, off = compress_matrix(d, h, dataclasses.replace(cfg, u_error=False), return_info=True)
        gains.append(off["rel_output_error"] - on["rel_output_error"])
    assert min(gains) > 0, gains


def test_method_registry_matches_methods_and_svd_sharded_is_the_one_path():
    from prinmix_jax.core.svd import svd_delta, svd_sharded
    from prinmix_jax.methods import REGISTRY, get_method

    assert tuple(REGISTRY) == METHODS and all(get_method(m).name == m for m in METHODS)
    with pytest.raises(ValueError, match="unknown method 'svd'"):
        get_method("svd")
    d = np.random.default_rng(0).standard_normal((3, 24, 16)).astype(np.float32)
    u, s, v = svd_sharded(d)       # 3 matrices over 8 devices: padded, then the padding dropped
    assert np.asarray(u).shape == (3, 24, 16) and np.asarray(s).shape == (3, 16) and np.asarray(v).shape == (3, 16, 16)
    np.testing.assert_allclose(np.asarray(s), np.asarray(svd_delta(d)[1]), rtol=1e-5)
    with pytest.raises(ValueError, match="upcast"):
        svd_sharded(jnp.asarray(d, jnp.bfloat16))
