"""Issue 12, below one bit: the least-squares grids (1-bit sign codes, symmetric 2-bit grids, shrunk ranges),
their stored form (format version 2, version 1 still read), σ refitting and the whitened SVD."""
import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from prinmix_jax import CompressionConfig, compress_matrix, gptq_quantize, rtn_quantize
from prinmix_jax.core.quantizer import GRIDS, HALF_ZERO_MAX_BITS
from prinmix_jax.core.rtc import refit_sigma
from prinmix_jax.methods.shared import output_error
from prinmix_jax.storage import decode_step, encode_step
from prinmix_jax.storage.format import MatrixEntry
from prinmix_jax.synthetic import long_tailed_delta


def _rows(seed=0):
    """Gaussian rows with an outlier, an all-zero group and a short last group (200 = 128 + 72)."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((8, 200)).astype(np.float32)
    w[0, :128] = 0
    w[1, 5] = 30
    w[2] *= 1e-3
    return w


def _err(w, deq):
    return ((w - np.asarray(deq)) ** 2).sum(axis=1)


def test_config_grid_names_match_the_quantizer():
    from prinmix_jax.config import GRIDS as CONFIG_GRIDS
    from prinmix_jax.config import INDEX_METADATA
    assert set(CONFIG_GRIDS) <= set(GRIDS)
    assert {CompressionConfig(grid=g, index_metadata=md).quant_grid for g in CONFIG_GRIDS
            for md in INDEX_METADATA} == set(GRIDS)
    # the widths the config stores without zero points are the quantizer's half-step (symmetric) ones
    assert CompressionConfig().zero_free_max_bits == HALF_ZERO_MAX_BITS
    with pytest.raises(ValueError, match="index_metadata"):
        CompressionConfig(index_metadata="tiny")
    with pytest.raises(ValueError, match="grid"):
        CompressionConfig(grid="lloyd")


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_mse_grid_never_worse_than_minmax(bits):
    w = _rows()
    out = {}
    for grid in ("minmax", "mse"):
        deq, codes, scale, zero = rtn_quantize(w, np.full(8, bits), 128, jnp.float16, grid)
        out[grid] = _err(w, deq)
        assert np.asarray(codes).max() <= 2 ** bits - 1
    assert np.all(out["mse"] <= out["minmax"] * (1 + 1e-6) + 1e-12)
    if bits <= 2:   # the symmetric grid: at least 40% less error on Gaussian rows
        assert out["mse"][3:].sum() < 0.6 * out["minmax"][3:].sum()


def test_one_bit_is_a_sign_code_with_the_least_squares_scale():
    rng = np.random.default_rng(3)
    w = rng.standard_normal((4, 256)).astype(np.float32)
    deq, codes, scale, zero = rtn_quantize(w, np.ones(4), 128, None, "mse")
    deq = np.asarray(deq)
    np.testing.assert_array_equal(np.asarray(codes), (w >= 0).astype(np.uint8))
    np.testing.assert_allclose(np.asarray(zero), 0.5)
    for g in range(2):
        part = w[:, g * 128:(g + 1) * 128]
        want = np.broadcast_to(np.abs(part).mean(1, keepdims=True), part.shape)
        np.testing.assert_allclose(np.abs(deq[:, g * 128:(g + 1) * 128]), want, rtol=1e-5)
    assert 1 - _err(w, deq).sum() / (w ** 2).sum() > 0.6        # min-max at 1 bit keeps about none of it


@pytest.mark.parametrize("mode,act", [("row", True), ("row", False), ("col", False), ("col", True)])
def test_gptq_with_scaled_identity_is_rtn_on_the_mse_grid(mode, act):
    rng = np.random.default_rng(4)
    w = rng.standard_normal((24, 40)).astype(np.float32)
    bits = rng.integers(1, 5, size=24 if mode == "row" else 40)
    res = gptq_quantize(jnp.asarray(w), 2.0 * jnp.eye(40), jnp.asarray(bits), 0.01, group_size=16,
                        act_order=act, scale_axis=mode, block_size=16, grid="mse")
    src = w if mode == "row" else w.T
    deq, codes, _, _ = rtn_quantize(jnp.asarray(src), jnp.asarray(bits), 16, None, "mse")
    if mode == "col":
        deq, codes = deq.T, codes.T
    np.testing.assert_array_equal(np.asarray(res.codes), np.asarray(codes))
    np.testing.assert_allclose(np.asarray(res.q), np.asarray(deq), rtol=1e-6, atol=1e-7)


def _stored(grid, seed=7):
    d, h = long_tailed_delta(96, 160, seed=seed)
    cfg = CompressionConfig(ratio=1 / 24, bits=(0, 1, 2, 3, 8), grid=grid, group_size=64)
    cm, info = compress_matrix(d, h, cfg, return_info=True)
    return d, h, cfg, cm, info


def test_stored_factors_reproduce_the_quantised_values():
    """Half-step zero points (widths 1, 2) survive storage: the rebuilt delta has the error the
    compressor measured from its own (unpacked) factors."""
    d, h, cfg, cm, info = _stored("mse")
    assert set(np.asarray(cm.widths).tolist()) & {1, 2}
    halves = [np.asarray(z) for z, b in zip(cm.v_zero, cm.group_bits) if b <= HALF_ZERO_MAX_BITS]
    assert any((z % 2 == 1).any() for z in halves)          # symmetric grids were chosen and stored
    assert abs(output_error(d, np.asarray(cm.reconstruct()), h) - info["rel_output_error"]) < 1e-4
    assert cm.nbytes <= cfg.budget_bits(96, 160) // 8


def test_format_1_zero_points_are_upgraded_on_read():
    """A version-1 step stores the integer zero points of the min-max grid; read as version 1 it rebuilds
    the same delta, read as version 2 (half steps) it would not."""
    *_, cm, _ = _stored("minmax")
    assert any(b <= HALF_ZERO_MAX_BITS for b in cm.group_bits)
    v1 = dataclasses.replace(cm, v_zero=tuple(np.asarray(z) // (2 if b <= 2 else 1) for z, b in zip(cm.v_zero, cm.group_bits)),
                             u_zero=tuple(np.asarray(z) // (2 if b <= 2 else 1) for z, b in zip(cm.u_zero, cm.group_bits)))
    arrays, meta = encode_step({"q_proj": MatrixEntry(v1, {})}, {})
    want = np.asarray(cm.reconstruct())
    np.testing.assert_array_equal(np.asarray(decode_step(arrays, meta, version=1).linears["q_proj"].reconstruct()), want)
    assert not np.allclose(np.asarray(decode_step(arrays, meta).linears["q_proj"].reconstruct()), want)


def test_refit_sigma_is_the_least_squares_sigma():
    rng = np.random.default_rng(5)
    m, n, k, t = 30, 40, 6, 200
    x = rng.standard_normal((n, t)) * np.linspace(0.2, 2, n)[:, None]
    h = (x @ x.T / t).astype(np.float32)
    d = rng.standard_normal((m, n)).astype(np.float32)
    u = rng.standard_normal((m, k)).astype(np.float32)
    v = rng.standard_normal((k, n)).astype(np.float32)
    s0 = np.ones(k, np.float32)
    s = np.asarray(refit_sigma(d, h, u, v, s0, None, 0.0))
    cols = np.stack([np.outer(u[:, j], v[j] @ x).ravel() for j in range(k)], 1)
    want = np.linalg.lstsq(cols, (d @ x).ravel(), rcond=None)[0]
    np.testing.assert_allclose(s, want, rtol=2e-3)
    valid = np.arange(k) < 4
    s_pad = np.asarray(refit_sigma(d, h, u, v, s0, valid, 0.0))
    np.testing.assert_array_equal(s_pad[4:], 1.0)


def test_refit_sigma_lowers_the_output_error():
    d, h = long_tailed_delta(128, 192, seed=9)
    errs = {}
    for refit in (False, True):
        cfg = CompressionConfig(ratio=1 / 32, refit_sigma=refit)
        errs[refit] = compress_matrix(d, h, cfg, return_info=True)[1]["rel_output_error"]
    assert errs[True] <= errs[False] + 1e-6


def test_whitened_svd_orders_indices_by_output_error():
    """With an anisotropic Hessian the whitened SVD's top indices approximate the layer output better at one
    budget; data-free it is the plain SVD (same bytes)."""
    rng = np.random.default_rng(2)
    d, _ = long_tailed_delta(128, 160, seed=2, decay=0.3)
    x = rng.standard_normal((160, 600)) * np.geomspace(0.05, 5, 160)[:, None]
    h = (x @ x.T / 600).astype(np.float32)
    out = {}
    for whiten in (False, True):
        cfg = CompressionConfig(ratio=1 / 32, whiten=whiten)
        out[whiten] = compress_matrix(d, h, cfg, return_info=True)[1]["rel_output_error"]
    assert out[True] < out[False]
    a = compress_matrix(d, None, CompressionConfig(ratio=1 / 32, whiten=True))
    b = compress_matrix(d, None, CompressionConfig(ratio=1 / 32, whiten=False))
    np.testing.assert_array_equal(np.asarray(a.reconstruct()), np.asarray(b.reconstruct()))


@pytest.mark.parametrize("ratio", [1 / 32, 1 / 64])
def test_new_default_beats_the_old_one_and_stays_in_budget(ratio):
    d, h = long_tailed_delta(192, 256, seed=12)
    old = CompressionConfig(ratio=ratio, grid="minmax", bits=(0, 2, 3, 4, 8))
    new = CompressionConfig(ratio=ratio)
    res = {}
    for name, cfg in (("old", old), ("new", new)):
        cm, info = compress_matrix(d, h, cfg, return_info=True)
        assert cm.nbytes <= cfg.budget_bits(192, 256) // 8
        res[name] = info["rel_output_error"]
    dc = compress_matrix(d, h, new, "deltacome", return_info=True)[1]["rel_output_error"]
    assert res["new"] < res["old"] < dc


def test_least_squares_grid_search_holds_one_candidate_at_a_time():
    """The 39 candidate grids are tried one after the other: the compiled program's scratch memory stays a
    few times its input (all candidates at once took ~40x: 20 GB for a 7B embedding's U in the U-side
    estimate, which killed a 1-layer Llama-2-shaped run)."""
    import jax
    import jax.numpy as jnp

    from prinmix_jax.core.quantizer import MSE_STEPS, grid_params, rtn_quantize

    x = jax.ShapeDtypeStruct((512, 32, 128), jnp.float32)
    ratio = jax.jit(lambda w: grid_params(w, 3, None, None, "mse")).lower(x).compile().memory_analysis()
    assert ratio.temp_size_in_bytes < 6 * 512 * 32 * 128 * 4 < len(MSE_STEPS) * 512 * 32 * 128 * 4
    w = jax.ShapeDtypeStruct((256, 4096), jnp.float32)
    rtn = jax.jit(lambda a: rtn_quantize(a, jnp.full((256,), 2), 128, None, "mse")[0])
    assert rtn.lower(w).compile().memory_analysis().temp_size_in_bytes < 6 * 256 * 4096 * 4
