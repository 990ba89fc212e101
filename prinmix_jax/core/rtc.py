"""Reconstruction Target Correction (method.md §4).

With ``V̂`` quantised and the surviving indices ``K``, the U factor is re-fitted to the *true*
target ``ΔW X`` given the inputs ``Z = Σ_K V̂ X`` that U sees:

    G  = Σ_K V̂ H V̂ᵀ Σ_K
    U* = ΔW H V̂ᵀ Σ_K (G + λ I)^{-1}

Computed here in the well-scaled form ``U* = ΔW H V̂ᵀ (M + λ' I)^{-1} Σ_K^{-1}`` with
``M = V̂ H V̂ᵀ`` (rows of V̂ have near-unit norm, so damping relative to ``mean(diag M)`` does
not shrink the columns of small-σ indices, as damping ``G`` directly would).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from prinmix_jax.core.gptq import HIGHEST, inverse_cholesky_upper


@jax.jit
def u_hessian(v_hat, sigma, h):
    """``G = Σ V̂ H V̂ᵀ Σ`` (k, k): the Hessian of U's inputs ``Z = Σ V̂ X``."""
    m = jnp.matmul(jnp.matmul(v_hat, h, precision=HIGHEST), v_hat.T, precision=HIGHEST)
    return sigma[:, None] * m * sigma[None, :]


@jax.jit
def rtc_target(delta, h, v_hat, sigma, damp=1e-4):
    """The corrected U target ``U*`` (m, k) and damping used.

    Args:
      delta: (m, n) the delta ΔW.
      h: (n, n) input Hessian.
      v_hat: (k, n) quantised rows of the kept indices.
      sigma: (k,) their singular values (all > 0).
      damp: λ' relative to ``mean(diag M)``; escalated if ``M`` is not positive definite.

    Returns:
      ``(U*, damp_used)``.
    """
    hv = jnp.matmul(h, v_hat.T, precision=HIGHEST)                      # (n, k)
    m = jnp.matmul(v_hat, hv, precision=HIGHEST)
    p = jnp.matmul(delta, hv, precision=HIGHEST)                        # (m, k)
    r, d = inverse_cholesky_upper((m + m.T) / 2, damp)                  # (M+λ'I)^{-1} = RᵀR
    ustar = jnp.matmul(jnp.matmul(p, r.T, precision=HIGHEST), r, precision=HIGHEST)
    return ustar / sigma[None, :], d
