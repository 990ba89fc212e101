"""The error table is exact: its entries are the directly measured V-step errors (method.md §1–2)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prinmix_jax import error_table, gptq_quantize, svd_delta
from prinmix_jax.core.error_table import select_rows, select_rows_from_codes
from prinmix_jax.synthetic import long_tailed_delta

WIDTHS = (0, 2, 3, 4, 8)


def _setup(m=48, n=80, seed=0):
    d, _, x = long_tailed_delta(m, n, seed=seed, tokens=400, return_x=True)
    x = x.astype(np.float32)
    h = (x @ x.T / x.shape[1]).astype(np.float32)
    u, s, v = svd_delta(jnp.asarray(d))
    return np.asarray(u, np.float64), np.asarray(s, np.float64), v, h, x.astype(np.float64)


def _v_step_error(u, s, v, v_hat, x):
    """‖U Σ V X − U Σ V̂ X‖² / N computed from the activations themselves."""
    diff = (u * s) @ (np.asarray(v, np.float64) - v_hat) @ x
    return np.sum(diff ** 2) / x.shape[1]


def test_entries_equal_directly_measured_v_step_error():
    u, s, v, h, x = _setup()
    e, passes = error_table(v, jnp.asarray(s, jnp.float32), jnp.asarray(h), 0.01, widths=WIDTHS, group_size=16)
    e = np.asarray(e, np.float64)
    v64 = np.asarray(v, np.float64)
    r = s.shape[0]
    rng = np.random.default_rng(0)
    for i in rng.choice(r, 6, replace=False):               # one row changed, every width
        for j, b in enumerate(WIDTHS):
            v_hat = v64.copy()
            v_hat[i] = 0.0 if b == 0 else np.asarray(passes.q[WIDTHS[1:].index(b), i])
            np.testing.assert_allclose(_v_step_error(u, s, v, v_hat, x), e[i, j], rtol=2e-3, atol=1e-9)


def test_mixed_allocation_error_is_the_sum_of_its_entries():
    """Rows are independent: a GPTQ run with mixed per-row widths has error Σ e[i, b_i]."""
    u, s, v, h, x = _setup(seed=1)
    e, passes = error_table(v, jnp.asarray(s, jnp.float32), jnp.asarray(h), 0.01, widths=WIDTHS, group_size=16)
    e = np.asarray(e, np.float64)
    r = s.shape[0]
    widths = np.random.default_rng(1).choice(WIDTHS[1:], r)
    mixed = gptq_quantize(v, jnp.asarray(h), jnp.asarray(widths), 0.01, group_size=16, act_order=True)
    sel = select_rows(passes, WIDTHS, np.arange(r), widths)
    np.testing.assert_allclose(np.asarray(mixed.q), np.asarray(sel.q), rtol=0, atol=1e-6)
    measured = _v_step_error(u, s, v, np.asarray(mixed.q, np.float64), x)
    table = e[np.arange(r), [WIDTHS.index(b) for b in widths]].sum()
    np.testing.assert_allclose(measured, table, rtol=2e-3)


def test_more_bits_never_more_error_on_average():
    _, s, v, h, _ = _setup(seed=2)
    e = np.asarray(error_table(v, jnp.asarray(s, jnp.float32), jnp.asarray(h), 0.01, widths=WIDTHS,
                               group_size=16)[0])
    totals = e.sum(0)
    assert np.all(np.diff(totals) < 0)


def test_u_error_estimate_is_the_measured_error_of_quantising_one_u_column():
    """For one index, quantising u_i alone (RTN, storage layout) costs σ_i² ‖δu_i‖² V_i H V_iᵀ exactly."""
    from prinmix_jax import rtn_quantize
    from prinmix_jax.core.error_table import u_error_estimate

    u, s, v, h, x = _setup(seed=3)
    e = np.asarray(error_table(v, jnp.asarray(s, jnp.float32), jnp.asarray(h), 0.01, widths=WIDTHS,
                               group_size=16)[0], np.float64)
    est = np.asarray(u_error_estimate(jnp.asarray(u, jnp.float32), jnp.asarray(e[:, 0], jnp.float32),
                                      widths=WIDTHS, group_size=16), np.float64)
    assert np.all(est[:, 0] == 0)
    v64 = np.asarray(v, np.float64)
    for i in (0, 3, 10):
        for j, b in enumerate(WIDTHS[1:], start=1):
            uq = np.asarray(rtn_quantize(jnp.asarray(u[:, i:i + 1].T, jnp.float32), jnp.full((1,), b), 16)[0])[0]
            diff = np.outer(u[:, i] - uq, s[i] * v64[i]) @ x
            np.testing.assert_allclose(np.sum(diff ** 2) / x.shape[1], est[i, j], rtol=2e-3)


def test_u_error_estimate_of_a_tall_u_works_in_chunks_with_the_same_numbers(monkeypatch):
    """An embedding-like tall U: the columns go through in chunks (bounded scratch, read from XLA's memory
    analysis), with the numbers of quantising every column at once. The chunk is scaled down 64x with U
    (2500 x 200 against 4M / 64 entries a chunk: 8 chunks of 25 columns, as 40000 x 800 has 8 of 100 at the
    real size), so the scratch compares the same way at 1/64 of the work."""
    from prinmix_jax import rtn_quantize
    from prinmix_jax.core import error_table as et

    monkeypatch.setattr(et, "U_ERROR_CHUNK", et.U_ERROR_CHUNK // 64)   # read when the program is traced
    m, r, widths = 2500, 200, (0, 1, 2, 4)
    u = jnp.asarray(np.random.default_rng(5).standard_normal((m, r)), jnp.float32) / np.sqrt(m)
    d0 = jnp.asarray(np.linspace(2.0, 0.1, r), jnp.float32)
    kw = dict(widths=widths, group_size=128, grid="mse")
    assert et.U_ERROR_CHUNK // m < r                                    # more than one chunk
    got = np.asarray(et.u_error_estimate(u, d0, **kw))
    ut = u.T
    for j, b in enumerate(widths):
        want = np.zeros(r) if b == 0 else np.asarray(
            jnp.sum((ut - rtn_quantize(ut, jnp.full((r,), b), 128, None, "mse")[0]) ** 2, axis=1) * d0)
        np.testing.assert_allclose(got[:, j], want, rtol=1e-5, atol=0)
    temp = et.u_error_estimate.lower(u, d0, **kw).compile().memory_analysis().temp_size_in_bytes
    assert temp < 4 * u.nbytes, (temp, u.nbytes)          # all columns at once: ~15x


def test_allocation_tables_add_the_u_estimate_of_the_table_own_drop_errors():
    """allocation_tables adds to the V-step table the U-side estimate scaled by the table's own column of
    width 0 (σ_i² V_i H V_iᵀ), the same as the estimate forming that column again, for a stack of two
    matrices with their own Hessians and with the identity (data-free)."""
    from prinmix_jax.config import CompressionConfig
    from prinmix_jax.core.mesh import single_device_mesh
    from prinmix_jax.methods.prinmix import _u_error_tables, allocation_tables

    cfg = CompressionConfig(group_size=16)
    parts = [_setup(seed=s) for s in (4, 5)]
    u, s, v = (np.stack([np.asarray(p[i], np.float32) for p in parts]) for i in range(3))
    for h_all in (np.stack([p[3] for p in parts]), None):
        tables, _ = allocation_tables(u, s, v, h_all, cfg, single_device_mesh())
        plain = allocation_tables(u, s, v, h_all, CompressionConfig(group_size=16, u_error=False),
                                  single_device_mesh())[0]
        want = _u_error_tables(u, s, v, h_all, cfg)                 # forms σ² V H Vᵀ itself
        assert np.abs(want).max() > 0
        np.testing.assert_allclose(tables - plain, want, rtol=1e-5, atol=1e-7 * np.abs(want).max())


@pytest.mark.parametrize("group,act,grid,scale_dtype", [(16, True, "minmax", None), (16, False, "mse", jnp.float16),
                                                         (None, False, "mse-sym", jnp.float16)])
def test_rows_rebuilt_from_kept_codes_are_the_v_step_at_those_widths(group, act, grid, scale_dtype):
    """The global scope's second pass takes its V rows from the table's passes kept without ``q``
    (select_rows_from_codes): the same bytes as the GPTQ pass at the chosen per-row widths it replaces."""
    _, s, v, h, _ = _setup()
    kw = dict(group_size=group, act_order=act, grid=grid, scale_dtype=scale_dtype)
    _, passes = error_table(v, jnp.asarray(s, jnp.float32), jnp.asarray(h), 0.01, widths=WIDTHS, **kw)
    r = s.shape[0]
    widths = np.random.default_rng(1).choice(WIDTHS, r)
    direct = gptq_quantize(v, jnp.asarray(h), jnp.asarray(np.maximum(widths, 1)), 0.01, scale_axis="row", **kw)
    keep = np.nonzero(widths > 0)[0]
    passes = jax.tree.map(np.asarray, passes)
    sel = select_rows_from_codes(passes.codes, passes.scale, passes.zero, passes.damp, WIDTHS, keep, widths[keep],
                                 group)
    for got, want in zip(sel[:4], direct[:4]):
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(got, np.asarray(want)[keep])
    np.testing.assert_array_equal(sel.damp, np.full(keep.size, np.asarray(direct.damp)))
