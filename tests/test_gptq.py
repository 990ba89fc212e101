import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptq_reference import gptq_reference
from prinmix_jax import gptq_quantize, rtn_quantize


def _data(rows, cols, seed=0, tokens=256):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((rows, cols))
    x = rng.standard_normal((cols, cols)) @ rng.standard_normal((cols, tokens)) * np.linspace(0.3, 2, cols)[:, None]
    return w, x @ x.T / tokens


CASES = [("row", None, False), ("row", 16, False), ("row", 16, True), ("col", 8, False), ("col", 8, True)]


@pytest.mark.parametrize("mode,group,act", CASES)
def test_identity_hessian_is_round_to_nearest(mode, group, act):
    rng = np.random.default_rng(1)
    w = rng.standard_normal((24, 40)).astype(np.float32)
    bits = rng.integers(1, 9, size=24 if mode == "row" else 40)
    res = gptq_quantize(jnp.asarray(w), 3.0 * jnp.eye(40), jnp.asarray(bits), 0.01,
                        group_size=group, act_order=act, scale_axis=mode, block_size=16)
    if mode == "row":
        deq, codes, _, _ = rtn_quantize(jnp.asarray(w), jnp.asarray(bits), group)
    else:
        deq, codes, _, _ = rtn_quantize(jnp.asarray(w.T), jnp.asarray(bits), group)
        deq, codes = deq.T, codes.T
    np.testing.assert_array_equal(np.asarray(res.codes), np.asarray(codes))
    # Same codes; the dequantised values may differ in the last ulp where XLA fuses the
    # scale division differently in the two programs.
    np.testing.assert_allclose(np.asarray(res.q), np.asarray(deq), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("mode,group,act", CASES)
@pytest.mark.parametrize("block_size", [32, 4])                 # 3 blocks: one loop; 18 blocks: 4 segments
def test_matches_float64_numpy_reference(mode, group, act, block_size):
    w, h = _data(20, 70, seed=2)
    rng = np.random.default_rng(3)
    bits = rng.integers(2, 5, size=20 if mode == "row" else 70)
    q_ref, c_ref = gptq_reference(w, h, bits, group, act, 0.01, mode)
    with jax.enable_x64(True):
        res = gptq_quantize(jnp.asarray(w), jnp.asarray(h), jnp.asarray(bits), 0.01, group_size=group,
                            act_order=act, scale_axis=mode, block_size=block_size)
        q, c = np.asarray(res.q), np.asarray(res.codes)
    np.testing.assert_array_equal(c, c_ref)
    np.testing.assert_allclose(q, q_ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("mode,group,act", CASES)
def test_result_does_not_depend_on_block_size(mode, group, act):
    w, h = _data(16, 96, seed=4)
    bits = np.full(16 if mode == "row" else 96, 3)
    outs = []
    with jax.enable_x64(True):
        for bs in (8, 32, 96, 128, 4):          # 4: 24 blocks in 4 segments (core.gptq_setup.loop_segments)
            res = gptq_quantize(jnp.asarray(w), jnp.asarray(h), jnp.asarray(bits), 0.01, group_size=group,
                                act_order=act, scale_axis=mode, block_size=bs)
            outs.append(np.asarray(res.codes))
    for o in outs[1:]:
        np.testing.assert_array_equal(o, outs[0])


@pytest.mark.parametrize("group,act", [(None, False), (16, True)])
def test_output_error_below_rtn(group, act):
    w, h = _data(32, 64, seed=5)
    w, h = w.astype(np.float32), h.astype(np.float32)
    for b in (2, 3, 4):
        bits = jnp.full((32,), b)
        res = gptq_quantize(jnp.asarray(w), jnp.asarray(h), bits, 0.01, group_size=group, act_order=act)
        rtn = np.asarray(rtn_quantize(jnp.asarray(w), bits, group)[0])
        err = lambda q: np.trace((w - q) @ h @ (w - q).T)
        assert err(np.asarray(res.q)) < 0.9 * err(rtn)


def test_not_positive_definite_hessian_escalates_damping():
    rng = np.random.default_rng(6)
    w = rng.standard_normal((8, 32)).astype(np.float32)
    x = rng.standard_normal((32, 4))               # rank 4 of 32: singular H
    h = (x @ x.T / 4).astype(np.float32)
    h_neg = h - 2.0 * np.eye(32, dtype=np.float32)   # indefinite
    for hh in (h, h_neg):
        res = gptq_quantize(jnp.asarray(w), jnp.asarray(hh), jnp.full((8,), 3), 0.0, group_size=16)
        assert np.all(np.isfinite(np.asarray(res.q)))
        assert float(res.damp) > 0.0                   # escalated from the requested 0
    ok = gptq_quantize(jnp.asarray(w), jnp.asarray(h + np.eye(32, dtype=np.float32)), jnp.full((8,), 3), 0.01)
    assert float(ok.damp) == pytest.approx(0.01)       # a PD Hessian keeps the requested damping


def test_dead_columns_are_zero():
    w, h = _data(8, 32, seed=7)
    h[5, :] = h[:, 5] = 0.0
    res = gptq_quantize(jnp.asarray(w, jnp.float32), jnp.asarray(h, jnp.float32), jnp.full((8,), 4), 0.01,
                        group_size=8, act_order=True)
    assert np.all(np.asarray(res.q)[:, 5] == 0)
    assert np.all(np.isfinite(np.asarray(res.q)))


def test_program_size_does_not_grow_with_columns():
    """The column loop is a fori_loop: the compiled program is the same size for 64 and 1024 columns, and for
    2048 and 16384 (from 16 blocks on, four segments of the loop: core.gptq_setup.loop_segments)."""
    def hlo_len(cols):
        w = jax.ShapeDtypeStruct((16, cols), jnp.float32)
        h = jax.ShapeDtypeStruct((cols, cols), jnp.float32)
        b = jax.ShapeDtypeStruct((16,), jnp.int32)
        return len(gptq_quantize.lower(w, h, b, 0.01, group_size=32, act_order=True).as_text())
    small, large = hlo_len(64), hlo_len(1024)
    assert large < 1.2 * small
    seg_small, seg_large = hlo_len(2048), hlo_len(16384)
    assert seg_large < 1.2 * seg_small
    assert seg_small < 4.5 * small


def _row_errors64(w, q, h):
    e = np.asarray(w, np.float64) - np.asarray(q, np.float64)
    return np.einsum("ij,jk,ik->i", e, np.asarray(h, np.float64), e)


@pytest.mark.parametrize("group,act,grid", [(None, False, "minmax"), (16, False, "mse-sym"), (16, True, "mse-sym")])
def test_row_errors_from_the_pass_are_the_hessian_norms(group, act, grid):
    """gptq_quantize_with_error: the same result as gptq_quantize, and every row's ``(w − ŵ) H (w − ŵ)ᵀ`` from
    the pass's own errors. In float64 it is the product to 1e-9 (an identity, whatever the rounding): with a
    dead column (which a symmetric grid rounds away from 0), with damping escalated on an indefinite Hessian,
    with 70 columns in blocks of 32 (padding); in float32, within 1e-3 of the float64 product on a
    rank-deficient Hessian, as the product in float32 is."""
    from prinmix_jax.core.gptq import gptq_quantize_with_error

    w, h = _data(20, 70, seed=8, tokens=24)                          # rank 24 of 70
    h[7, :] = h[:, 7] = 0.0                                          # a dead column
    bits = np.random.default_rng(9).integers(1, 9, size=20)
    kw = dict(group_size=group, act_order=act, block_size=32, grid=grid)
    with jax.enable_x64(True):
        for hh, damp in ((h, 0.01), (h - 0.05 * np.trace(h) / 70 * np.eye(70), 0.0)):
            res, err = gptq_quantize_with_error(jnp.asarray(w), jnp.asarray(hh), jnp.asarray(bits), damp, **kw)
            ref = gptq_quantize(jnp.asarray(w), jnp.asarray(hh), jnp.asarray(bits), damp, scale_axis="row", **kw)
            assert all(np.array_equal(a, b) for a, b in zip(res, ref))
            assert damp > 0 or float(res.damp) > 0                     # escalated on the indefinite one
            np.testing.assert_allclose(np.asarray(err), _row_errors64(w, res.q, hh), rtol=1e-9)
    w32, h32 = w.astype(np.float32), h.astype(np.float32)
    res, err = gptq_quantize_with_error(jnp.asarray(w32), jnp.asarray(h32), jnp.asarray(bits), 0.01, **kw)
    ref = gptq_quantize(jnp.asarray(w32), jnp.asarray(h32), jnp.asarray(bits), 0.01, scale_axis="row", **kw)
    assert all(np.array_equal(a, b) for a, b in zip(res, ref))
    np.testing.assert_allclose(np.asarray(err), _row_errors64(w32, res.q, h32), rtol=1e-3)
    res, err = gptq_quantize_with_error(jnp.asarray(w32), None, jnp.asarray(bits), 0.01, **kw)   # identity
    np.testing.assert_allclose(np.asarray(err), _row_errors64(w32, res.q, np.eye(70)), rtol=1e-5)


def test_row_groups_fixed_as_reached_need_no_conditional():
    """Row-mode groups fixed as they are reached (act-order off) take their grid at each group's first column
    in a loop over groups, not through a ``lax.cond`` per column: on a GPU a conditional reads its predicate
    back to the host at every column. The compiled program (constant conditionals folded) holds none. The
    reference equality of these settings is tested above."""
    w = jax.ShapeDtypeStruct((6, 70), jnp.float32)
    h = jax.ShapeDtypeStruct((70, 70), jnp.float32)
    b = jax.ShapeDtypeStruct((6,), jnp.int32)
    for group, act in ((16, False), (5, False), (16, True)):
        text = jax.jit(lambda w, h, b: gptq_quantize(w, h, b, 0.01, group_size=group, act_order=act,
                                                     block_size=32)).lower(w, h, b).compile().as_text()
        assert " while(" in text                                          # the column loop itself
        assert " conditional(" not in text, (group, act)
