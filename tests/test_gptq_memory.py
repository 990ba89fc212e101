"""GPTQ's calibrated set-up holds the Cholesky factor, not copies of H and of its inverse (core/gptq.py).

At n = 11008 (a Llama-2 down_proj input) an n×n float32 buffer is 485 MB. The set-up used to hold ~5.5 of
them at its peak (a damped reversed copy of H, the identity, the factor, its triangular inverse, a reversed
and a padded copy of that). Now the damped Hessian is built from ``h`` in one pass into the buffer the
factorisation overwrites (two n×n buffers while it runs: the CPU lowering of the Cholesky relays the factor
out once), and the rows of GPTQ's upper factor ``R`` are solved for a block at a time in the column loop,
which holds the factor alone. Checked from XLA's memory analysis of the compiled program (compile only), and
the pieces against a float64 NumPy transcription of the reference (``R = cholesky(inv(H))ᵀ``).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prinmix_jax.core.error_table import error_table
from prinmix_jax.core.gptq import gptq_quantize

N = 1024          # columns; the old set-up held ~5.5 N² float32 of scratch here
ROWS = 64         # few rows, so that the (rows × N) buffers of the column loop stay small next to N²


def _temp_over_n2(fn, *args, **kw):
    compiled = fn.lower(*args, **kw).compile()
    return compiled.memory_analysis().temp_size_in_bytes / (4 * N * N)


def _spec(*shape, dtype=jnp.float32):
    return jax.ShapeDtypeStruct(shape, dtype)


@pytest.mark.parametrize("mode,act,group,block", [("row", True, 128, 128), ("row", False, 128, 128),
                                                  ("col", True, 64, 128), ("row", True, 128, 32)])
def test_gptq_scratch_below_2_5_n2(mode, act, group, block):
    """Temp below 2.5 N²: 2 N² while factorising, then the factor and the loop's (rows × N), (block × N) buffers.
    Block 32: 32 blocks, the loop in four segments, each with its own leading triangle of the factor."""
    bits = _spec(ROWS if mode == "row" else N, dtype=jnp.int32)
    ratio = _temp_over_n2(gptq_quantize, _spec(ROWS, N), _spec(N, N), bits, 0.01, group_size=group,
                          act_order=act, scale_axis=mode, block_size=block)
    assert ratio < 2.5, f"GPTQ set-up scratch {ratio:.2f} N² (was ~5.5 N²)"


def test_error_table_shares_one_set_up():
    """The error table vmaps GPTQ over the widths with H shared: one set-up for all widths."""
    ratio = _temp_over_n2(error_table, _spec(ROWS, N), _spec(ROWS), _spec(N, N), 0.01, widths=(0, 2, 4, 8))
    assert ratio < 3.0, f"error table scratch {ratio:.2f} N² (was ~5.8 N²)"


def _reference_hessian(h, dead, perm, damp):
    """float64 NumPy: the reference GPTQ's damped Hessian (symmetrised, dead columns, act-order, damping)."""
    h = (h + h.T) / 2
    h[dead, dead] = 1.0
    h = h[perm][:, perm]
    return h + damp * np.mean(np.diag(h)) * np.eye(h.shape[0])


def test_upper_factor_rows_are_the_reference_factor():
    """Every block of rows, the last one partial and padded with the identity, is cholesky(inv(H))ᵀ's, to rounding."""
    from prinmix_jax.core.gptq import damped_reversed_cholesky, upper_factor_rows
    n, bsz = 70, 32
    cp = 3 * bsz
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, 3 * n)) * np.linspace(0.3, 2, n)[:, None]
    h = x @ x.T / (3 * n)
    h[9, :] = h[:, 9] = 0.0                                   # a dead column
    h[3, 5] += 1e-3                                           # not exactly symmetric: symmetrised
    dead = np.diag(h) == 0
    hd = np.diag(h) + dead
    perm = np.argsort(-hd, kind="stable")
    r_ref = np.eye(cp)
    r_ref[:n, :n] = np.linalg.cholesky(np.linalg.inv(_reference_hessian(h.copy(), dead, perm, 0.01))).T
    with jax.enable_x64(True):
        low, d = jax.jit(lambda h: damped_reversed_cholesky(h, 0.01, jnp.asarray(perm), jnp.asarray(dead)))(h)
        rows = jax.jit(lambda low, i1: upper_factor_rows(low, i1, bsz, cp))
        r = np.concatenate([np.asarray(rows(low, i1)) for i1 in range(0, cp, bsz)])
        # A later segment of the column loop: rows from ``start`` on, solved against L's leading triangle only
        # (columns left of ``start`` are zero in those rows and not returned).
        parts = []
        for start in (16, 40):
            tri = np.asarray(low)[: n - start, : n - start]
            seg = jax.jit(lambda low, i1, start=start: upper_factor_rows(low, i1, 8, cp, start))
            parts.append((start, [np.asarray(seg(tri, i1)) for i1 in range(start, cp, 8)]))
    assert float(d) == 0.01
    np.testing.assert_allclose(r, r_ref, rtol=0, atol=1e-12)
    for start, blocks in parts:
        np.testing.assert_allclose(np.concatenate(blocks), r_ref[start:, start:], rtol=0, atol=1e-12)


def test_batched_hessians_match_one_by_one():
    """vmap over matrices with their own Hessians (run_sharded's stacks), the damping escalated for one of them."""
    rng = np.random.default_rng(1)
    n = 48
    xs = rng.standard_normal((3, n, 2 * n)).astype(np.float32)
    hs = np.einsum("bik,bjk->bij", xs, xs) / (2 * n)
    hs[2] -= 3.0 * np.eye(n, dtype=np.float32)                # indefinite: the damping escalates for this one
    w = rng.standard_normal((3, 16, n)).astype(np.float32)
    bits = np.full((3, 16), 3)
    kw = {"group_size": 16, "act_order": True}
    batched = jax.vmap(lambda w, h, b: gptq_quantize(w, h, b, 0.01, **kw))(w, hs, bits)
    for i in range(3):
        one = gptq_quantize(w[i], hs[i], bits[i], 0.01, **kw)
        np.testing.assert_array_equal(np.asarray(batched.codes[i]), np.asarray(one.codes))
        np.testing.assert_allclose(np.asarray(batched.q[i]), np.asarray(one.q), rtol=0, atol=1e-6)
        assert float(batched.damp[i]) == float(one.damp)
    assert float(batched.damp[2]) > 0.01 and float(batched.damp[0]) == pytest.approx(0.01)
