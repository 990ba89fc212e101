"""Data-free compression runs GPTQ of V under the identity Hessian as round-to-nearest (``h=None``).

Oracles: GPTQ with an explicit identity Hessian (its error feedback is exactly zero there), byte for byte;
the whole data-free path against the same matrices with explicit identity Hessians; XLA's memory analysis
for the n×n scratch that is no longer there.
"""
import numpy as np
import pytest
import jax
import jax.numpy as jnp

from prinmix_jax import CompressionConfig, compress_stack, error_table, gptq_quantize
from prinmix_jax.synthetic import long_tailed_delta

WIDTHS = (0, 1, 2, 3, 4)


def _v(k, n, seed=0):
    rng = np.random.default_rng(seed)
    v = rng.standard_normal((k, n)).astype(np.float32) / np.sqrt(n)
    v[:, ::7] *= 4.0                                        # outliers, so grids differ between groups
    return jnp.asarray(v)


@pytest.mark.parametrize("grid", ["minmax", "mse"])
@pytest.mark.parametrize("axis,act,group", [("row", True, 16), ("row", False, 40), ("col", True, 16),
                                            ("col", False, 24)])
def test_identity_gptq_is_gptq_under_the_identity(grid, axis, act, group):
    w = _v(24, 80, seed=1)
    n_bits = w.shape[0] if axis == "row" else w.shape[1]
    bits = jnp.asarray(np.random.default_rng(2).integers(1, 5, n_bits))
    h = jnp.eye(w.shape[1], dtype=jnp.float32)
    kw = dict(group_size=group, act_order=act, scale_axis=axis, grid=grid, scale_dtype=jnp.float16)
    ref = gptq_quantize(w, h, bits, 0.01, **kw)
    got = gptq_quantize(w, None, bits, 0.01, **kw)
    assert got.codes.shape == ref.codes.shape and got.scale.shape == ref.scale.shape
    static = axis == "col" or act
    if static:      # scales fixed up front: the same program of the grid, the same bytes
        for a, b in zip(got, ref):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    else:           # row groups fixed "when reached" are computed by another program: float rounding only
        np.testing.assert_allclose(np.asarray(got.q), np.asarray(ref.q), rtol=0, atol=2e-3 * float(jnp.abs(w).max()))
        assert np.mean(np.asarray(got.codes) == np.asarray(ref.codes)) > 0.99
    # and it is round-to-nearest: not better than GPTQ under a real (correlated) Hessian on that Hessian
    x = np.random.default_rng(3).standard_normal((w.shape[1], 400)).astype(np.float32)
    x[1:] += 0.9 * x[:-1]
    hc = jnp.asarray(x @ x.T / 400)
    gq = gptq_quantize(w, hc, bits, 0.01, **kw)
    err = lambda q: float(jnp.trace((w - q) @ hc @ (w - q).T))              # noqa: E731
    assert err(gq.q) < err(got.q)


def test_identity_error_table_equals_the_explicit_identity():
    v = _v(40, 96)
    s = jnp.asarray(np.linspace(3.0, 0.1, 40), jnp.float32)
    kw = dict(widths=WIDTHS, group_size=32, grid="mse")
    e_ref, p_ref = error_table(v, s, jnp.eye(96, dtype=jnp.float32), 0.01, **kw)
    e, p = error_table(v, s, None, 0.01, **kw)
    np.testing.assert_allclose(np.asarray(e), np.asarray(e_ref), rtol=1e-6, atol=0)
    for a, b in zip(p, p_ref):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_identity_error_table_holds_no_square_scratch():
    """XLA's memory analysis: GPTQ's set-up of an n×n Hessian holds several n² floats; the identity path none."""
    k, n = 16, 1024
    v, s = _v(k, n), jnp.ones((k,), jnp.float32)
    kw = dict(widths=(0, 2, 3), group_size=128)
    temp = lambda h: error_table.lower(v, s, h, 0.01, **kw).compile().memory_analysis().temp_size_in_bytes  # noqa
    square = n * n * 4
    with_h = temp(jnp.eye(n, dtype=jnp.float32))
    without = temp(None)
    assert with_h >= 2 * square
    assert without < square / 4, (without, with_h)


@pytest.mark.parametrize("method,extra", [("prinmix", {}), ("deltacome", {}), ("prinmix", {"refine_rounds": 1}),
                                          ("prinmix", {"refit_sigma": True})])
def test_data_free_stack_equals_explicit_identity_hessians(method, extra):
    """Every data-free step (the V passes, RTC, U's Hessian, refinement, the output error) takes the identity
    as ``None`` without forming it, and gives the bytes an explicit identity gives. The σ refit's products
    with ``V̂ᵀ`` round in the last bits (its least-squares σ to ~1e-6); every other array stays byte-identical."""
    ds = [long_tailed_delta(64, 112, seed=s, tokens=16)[0] for s in range(2)]
    eye = np.eye(112, dtype=np.float32)
    cfg = CompressionConfig(group_size=16, ratio=1 / 8, **extra)
    free = compress_stack(ds, None, cfg, method, return_info=True)
    ident = compress_stack(ds, [eye, eye], cfg, method, return_info=True)
    for (a, ia), (b, ib) in zip(free, ident):
        for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
            if cfg.refit_sigma and jax.tree_util.keystr(path).startswith(".sigma"):
                np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5)
            else:
                np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
        assert ia["rel_output_error"] == pytest.approx(ib["rel_output_error"], rel=1e-5)
