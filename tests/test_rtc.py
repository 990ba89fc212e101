"""Reconstruction Target Correction (method.md §4)."""
import jax.numpy as jnp
import numpy as np

from prinmix_jax import CompressionConfig, compress_matrix, gptq_quantize, output_error, rtc_target, svd_delta
from prinmix_jax.synthetic import long_tailed_delta


def test_corrected_target_is_the_least_squares_optimum():
    """Before U is quantised, U* fits ΔW X at least as well as U_K, and no perturbation does better."""
    for seed in range(4):
        d, h = long_tailed_delta(40, 64, seed=seed)
        u, s, v = svd_delta(jnp.asarray(d))
        k = 12
        v_hat = gptq_quantize(v[:k], jnp.asarray(h), jnp.full((k,), 2), 0.01, group_size=16).q
        ustar, _ = rtc_target(jnp.asarray(d), jnp.asarray(h), v_hat, s[:k], 1e-6)

        def err(a):
            return output_error(d, np.asarray(a) @ (np.asarray(s[:k])[:, None] * np.asarray(v_hat)), h)

        e_star, e_plain = err(ustar), err(u[:, :k])
        assert e_star <= e_plain
        rng = np.random.default_rng(seed)
        for _ in range(3):
            assert e_star <= err(np.asarray(ustar) + 1e-3 * rng.standard_normal(ustar.shape)) + 1e-7


def test_rtc_never_hurts_end_to_end_and_helps_on_average():
    gains = []
    for seed in range(5):
        d, h = long_tailed_delta(64, 96, seed=10 + seed)
        cfg = CompressionConfig(group_size=32)
        _, with_rtc = compress_matrix(d, h, cfg, return_info=True)
        _, without = compress_matrix(d, h, CompressionConfig(group_size=32, rtc=False), return_info=True)
        assert with_rtc["rel_output_error"] <= without["rel_output_error"] + 1e-6
        gains.append(without["rel_output_error"] - with_rtc["rel_output_error"])
    assert np.mean(gains) > 0.005


def _u_step_inputs(m=48, n=80, k=16, seed=0):
    d, h = long_tailed_delta(m, n, seed=seed)
    u, s, v = (np.asarray(a) for a in svd_delta(jnp.asarray(d)))
    v_hat = np.asarray(gptq_quantize(v[:k], jnp.asarray(h), jnp.full((k,), 3), 0.01, group_size=16).q)
    return d, h, u[:, :k], s[:k], v_hat


def test_u_step_takes_h_times_vt_formed_once():
    """RTC, U's Hessian and the σ refit given ``H V̂ᵀ`` (formed once per V̂, ``h_times_vt``) give what they
    give when they form it themselves, up to float32 rounding; the product is the float64 ``H V̂ᵀ``."""
    from prinmix_jax.core.rtc import h_times_vt, refit_sigma, u_hessian

    d, h, u, s, v_hat = _u_step_inputs()
    valid = np.arange(len(s)) < len(s) - 3
    hv = h_times_vt(h, v_hat)
    np.testing.assert_allclose(hv, h.astype(np.float64) @ v_hat.T.astype(np.float64), rtol=1e-5, atol=1e-6)
    for a, b in ((rtc_target(d, h, v_hat, s, 1e-4, valid)[0], rtc_target(d, h, v_hat, s, 1e-4, valid, hv=hv)[0]),
                 (u_hessian(v_hat, s, h, valid), u_hessian(v_hat, s, h, valid, hv=hv)),
                 (refit_sigma(d, h, u, v_hat, s, valid), refit_sigma(d, h, u, v_hat, s, valid, hv=hv))):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6 * float(np.abs(a).max()))


def test_output_error_from_shared_products_matches_float64():
    """The output error's terms from ``ΔW H`` and ``H V̂ᵀ`` (no m·n² product of its own) match a float64
    transcription of ``tr(E H Eᵀ)`` and ``tr(ΔW H ΔWᵀ)``, also when the error is small (squared, 1e-6 of
    ΔW's: expanding ``tr(E H Eᵀ)`` as ``den − 2·cross + quad`` in float32 misses it by ~90% there)."""
    from prinmix_jax.core.rtc import h_times_vt
    from prinmix_jax.methods.shared import _factored_error_terms, delta_times_h

    m, n = 48, 80
    d, h = long_tailed_delta(m, n, seed=2)
    rng = np.random.default_rng(2)
    u, s, v = (np.asarray(a, np.float64) for a in np.linalg.svd(d.astype(np.float64), full_matrices=False))
    k = min(m, n)                            # every index kept: the error is V̂'s alone
    for rel in (0.3, 1e-3):                  # its size relative to ΔW (squared error ~1e-1 and ~1e-6)
        v_q = (v[:k] + rel * rng.standard_normal((k, n)) / np.sqrt(n)).astype(np.float32)
        u_q, s32 = u[:, :k].astype(np.float32), s[:k].astype(np.float32)
        e = d.astype(np.float64) - (u_q * s32).astype(np.float64) @ v_q.astype(np.float64)
        h64 = h.astype(np.float64)
        want = np.trace(e @ h64 @ e.T), np.trace(d.astype(np.float64) @ h64 @ d.T.astype(np.float64))
        got = _factored_error_terms(d, u_q, s32, v_q, h, delta_times_h(d, h), h_times_vt(h, v_q))
        direct = _factored_error_terms(d, u_q, s32, v_q, h)
        for g in (got, direct):
            np.testing.assert_allclose(float(g[1]), want[1], rtol=1e-5)
            np.testing.assert_allclose(float(g[0]), want[0], rtol=1e-3 if rel < 0.01 else 1e-5)
