"""The truncated SVDs (``CompressionConfig.svd``: the Gram SVD and the randomized range finder): accuracy
against the full SVD, determinism, rank choice.

Accuracy targets (issue 14): the kept singular values within 1e-3 relative of the full SVD's, and the
end-to-end relative output error of the compressed matrix within 1% of the full SVD's. Each bound is also
shown to fail for a too-weak setting, so the tests can catch a broken range finder.
"""
import dataclasses
import functools

import jax
import numpy as np
import pytest

from prinmix_jax import CompressionConfig, compress_matrix, compress_stack, error_tables, to_state
from prinmix_jax.allocation import allocate_bits
from prinmix_jax.core.mesh import default_mesh, single_device_mesh, sub_mesh
from prinmix_jax.core.svd import gram_fallback_needed, svd_delta, svd_fn, svd_sharded
from prinmix_jax.methods.shared import index_costs, max_kept_rank, oversample_columns, svd_method, svd_rank
from prinmix_jax.synthetic import long_tailed_delta

M, N = 256, 512
# Float32 rounding slack of the decompositions, by backend. The tight checks below (orthogonality 2e-5, the
# triplets' consistency 1e-5, the fallback's σ 1e-5) are set from LAPACK on the CPU. On the H200 (jax 0.11.2,
# cuSOLVER; docs/benchmarks.md, "The test suite on the H200") products at Precision.HIGHEST are float32
# (2.1e-7 against float64), but the decompositions are less exact: a 1024x512 SVD's residual 1.4e-4 and
# ‖UᵀU − I‖ 4.4e-4 (LAPACK: ~1e-6; JAX takes cuSOLVER's Jacobi SVD up to 1024 a side), and those checks
# measured 1.3-2.4 times their CPU tolerances. The
# issue's own targets (σ within 1e-3, output error within 1%) keep one tolerance everywhere.
ON_CPU = jax.default_backend() == "cpu"
SLACK = 1.0 if ON_CPU else 5.0
TRUNC = CompressionConfig(svd="truncated")
GRAM = CompressionConfig(svd="gram")
FULL = CompressionConfig(svd="full")


@pytest.fixture(scope="module")
def pair():
    return long_tailed_delta(M, N, seed=11)


@pytest.fixture(scope="module")
def small():
    return long_tailed_delta(128, 256, seed=12)


@pytest.fixture(scope="module")
def full_info(pair):
    """``full_info(calibrated)``: ``compress_matrix``'s info with the full SVD, data-free or calibrated, the
    reference every truncated setting is held to (computed once per module, not once per setting)."""
    d, h = pair
    return functools.cache(lambda cal: compress_matrix(d, h if cal else None, FULL, return_info=True)[1])


def _rank(cfg=TRUNC, m=M, n=N):
    return svd_rank(m, n, cfg, max_kept_rank(m, n, cfg))


def _sigma_error(d, rank, oversample, iters):
    s_full = np.linalg.svd(d.astype(np.float64), compute_uv=False)
    u, s, v = (np.asarray(x) for x in svd_delta(d, rank, method="randomized", oversample=oversample,
                                                 iters=iters))
    return u, s, v, np.abs(s - s_full[:rank]) / s_full[:rank]


@pytest.mark.parametrize("method", ["gram", "randomized"])
@pytest.mark.parametrize("shape", [(M, N), (N, M)])
def test_truncated_sigma_within_1e3_of_full_and_layout(shape, method):
    d, _ = long_tailed_delta(*shape, seed=5)
    k_max = max_kept_rank(*shape, TRUNC)
    k = _rank(TRUNC, *shape)
    assert k_max < k < min(shape)
    s_full = np.linalg.svd(d.astype(np.float64), compute_uv=False)
    u, s, v = (np.asarray(x) for x in svd_delta(d, k, method=method, oversample=oversample_columns(k, TRUNC),
                                                 iters=TRUNC.svd_iters))
    err = np.abs(s - s_full[:k]) / s_full[:k]
    assert u.shape == (shape[0], k) and s.shape == (k,) and v.shape == (k, shape[1])
    assert u.dtype == s.dtype == v.dtype == np.float32
    assert np.all(np.diff(s) <= 0)
    np.testing.assert_allclose(v @ v.T, np.eye(k), atol=2e-5 * SLACK)
    np.testing.assert_allclose(u.T @ u, np.eye(k), atol=2e-5 * SLACK)
    assert err[:k_max].max() < 1e-3, err[:k_max].max()
    if method == "gram":       # the Gram SVD is exact up to float32 rounding of ΔWᵀΔW: every k, tighter
        assert err.max() < 1e-4, err.max()
    # The triplets are consistent: U diag(σ) V is the projection of ΔW on U's columns (the range finder's
    # Rayleigh–Ritz) or on V's rows (the Gram SVD's).
    proj = d @ v.T @ v if method == "gram" else u @ (u.T @ d)
    np.testing.assert_allclose((u * s) @ v, proj, atol=1e-5 * SLACK * np.abs(d).max())
    # Sensitivity: no subspace iteration and no oversampling miss the bound by far.
    assert _sigma_error(d, k, 0, 0)[3][:k_max].max() > 1e-2


