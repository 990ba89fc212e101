"""Thin SVD of deltas, ``ΔW = U diag(σ) V`` with V's rows orthonormal (numpy's ``Vᵀ``).

The one SVD path of the project: :func:`compress_stack <prinmix_jax.compress.compress_stack>` and
:func:`error_tables <prinmix_jax.compress.error_tables>` call :func:`svd_sharded`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from prinmix_jax.core.mesh import BATCH_AXIS, default_mesh, run_sharded


def _check_dtype(x):
    if x.dtype not in (jnp.float32, jnp.float64):
        raise ValueError(
            f"SVD needs float32 or float64 input, got {x.dtype}: XLA has no accurate low-precision SVD; "
            "upcast the delta first, e.g. delta.astype(jnp.float32)")


def thin_svd(delta):
    """``(U, σ, V)`` of one float32/float64 ``(m, n)`` delta: the traced function, not jitted."""
    return jnp.linalg.svd(delta, full_matrices=False)


_svd = jax.jit(thin_svd)


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


def svd_sharded(deltas, mesh: Mesh | None = None, axis: str = BATCH_AXIS):
    """SVD of a stack ``(batch, m, n)`` of same-shape deltas, spread over the devices of ``mesh``.

    One ``jax.jit``-compiled ``vmap`` of :func:`thin_svd` with batch-sharded in/out shardings
    (:func:`~prinmix_jax.core.mesh.run_sharded`): the batch is padded to a multiple of the mesh size
    and the padding removed.

    Args:
      deltas: float32/float64 array (batch, m, n); bf16/f16 is refused. A numpy array goes to the
        devices shard by shard.
      mesh: a 1-D mesh; default all devices.
      axis: the mesh axis name.

    Returns:
      ``(U, σ, V)`` for the unpadded batch: on the mesh, or on the host (numpy) when it was padded.
    """
    deltas = deltas if isinstance(deltas, (np.ndarray, jax.Array)) else jnp.asarray(deltas)
    _check_dtype(deltas)
    if deltas.ndim != 3:
        raise ValueError(f"svd_sharded expects (batch, m, n), got shape {deltas.shape}")
    return run_sharded(thin_svd, default_mesh(mesh, axis), deltas, axis=axis)
