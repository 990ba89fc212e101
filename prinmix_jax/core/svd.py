"""Thin SVD of deltas, ``ΔW = U diag(σ) V`` with V's rows orthonormal (numpy's ``Vᵀ``)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


def _check_dtype(x):
    if x.dtype not in (jnp.float32, jnp.float64):
        raise ValueError(
            f"SVD needs float32 or float64 input, got {x.dtype}: XLA has no accurate low-precision SVD; "
            "upcast the delta first, e.g. delta.astype(jnp.float32)")


@jax.jit
def _svd(delta):
    u, s, v = jnp.linalg.svd(delta, full_matrices=False)
    return u, s, v


def svd_delta(delta):
    """Thin SVD of one delta ``(m, n)`` or of a stack ``(batch, m, n)``.

    Args:
      delta: float32/float64 array; bf16/f16 is refused (upcast it yourself).

    Returns:
      ``(U, σ, V)`` with shapes ``(..., m, r)``, ``(..., r)``, ``(..., r, n)``, ``r = min(m, n)``,
      σ descending.
    """
    delta = jnp.asarray(delta)
    _check_dtype(delta)
    return _svd(delta)


def svd_sharded(deltas, mesh: Mesh | None = None, axis: str = "batch"):
    """SVD of a stack ``(batch, m, n)`` of same-shape deltas, spread over the devices of ``mesh``.

    The batch is padded with zero matrices to a multiple of the mesh size (SVD only shards
    over the batch axis), computed under ``jax.jit`` with batch-sharded in/out shardings, and
    the padding is removed.

    Args:
      deltas: float32/float64 array (batch, m, n).
      mesh: a 1-D mesh; default all devices.
      axis: the mesh axis name.

    Returns:
      ``(U, σ, V)`` for the unpadded batch.
    """
    deltas = jnp.asarray(deltas)
    _check_dtype(deltas)
    if deltas.ndim != 3:
        raise ValueError(f"svd_sharded expects (batch, m, n), got shape {deltas.shape}")
    if mesh is None:
        mesh = Mesh(np.asarray(jax.devices()), (axis,))
    ndev = mesh.shape[axis]
    b = deltas.shape[0]
    pad = (-b) % ndev
    if pad:
        deltas = jnp.concatenate([deltas, jnp.zeros((pad,) + deltas.shape[1:], deltas.dtype)])
    sh = NamedSharding(mesh, P(axis))
    fn = jax.jit(lambda d: jnp.linalg.svd(d, full_matrices=False), in_shardings=sh,
                 out_shardings=(sh, sh, sh))
    u, s, v = fn(jax.device_put(deltas, sh))
    return u[:b], s[:b], v[:b]