def test_gram_svd_falls_back_to_the_full_svd_on_steep_spectra_and_keeps_low_rank_deltas():
    """Squaring ΔW in float32 costs the Gram SVD relative accuracy as ``ε·√n·(σ₁/σ_k)²``: on a steep spectrum
    its raw σ are off by over 1e-2, so the guard (:func:`gram_fallback_needed`) takes the full SVD there and
    the result is exact; on a long-tailed delta the guard keeps the Gram SVD. A delta of rank < k and an
    all-zero delta give zeros past the rank, orthonormal factors and no NaN. (256 x 128 with σ ~ i^-2: an error
    estimate of 0.93, near 512 x 256's 1.07 with i^-1.5, at an eighth of the cost of the fallback's full SVDs,
    8 of them in svd_sharded's stack padded to 8 devices.)"""
    k = 48
    steep, _ = long_tailed_delta(256, 128, seed=7, decay=2.0, noise=1e-4)
    tail, _ = long_tailed_delta(256, 128, seed=7)
    for d, trusted in ((steep, False), (tail, True)):
        s_full = np.linalg.svd(d.astype(np.float64), compute_uv=False)[:k]
        raw = np.asarray(svd_fn(k, "gram")(jax.numpy.asarray(d))[1], np.float64)
        assert gram_fallback_needed(raw[None], 128)[0] == (not trusted)
        s = np.asarray(svd_delta(d, k)[1], np.float64)
        assert np.abs(s / s_full - 1).max() < (1e-4 if trusted else 1e-5 * SLACK)
        if not trusted:
            assert np.abs(raw / s_full - 1).max() > 1e-2
        (_, s8, _) = svd_sharded(np.stack([tail, d, tail]), rank=k)    # the guard per matrix, on 8 devices
        if ON_CPU:        # bytes on the CPU; on a GPU the two programs' kernels are autotuned apart (6.6e-7)
            np.testing.assert_array_equal(np.asarray(s8)[1], np.asarray(svd_delta(d, k)[1]))
        else:
            np.testing.assert_allclose(np.asarray(s8)[1], np.asarray(svd_delta(d, k)[1]), rtol=1e-5)
    rng = np.random.default_rng(0)
    low = (rng.standard_normal((64, 3)) @ rng.standard_normal((3, 48))).astype(np.float32)
    for delta in (low, np.zeros((64, 48), np.float32), low.T):
        u, s, v = (np.asarray(x) for x in svd_delta(delta, 10))
        assert np.isfinite(u).all() and np.isfinite(s).all() and np.isfinite(v).all()
        np.testing.assert_allclose(u.T @ u, np.eye(10), atol=1e-5)
        np.testing.assert_allclose(v @ v.T, np.eye(10), atol=1e-5)
        np.testing.assert_allclose((u * s) @ v, delta, atol=1e-4 * max(1.0, np.abs(delta).max()))
        assert np.all(s[3:] <= 1e-5 * max(1.0, s[0]))


@pytest.mark.parametrize("cfg", [GRAM, TRUNC], ids=["gram", "randomized"])
@pytest.mark.parametrize("calibrated", [False, True])
def test_prinmix_output_error_within_one_percent_of_full(pair, full_info, calibrated, cfg):
    d, h = pair
    h = h if calibrated else None
    full = full_info(calibrated)
    cm, trunc = compress_matrix(d, h, cfg, return_info=True)
    assert trunc["svd_rank"] == _rank() < M and full["svd_rank"] == M
    assert cm.nbytes <= TRUNC.budget_bits(M, N) // 8
    rel = trunc["rel_output_error"] / full["rel_output_error"] - 1
    assert abs(rel) < 0.01, (trunc["rel_output_error"], full["rel_output_error"])
    # The kept indices' σ agree with the full SVD's σ at the same index: within 1e-3 among the top k_max
    # (the accuracy target), within 2e-3 in the margin k_max..k (the least converged triplets, which the
    # allocation keeps only when their σ² V_i H V_iᵀ is worth it; 1.01e-3 measured at index 86 with the
    # least-squares grids).
    s_full = np.linalg.svd(d.astype(np.float64), compute_uv=False)
    k = trunc["svd_rank"]
    s_trunc = np.asarray(svd_delta(d, k, method=svd_method(cfg), oversample=oversample_columns(k, TRUNC),
                                   iters=TRUNC.svd_iters)[1])
    kept = np.concatenate([np.asarray(s) for s in cm.sigma])
    idx = np.argmin(np.abs(kept[:, None] - s_trunc[None, :]), axis=1)
    assert np.abs(kept / s_trunc[idx] - 1).max() < 1e-5
    rel_err = np.abs(kept / s_full[idx] - 1)
    top = idx < max_kept_rank(M, N, TRUNC)
    assert rel_err[top].max() < 1e-3, rel_err[top].max()
    assert rel_err.max() < 2e-3, (idx.max(), rel_err.max())
    if cfg is GRAM:
        return
    # Sensitivity: a range finder without iterations or oversampling, at the bare k_max, is > 1% worse.
    weak = dataclasses.replace(TRUNC, svd_margin=0.0, svd_oversample=0.0, svd_iters=0)
    _, bad = compress_matrix(d, h, weak, return_info=True)
    assert bad["rel_output_error"] > 1.01 * full["rel_output_error"]


