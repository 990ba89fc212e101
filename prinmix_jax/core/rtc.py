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


def inert_padding(a, valid):
    """Makes the entries ``~valid`` of a (k, k) Hessian inert padding.

    Their rows and columns become zero and their diagonal the mean diagonal of the valid
    entries: they are decoupled from the valid ones and leave ``mean(diag)``, and with it any
    relative damping, unchanged. Padding k to a few bucket sizes lets one compiled program
    serve matrices of many ranks.
    """
    if valid is None:
        return a
    vm = valid.astype(a.dtype)
    mu = jnp.sum(jnp.diag(a) * vm) / jnp.maximum(jnp.sum(vm), 1)
    return a * vm[:, None] * vm[None, :] + jnp.diag((1 - vm) * mu)


def _h_times(h, x):
    """``H x``, or ``x`` itself for ``h=None`` (the identity: exactly what the product would give)."""
    return x if h is None else jnp.matmul(h, x, precision=HIGHEST)


@jax.jit
def h_times_vt(h, v_hat):
    """``H V̂ᵀ`` (n, k), the one n×n product of the U step: :func:`rtc_target`, :func:`u_hessian`,
    :func:`refit_sigma` and the output error all take it (``hv``) in place of forming it again (k·n² each).
    ``h=None`` is the identity: ``V̂ᵀ`` itself."""
    return _h_times(h, v_hat.T)


@jax.jit
def u_hessian(v_hat, sigma, h, valid=None, hv=None):
    """``G = Σ V̂ H V̂ᵀ Σ`` (k, k): the Hessian of U's inputs ``Z = Σ V̂ X``.

    ``h=None`` is the identity (data-free): no n×n product. ``valid`` (k,) bool marks real indices; the
    others are made inert padding. ``hv``: ``H V̂ᵀ`` if already formed (:func:`h_times_vt`); ``h`` is then
    not used.
    """
    hv = _h_times(h, v_hat.T) if hv is None else hv
    m = jnp.matmul(v_hat, hv, precision=HIGHEST)
    return inert_padding(sigma[:, None] * m * sigma[None, :], valid)


@jax.jit
def rtc_target(delta, h, v_hat, sigma, damp=1e-4, valid=None, hv=None):
    """The corrected U target ``U*`` (m, k) and damping used.

    Args:
      delta: (m, n) the delta ΔW.
      h: (n, n) input Hessian, or ``None`` for the identity (data-free: ``H V̂ᵀ`` is ``V̂ᵀ``, no n×n
        product; the same bytes as an explicit identity).
      v_hat: (k, n) quantised rows of the kept indices.
      sigma: (k,) their singular values (all > 0).
      damp: λ' relative to ``mean(diag M)``; escalated if ``M`` is not positive definite.
      valid: optional (k,) bool mask of real indices (padding rows of ``v_hat`` are zero; their
        columns of ``U*`` come out zero).
      hv: ``H V̂ᵀ`` (n, k) if already formed (:func:`h_times_vt`); ``h`` is then not used.

    Returns:
      ``(U*, damp_used)``.
    """
    hv = _h_times(h, v_hat.T) if hv is None else hv                     # (n, k)
    m = jnp.matmul(v_hat, hv, precision=HIGHEST)
    p = jnp.matmul(delta, hv, precision=HIGHEST)                        # (m, k)
    r, d = inverse_cholesky_upper(inert_padding((m + m.T) / 2, valid), damp)                  # (M+λ'I)^{-1} = RᵀR
    ustar = jnp.matmul(jnp.matmul(p, r.T, precision=HIGHEST), r, precision=HIGHEST)
    return ustar / sigma[None, :], d


