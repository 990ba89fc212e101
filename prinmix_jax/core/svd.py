"""Thin SVD of deltas, ``ΔW = U diag(σ) V`` with V's rows orthonormal (numpy's ``Vᵀ``).

Two SVDs with one layout (``U`` (m, k), ``σ`` (k,) descending, ``V`` (k, n)):

- :func:`thin_svd`: XLA's full thin SVD, every ``min(m, n)`` triplet.
- :func:`truncated_svd`: the top ``k`` triplets from a randomized range finder with subspace
  iterations (Halko, Martinsson & Tropp 2011, Alg. 4.4 and 5.1), built from matrix products and QR
  only, in float32. No allocation keeps more than ``k_max`` indices (:func:`~prinmix_jax.methods.shared.
  max_kept_rank`), so the methods ask for ``k_max`` plus a margin (:func:`~prinmix_jax.methods.shared.
  svd_rank`) and skip the 60–80% of the triplets a full SVD computes and throws away.

The one SVD path of the project: :func:`compress_stack <prinmix_jax.compress.compress_stack>` and
:func:`error_tables <prinmix_jax.compress.error_tables>` call :func:`svd_sharded`. Within
:func:`reusing_svds`, that path looks each matrix's SVD up in a store first (the global scope's two passes
compute it once; the store, which does the I/O, is the caller's).
"""
from __future__ import annotations

import contextlib
import contextvars
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from prinmix_jax.core.mesh import BATCH_AXIS, default_mesh, run_sharded

HIGHEST = jax.lax.Precision.HIGHEST

#: Fixed seed of the random test matrix: the truncated SVD of a given delta is the same on every call,
#: device count and batch position (the test matrix is shared by the whole batch).
SVD_SEED = 0


def _check_dtype(x):
    if x.dtype not in (jnp.float32, jnp.float64):
        raise ValueError(
            f"SVD needs float32 or float64 input, got {x.dtype}: XLA has no accurate low-precision SVD; "
            "upcast the delta first, e.g. delta.astype(jnp.float32)")


def thin_svd(delta):
    """``(U, σ, V)`` of one float32/float64 ``(m, n)`` delta: the traced function, not jitted.

    A wide delta (``m < n``, e.g. ``down_proj``) is decomposed as its transpose: XLA:CPU's SVD of a wide
    matrix takes several times as long as of the same matrix transposed."""
    if delta.shape[-2] < delta.shape[-1]:
        u, s, vt = jnp.linalg.svd(jnp.swapaxes(delta, -1, -2), full_matrices=False)
        return jnp.swapaxes(vt, -1, -2), s, jnp.swapaxes(u, -1, -2)
    return jnp.linalg.svd(delta, full_matrices=False)


def truncated_svd(delta, rank: int, *, oversample: int = 32, iters: int = 4, seed: int = SVD_SEED):
    """The top ``rank`` triplets ``(U (m, rank), σ (rank,), V (rank, n))`` of one delta: traced, not jitted.

    Randomized subspace iteration with ``l = min(min(m, n), rank + oversample)`` columns:

        Y = ΔW Ω                                    Ω (n, l) standard normal, fixed seed
        repeat iters:  Y = ΔW (ΔWᵀ lu_basis(Y))    (a cheap basis of span Y before every ΔW ΔWᵀ)
        Q = qr(Y);  Z R = qr(ΔWᵀ Q)   ⇒   Qᵀ ΔW = Rᵀ Zᵀ
        Rᵀ = Ũ S Ṽᵀ (an l×l SVD)   ⇒   U = Q Ũ,  σ = S,  V = Ṽᵀ Zᵀ      (Rayleigh–Ritz)

    and the first ``rank`` triplets are returned (the ``oversample`` extra ones are the least accurate).
    Costs ``2·(iters + 1)`` products of ``m·n·l``, ``iters`` LUs and 2 QRs of ``(m or n)×l`` and one l×l
    SVD; every product runs at ``Precision.HIGHEST`` (full float32 also on TPU). Between the products only
    the span of ``Y`` matters, so an LU basis (:func:`lu_basis`) replaces the Householder QR there (1.6x
    faster at 1024² on the CPU, the same σ to the printed digits); one normalisation per ``ΔW ΔWᵀ`` rather
    than one per product (HMT Alg. 4.4) in float32 only loses directions
    with ``σ < ~√ε·σ₁ ≈ 3e-4·σ₁``, which hold no energy an allocation keeps (the kept σ match the two-QR
    variant's to the printed digits on the benchmark deltas). The Ritz values are lower bounds of the σ
    and converge at rate ``(σ_{l+1}/σ_j)^{2·iters+1}``: the top ones are exact to float32, the ones near
    ``l`` in a flat noise bulk are not, which is why ``rank`` carries a margin over the indices that are
    kept (:func:`~prinmix_jax.methods.shared.svd_rank`). Deterministic: the test matrix comes from
    ``jax.random.PRNGKey(seed)`` and is shared by every matrix of a vmapped batch.

    ``rank`` and the settings must be Python ints (static); the result has exactly ``rank`` triplets
    (``rank ≤ min(m, n)``). Sign conventions of U, V can differ from :func:`thin_svd`'s.
    """
    m, n = delta.shape
    r = min(m, n)
    if not 1 <= rank <= r:
        raise ValueError(f"rank must be in 1..{r} for a {m}x{n} delta, got {rank}")
    l = min(r, rank + max(0, int(oversample)))
    a = delta
    omega = jax.random.normal(jax.random.PRNGKey(seed), (n, l), jnp.float32).astype(a.dtype)

    def at(x):   # ΔWᵀ x as (xᵀ ΔW)ᵀ: under vmap, XLA:CPU rounds a batched product with a transposed
        return jnp.matmul(x.T, a, precision=HIGHEST).T   # operand differently for different batch sizes

    q = jnp.matmul(a, omega, precision=HIGHEST)
    for _ in range(int(iters)):
        q = jnp.matmul(a, at(lu_basis(q)), precision=HIGHEST)
    q, _ = jnp.linalg.qr(q)
    z, rr = jnp.linalg.qr(at(q))
    ub, s, vbt = jnp.linalg.svd(rr.T, full_matrices=False)
    u = jnp.matmul(q, ub[:, :rank], precision=HIGHEST)
    v = jnp.matmul(z, vbt[:rank].T, precision=HIGHEST).T
    return u, s[:rank], v


