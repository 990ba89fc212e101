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