@jax.jit
def v_target(delta, u_hat, sigma, damp=1e-4, valid=None):
    """The re-fitted V target ``V*`` (k, n) given the quantised ``Û`` (alternating refinement, the mirror of
    :func:`rtc_target`; project choice) and the damping used.

    ``V*`` minimises ``‖(ΔW − Û Σ V) X‖²``. Its normal equations ``Σ ÛᵀÛ Σ V H = Σ Ûᵀ ΔW H`` are met by the
    least-squares solution ``Σ ÛᵀÛ Σ V = Σ Ûᵀ ΔW`` whatever ``H`` is, so no Hessian enters; computed in the
    well-scaled form ``V* = Σ⁻¹ (ÛᵀÛ + λ' I)⁻¹ Ûᵀ ΔW`` (damping relative to ``mean(diag ÛᵀÛ)``).

    Args:
      delta: (m, n) ΔW.
      u_hat: (m, k) the quantised U of the kept indices (padding columns zero).
      sigma: (k,) their σ (all > 0).
      damp: λ' relative to ``mean(diag ÛᵀÛ)``; escalated if not positive definite.
      valid: optional (k,) bool mask of real indices (padding rows of ``V*`` come out zero).

    Returns:
      ``(V*, damp_used)``.
    """
    m = jnp.matmul(u_hat.T, u_hat, precision=HIGHEST)                   # (k, k)
    p = jnp.matmul(u_hat.T, delta, precision=HIGHEST)                   # (k, n)
    r, d = inverse_cholesky_upper(inert_padding((m + m.T) / 2, valid), damp)   # (M+λ'I)^{-1} = RᵀR
    vstar = jnp.matmul(r.T, jnp.matmul(r, p, precision=HIGHEST), precision=HIGHEST)
    return vstar / sigma[:, None], d


@jax.jit
def refit_sigma(delta, h, u_hat, v_hat, sigma, valid=None, damp=1e-6, hv=None):
    """σ refitted to the quantised factors: the least-squares σ of ``‖ΔW X − Û diag(σ) V̂ X‖²``
    (project choice; one step of alternating refinement after RTC and GPTQ of U).

    With ``a_j = û_j`` and ``b_j = V̂_j X`` the error is a quadratic in σ,
    ``M σ = c`` with ``M = (ÛᵀÛ) ⊙ (V̂ H V̂ᵀ)`` and ``c_j = û_jᵀ ΔW H V̂_jᵀ``, solved with a small damping
    ``damp · mean(diag M)``. The result is kept only if its error is not larger than with ``sigma``
    (float rounding, a singular ``M``).

    Args:
      delta: (m, n) ΔW; h: (n, n) input Hessian, or ``None`` for the identity (data-free).
      u_hat: (m, k) and v_hat: (k, n) the quantised factors; sigma: (k,) the σ they were fitted with.
      valid: optional (k,) bool mask of real indices (padding keeps its σ).
      hv: ``H V̂ᵀ`` (n, k) if already formed (:func:`h_times_vt`); ``h`` is then not used.

    Returns:
      (k,) σ.
    """
    k = sigma.shape[0]
    valid = jnp.ones((k,), bool) if valid is None else valid
    hv = _h_times(h, v_hat.T) if hv is None else hv                                  # (n, k)
    m = jnp.matmul(u_hat.T, u_hat, precision=HIGHEST) * jnp.matmul(v_hat, hv, precision=HIGHEST)
    c = jnp.sum(u_hat * jnp.matmul(delta, hv, precision=HIGHEST), axis=0)
    both = valid[:, None] & valid[None, :]
    m = jnp.where(both, m, jnp.eye(k, dtype=m.dtype))
    c = jnp.where(valid, c, sigma)
    md = jnp.mean(jnp.where(valid, jnp.diag(m), 0)) * k / jnp.maximum(jnp.sum(valid), 1)
    s_new = jnp.linalg.solve(m + damp * jnp.where(md > 0, md, 1.0) * jnp.eye(k, dtype=m.dtype), c)
    s_new = jnp.where(valid, s_new, sigma)

    def err(s):   # ‖ΔW X − Û diag(s) V̂ X‖² / N up to the constant tr(ΔW H ΔWᵀ)
        return s @ m @ s - 2 * s @ c
    ok = jnp.all(jnp.isfinite(s_new)) & (err(s_new) <= err(sigma))
    return jnp.where(ok, s_new, sigma)