@pytest.mark.parametrize("method", ["uniform", "deltacome", "lowrank", "bitdelta"])
def test_other_methods_within_one_percent_of_full(small, method):
    d, h = small
    errs = [compress_matrix(d, h, cfg, method, return_info=True)[1]["rel_output_error"] for cfg in (FULL, TRUNC)]
    assert abs(errs[1] / errs[0] - 1) < 0.01, errs


def test_error_tables_keep_the_energy_and_never_pick_the_tail(small):
    d, h = small
    m, n = d.shape
    k = _rank(TRUNC, m, n)
    z = TRUNC.bits.index(0)
    for hess, energy in ((None, np.sum(d.astype(np.float64) ** 2)),
                         (h, np.sum((d.astype(np.float64) @ h) * d))):
        (e,) = error_tables([d], None if hess is None else [hess], TRUNC)
        (ef,) = error_tables([d], None if hess is None else [hess], FULL)
        assert e.shape == ef.shape == (m, len(TRUNC.bits))
        np.testing.assert_allclose(e[:, z].sum(), energy, rtol=1e-4)
        np.testing.assert_allclose(e[:k // 2, z], ef[:k // 2, z], rtol=5e-3, atol=1e-7 * energy)
        np.testing.assert_allclose(e[:k // 2], ef[:k // 2], rtol=0.1, atol=1e-6 * energy)
        alloc = allocate_bits(e, index_costs(m, n, TRUNC), TRUNC.budget_bits(m, n), TRUNC.bits)
        assert not alloc.widths[k:].any()
        # The widths of a table pass go back to compress_stack: same truncated SVD, same rows.
        (cm, info), = compress_stack([d], None if hess is None else [hess], TRUNC, widths=[alloc.widths],
                                     return_info=True)
        assert info["rel_output_error"] < 1
        assert int(np.asarray(cm.widths).size) == int((alloc.widths > 0).sum())


def test_widths_beyond_the_truncation_fall_back_to_the_full_svd(small):
    d, _ = small
    w = np.zeros(128, np.int64)
    w[[0, 1, 127]] = 3                        # index 127 is past any truncated rank
    (cm, _), = compress_stack([d], None, TRUNC, widths=[w], return_info=True)
    assert int(np.asarray(cm.widths).size) == 3


@pytest.mark.eight_devices
def test_deterministic_and_independent_of_the_device_count():
    assert len(jax.devices()) == 8
    deltas = np.stack([long_tailed_delta(64, 96, seed=s)[0] for s in range(3)])     # 3 -> padded to 8
    for kw in (dict(method="randomized", oversample=10, iters=3), dict(method="gram")):
        one = [np.asarray(x) for x in svd_sharded(deltas, single_device_mesh(), rank=20, **kw)]
        eight = [np.asarray(x) for x in svd_sharded(deltas, rank=20, **kw)]
        again = [np.asarray(x) for x in svd_delta(deltas[1], 20, **kw)]
        for a, b in zip(one, eight):
            np.testing.assert_array_equal(a, b)
        for a, b in zip(again, one):
            np.testing.assert_array_equal(a, b[1])
    pairs = [long_tailed_delta(64, 96, seed=s) for s in range(3)]
    for cfg, method in ((CompressionConfig(group_size=16, svd="truncated"), "prinmix"),
                        (CompressionConfig(group_size=16, svd="truncated"), "deltacome"),
                        (CompressionConfig(group_size=16, svd="gram"), "prinmix")):
        stacked = compress_stack([p[0] for p in pairs], [p[1] for p in pairs], cfg, method)
        for cm, (d, h) in zip(stacked, pairs):
            a, ma = to_state(cm)
            b, mb = to_state(compress_matrix(d, h, cfg, method))
            assert ma == mb and a.keys() == b.keys()
            for key in a:
                np.testing.assert_array_equal(a[key], b[key])


def test_stack_bytes_do_not_depend_on_the_batch_or_the_mesh():
    """Every matrix of a stack comes out of the same one-matrix program (core.mesh.run_sharded), whether its
    device computes one matrix or several, and equals :func:`svd_delta` of it alone and of it in another
    stack. Through a vmap, the range finder's V of this wide 33x70 stack differed by ~1e-7 between a batch
    of 5 on one device and one matrix per device (XLA:CPU, AVX2; the Gram SVD's did not, and
    test_deterministic_and_independent_of_the_device_count covers it)."""
    kw = dict(method="randomized", oversample=10, iters=3)
    rank = 9
    deltas = np.stack([long_tailed_delta(33, 70, seed=s)[0] for s in range(5)])
    ref = [np.asarray(x) for x in svd_sharded(deltas, single_device_mesh(), rank=rank, **kw)]
    two = sub_mesh(default_mesh(), list(default_mesh().devices.flat[:2]))
    for got in (svd_sharded(deltas, two, rank=rank, **kw), svd_sharded(deltas, rank=rank, **kw),
                svd_delta(deltas, rank, **kw)):
        for a, b in zip(ref, got):
            np.testing.assert_array_equal(a, np.asarray(b))
    alone = svd_delta(deltas[4], rank, **kw)
    mixed = svd_sharded(deltas[[4, 0]], single_device_mesh(), rank=rank, **kw)
    for a, b, c in zip(ref, alone, mixed):
        np.testing.assert_array_equal(a[4], np.asarray(b))
        np.testing.assert_array_equal(a[4], np.asarray(c)[0])


def test_rank_choice_and_config():
    k_max = max_kept_rank(4096, 4096, CompressionConfig())
    assert svd_rank(4096, 4096, CompressionConfig(svd="full"), k_max) is None
    assert svd_rank(4096, 4096, CompressionConfig(svd="truncated"), 4096) is None      # every index kept
    assert svd_rank(4096, 4096, TRUNC, k_max) == int(np.ceil(1.25 * k_max))
    auto = CompressionConfig()
    assert auto.svd == "auto"
    assert svd_rank(4096, 4096, auto, k_max) == int(np.ceil(1.25 * k_max))           # well below min(m, n)
    assert svd_rank(256, 512, auto, 120) == 150                                       # k <= 0.6 r: Gram SVD
    assert svd_rank(256, 512, auto, 130) is None                                      # k > 0.6 r: full
    assert svd_rank(256, 512, GRAM, 130) == 163
    assert svd_method(auto) == svd_method(GRAM) == "gram" and svd_method(TRUNC) == "randomized"
    for kw, match in [({"svd": "fast"}, "svd must be"), ({"svd_margin": -0.1}, "svd_margin"),
                      ({"svd_oversample": float("inf")}, "svd_oversample"), ({"svd_iters": 1.5}, "svd_iters"),
                      ({"svd_iters": -1}, "svd_iters")]:
        with pytest.raises(ValueError, match=match):
            CompressionConfig(**kw)


@pytest.mark.parametrize("calibrated", [False, True])
def test_auto_full_svd_runs_the_passes_on_the_truncated_rows_only(monkeypatch, calibrated):
    """Where ``auto`` takes the full SVD (the Gram SVD would not pay: k > 0.6 min(m, n)), the GPTQ passes of
    the error table still run on the ``k_max`` + margin rows only (not min(m, n)), and the result matches
    ``svd="full"``, which keeps every row."""
    import prinmix_jax.methods.v_step as sh

    m, n = 128, 64
    cfg = CompressionConfig(ratio=1 / 6, group_size=32)
    k_max = max_kept_rank(m, n, cfg)
    assert svd_rank(m, n, cfg, k_max) is None                      # auto: the full SVD here
    cut = svd_rank(m, n, dataclasses.replace(cfg, svd="gram"), k_max)
    assert cut < n
    rows = []
    real = sh.run_stack_rows

    def counting(fn, mesh, row_args, *a, **kw):
        rows.append(row_args[0].shape[1])
        return real(fn, mesh, row_args, *a, **kw)
    monkeypatch.setattr(sh, "run_stack_rows", counting)
    d, h = long_tailed_delta(m, n, seed=5, tokens=256)
    h = h if calibrated else None
    _, auto = compress_matrix(d, h, cfg, return_info=True)
    assert rows == [cut]
    _, full = compress_matrix(d, h, dataclasses.replace(cfg, svd="full"), return_info=True)
    assert rows == [cut, n]
    assert auto["rel_output_error"] <= full["rel_output_error"] * 1.01
