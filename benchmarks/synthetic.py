"""Synthetic long-tailed deltas with correlated calibration Hessians (tests and benchmarks)."""
from __future__ import annotations

import numpy as np


def long_tailed_delta(m: int, n: int, *, seed: int = 0, decay: float = 1.0, noise: float = 0.15,
                      tokens: int = 2048, return_x: bool = False):
    """A delta with singular values ``~ i^{-decay}`` plus dense noise, and a Hessian ``X Xᵀ / N``
    from inputs with a decaying spectrum and a non-zero mean (a correlated, non-identity H).

    ``noise`` is the energy of the dense Gaussian noise relative to that of the long-tailed part,
    so the spectrum keeps its shape at every size.

    Returns:
      ``(delta (m, n) float32, hessian (n, n) float32)`` and ``X`` (n, N) if ``return_x``.
    """
    rng = np.random.default_rng(seed)
    r = min(m, n)
    u, _ = np.linalg.qr(rng.standard_normal((m, r)))
    v, _ = np.linalg.qr(rng.standard_normal((n, r)))
    s = np.arange(1, r + 1, dtype=np.float64) ** -decay
    std = np.sqrt(noise * np.sum(s ** 2) / (m * n))
    delta = (u * s) @ v.T + std * rng.standard_normal((m, n))
    mix = rng.standard_normal((n, n)) * (np.arange(1, n + 1) ** -0.5)[None, :]
    x = mix @ rng.standard_normal((n, tokens)) + 0.3 * rng.standard_normal((n, 1))
    h = x @ x.T / tokens
    out = (delta.astype(np.float32), h.astype(np.float32))
    return out + (x,) if return_x else out
