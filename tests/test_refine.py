"""Alternating refinement (``CompressionConfig.refine_rounds``, issue 12): after RTC and GPTQ of U, V is
re-fitted by least squares to ``Û Σ`` (``rtc.v_target``), quantised again, and U follows by RTC and GPTQ.
Oracles: the float64 least-squares solution and its normal equations under H; the round that is kept never
has a larger output error than the single pass; the stored factors are the refined ones."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from prinmix_jax import CompressionConfig, compress_matrix, from_state, to_state
from prinmix_jax.core.rtc import v_target
from prinmix_jax.synthetic import long_tailed_delta


def _factors(m=40, n=24, k=6, seed=0):
    rng = np.random.default_rng(seed)
    d = rng.standard_normal((m, n))
    u = np.sign(rng.standard_normal((m, k))) * 0.2          # a 1-bit-like Û: far from orthogonal columns
    s = np.sort(rng.uniform(0.5, 3.0, k))[::-1]
    x = rng.standard_normal((n, 3 * n)) * rng.uniform(0.1, 2.0, (n, 1))
    return d, u, s, x @ x.T / x.shape[1]


def test_v_target_is_the_least_squares_fit_and_meets_the_normal_equations_under_h():
    d, u, s, h = _factors()
    got, _ = v_target(jnp.asarray(d, jnp.float32), jnp.asarray(u, jnp.float32), jnp.asarray(s, jnp.float32),
                      0.0)
    want = np.linalg.lstsq(u * s, d, rcond=None)[0]
    np.testing.assert_allclose(np.asarray(got), want, rtol=2e-4, atol=2e-5)
    a = u * s                                               # Σ Ûᵀ (ΔW − Û Σ V*) H = 0 for any H
    grad = a.T @ (d - a @ np.asarray(got, np.float64)) @ h
    assert np.abs(grad).max() < 1e-4 * np.abs(a.T @ d @ h).max()
    # V* beats small perturbations of itself under H
    err = lambda v: np.trace((d - a @ v) @ h @ (d - a @ v).T)   # noqa: E731
    rng = np.random.default_rng(1)
    assert all(err(np.asarray(got) + 1e-2 * rng.standard_normal(want.shape)) > err(np.asarray(got)) for _ in range(5))


def test_v_target_padding_is_inert():
    d, u, s, _ = _factors()
    k, kb = u.shape[1], u.shape[1] + 3
    up = np.pad(u, ((0, 0), (0, 3)))
    sp = np.concatenate([s, np.ones(3)])
    valid = np.arange(kb) < k
    got, _ = v_target(*(jnp.asarray(a, jnp.float32) for a in (d, up, sp)), 1e-4, jnp.asarray(valid))
    ref, _ = v_target(*(jnp.asarray(a, jnp.float32) for a in (d, u, s)), 1e-4)
    np.testing.assert_allclose(np.asarray(got)[:k], np.asarray(ref), rtol=1e-5, atol=1e-6)
    assert not np.any(np.asarray(got)[k:])


# Tall and wide (the SVD of the transpose), each shape compiling its own programs; a square case (128 x 128 at
# 1/16) took the tall path again.
@pytest.mark.parametrize("shape,ratio", [((192, 96), 1 / 32), ((96, 256), 1 / 64)])
def test_refinement_lowers_the_output_error_at_the_same_bytes(shape, ratio):
    d, h = long_tailed_delta(*shape, seed=sum(shape), tokens=2 * max(shape))
    errs, sizes = [], []
    for rounds in (0, 1, 2):
        cm, info = compress_matrix(d, h, CompressionConfig(ratio=ratio, refine_rounds=rounds), return_info=True)
        e = np.asarray(d, np.float64) - np.asarray(cm.reconstruct(), np.float64)
        hh, dd = np.asarray(h, np.float64), np.asarray(d, np.float64)
        true = np.sqrt(np.trace(e @ hh @ e.T) / np.trace(dd @ hh @ dd.T))
        assert info["rel_output_error"] == pytest.approx(true, rel=1e-3)   # the stored factors are the refined ones
        errs.append(true)
        sizes.append(cm.nbytes)
        back = from_state(*to_state(cm))
        np.testing.assert_array_equal(np.asarray(back.reconstruct()), np.asarray(cm.reconstruct()))
    assert sizes[0] == sizes[1] == sizes[2] <= ratio * 2 * shape[0] * shape[1]
    assert errs[1] < 0.99 * errs[0] and errs[2] <= errs[1]


def test_refinement_is_kept_only_when_it_helps_and_skips_methods_without_rtc():
    """More rounds never raise the error: the best round is kept, and it is the factors of that round. On
    this matrix a second round is worse than the first, so keeping the last round instead would show."""
    d, h = long_tailed_delta(192, 96, seed=288, tokens=384)
    err, kept = [], []
    for rounds in range(4):
        _, info = compress_matrix(d, h, CompressionConfig(ratio=1 / 32, refine_rounds=rounds), return_info=True)
        err.append(info["rel_output_error"])
        kept.append(info.get("refine_rounds_kept", 0))
    assert all(b <= a for a, b in zip(err, err[1:])) and err[-1] < err[0], err
    assert all(0 <= k <= n and err[n] == err[k] for n, k in enumerate(kept)), (err, kept)
    base = compress_matrix(d, h, CompressionConfig(ratio=1 / 32), method="deltacome")
    again = compress_matrix(d, h, CompressionConfig(ratio=1 / 32, refine_rounds=2), method="deltacome")
    np.testing.assert_array_equal(np.asarray(again.reconstruct()), np.asarray(base.reconstruct()))


@pytest.mark.parametrize("bad", [-1, 1.5, True, "2"])
def test_refine_rounds_must_be_a_non_negative_integer(bad):
    with pytest.raises(ValueError, match="refine_rounds"):
        CompressionConfig(refine_rounds=bad)