def lu_basis(y):
    """A well-conditioned basis of the span of ``y``'s columns (m ≥ l): the unit lower-trapezoidal factor
    ``L`` of ``y = P L R`` (LU with partial pivoting, ``|L_ij| ≤ 1``), rows put back in ``y``'s order.

    Half the cost of a Householder QR (no ``Q`` to form) and enough between the products of a subspace
    iteration, where only the span matters (Halko, Martinsson & Tropp 2011, §4.5; fbpca's normalisation)."""
    lu, _, perm = jax.lax.linalg.lu(y)
    l = jnp.tril(lu, -1) + jnp.eye(*lu.shape, dtype=lu.dtype)
    return l[jnp.argsort(perm)]


@functools.cache
def truncated_svd_fn(rank: int, oversample: int, iters: int, seed: int = SVD_SEED):
    """:func:`truncated_svd` with its static settings bound: one long-lived function per setting, so
    :func:`~prinmix_jax.core.mesh.run_sharded` compiles it once per shape."""
    return functools.partial(truncated_svd, rank=int(rank), oversample=int(oversample), iters=int(iters),
                             seed=int(seed))


_svd = jax.jit(thin_svd)


@functools.partial(jax.jit, static_argnames=("rank", "oversample", "iters", "seed"))
def _truncated(delta, rank, oversample, iters, seed):
    fn = functools.partial(truncated_svd, rank=rank, oversample=oversample, iters=iters, seed=seed)
    return fn(delta) if delta.ndim == 2 else jax.vmap(fn)(delta)


def svd_delta(delta, rank: int | None = None, *, oversample: int = 32, iters: int = 4):
    """Thin SVD of one delta ``(m, n)`` or of a stack ``(batch, m, n)``.

    Args:
      delta: float32/float64 array; bf16/f16 is refused (upcast it yourself).
      rank: ``None``: the full thin SVD (:func:`thin_svd`); an int: the top ``rank`` triplets from
        :func:`truncated_svd` with ``oversample`` and ``iters``.

    Returns:
      ``(U, σ, V)`` with shapes ``(..., m, r)``, ``(..., r)``, ``(..., r, n)``, ``r = min(m, n)`` (or
      ``rank``), σ descending.
    """
    delta = jnp.asarray(delta)
    _check_dtype(delta)
    if rank is None:
        return _svd(delta)
    return _truncated(delta, int(rank), int(oversample), int(iters), SVD_SEED)


def svd_sharded(deltas, mesh: Mesh | None = None, axis: str = BATCH_AXIS, *, rank: int | None = None,
                oversample: int = 32, iters: int = 4):
    """SVD of a stack ``(batch, m, n)`` of same-shape deltas, spread over the devices of ``mesh``.

    One ``jax.jit``-compiled ``vmap`` of :func:`thin_svd` (``rank=None``) or of :func:`truncated_svd`
    (the top ``rank`` triplets, with ``oversample`` and ``iters``) with batch-sharded in/out shardings
    (:func:`~prinmix_jax.core.mesh.run_sharded`): the batch is padded to a multiple of the mesh size
    and the padding removed. Each matrix's result does not depend on the batch or the device count.

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
    fn = thin_svd if rank is None else truncated_svd_fn(rank, oversample, iters)
    return run_sharded(fn, default_mesh(mesh, axis), deltas, axis=axis)


_REUSE: contextvars.ContextVar = contextvars.ContextVar("prinmix_svd_reuse", default=None)


@contextlib.contextmanager
def reusing_svds(store, keys):
    """Within the ``with`` block, the stack SVDs (:func:`~prinmix_jax.methods.shared.stack_svd`) go through
    ``store`` (looked up, or computed and offered to it) under one key per matrix of the stack.

    Args:
      store: an object with ``stack_svd(keys, deltas, compute, settings) -> (U, σ, V)`` (e.g.
        :class:`~prinmix_jax.step_compress.SVDStore`), or ``None`` (the block then changes nothing).
      keys: one string per matrix of the stacks computed in the block (e.g. ``"3/q_proj"``).
    """
    token = _REUSE.set(None if store is None else (store, tuple(keys)))
    try:
        yield
    finally:
        _REUSE.reset(token)


def active_svd_reuse():
    """``(store, keys)`` set by the innermost :func:`reusing_svds`, or ``None``."""
    return _REUSE.get()


def svd_settings(rank: int | None = None, oversample: int = 32, iters: int = 4) -> str:
    """A short name of the SVD that :func:`svd_sharded` computes with these settings (part of a reuse key)."""
    return "full" if rank is None else f"r{int(rank)}-o{int(oversample)}-i{int(iters)}-s{SVD_SEED}"
