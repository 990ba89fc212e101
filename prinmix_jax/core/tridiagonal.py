"""The symmetric eigenproblem pieces of the CPU Gram SVD (:func:`~prinmix_jax.core.svd.cpu_gram_svd`): half the
Gram matrix on the devices (:func:`gram_upper`), LAPACK's Householder reduction and tridiagonal eigenvectors
on the host (:func:`tridiagonal_eigenvectors`), and the back-transform of only the kept eigenvectors as
matrix products (:func:`apply_householder`, :func:`back_transform`). Pure array maths: no meshes, no I/O."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg

from prinmix_jax.core.numerics import HIGHEST, contract

#: :func:`gram_upper` computes the Gram matrix in this many row blocks (the strictly lower ones skipped):
#: (b + 1) / (2 b) of the full product's work.
GRAM_BLOCKS = 4


def gram_upper(delta, side: int, blocks: int = GRAM_BLOCKS):
    """``G = Σ_side ΔW ΔW`` (n×n) with only its upper block triangle computed (zeros below): read as a
    Fortran array (``G.T``, no copy) it is the lower triangle LAPACK's symmetric routines read. ``blocks``
    row blocks, each one product contracting axis ``side`` in place; 62.5% of the full product's
    multiply-adds at 4 blocks."""
    n = delta.shape[1 - side]
    step = -(-n // max(1, int(blocks)))
    rows = []
    for start in range(0, n, step):
        stop = min(n, start + step)
        block = jax.lax.slice_in_dim(delta, start, stop, axis=1 - side)
        right = jax.lax.slice_in_dim(delta, start, n, axis=1 - side)
        rows.append(jnp.pad(contract(block, right, side, side), ((0, 0), (start, 0))))
    return jnp.concatenate(rows, axis=0)


def tridiagonal_eigenvectors(g, rank: int):
    """Host step of :func:`cpu_gram_svd`: the symmetric ``g`` (n, n; its upper triangle is read, as
    :func:`gram_upper` fills it) reduced and its tridiagonal part solved in SciPy's LAPACK (the one jaxlib's
    CPU kernels call):

        g = Q T Qᵀ          (``sytrd``: Householder reduction, Q = diag(1, Q') kept as reflectors)
        T = Z Λ Zᵀ          (``stevd``: divide and conquer, all n eigenvectors of T; ~0.15 s at n = 4096)

    ``g``'s upper triangle in C order is the lower triangle of the Fortran array ``g.T``, which LAPACK
    reduces in place: no transposing copy (0.13 s at n = 4096). The eigenvectors of a dense bulk of
    near-equal eigenvalues come out orthogonal to rounding, as ``syevd``'s do (inverse iteration on ``T``
    lost directions there: docs/method.md).

    Args:
      g: float32/float64 (n, n), symmetric in its upper triangle (a writable C-order array is overwritten).
      rank: how many eigenvectors of ``T`` to keep, ``1..n``.

    Returns:
      ``(reflectors (n, n), τ (n-1,), Z_k (n, rank))`` in ``g``'s dtype: LAPACK's reflectors transposed
      (row ``i`` holds ``v_{i}`` right of the diagonal) and the eigenvectors of the ``rank`` largest
      eigenvalues of ``T``, largest first; the eigenvectors of ``g`` are
      ``back_transform(reflectors, τ, Z_k)``.
    """
    g = np.asarray(g)
    if not (g.flags.c_contiguous and g.flags.writeable):
        g = np.array(g, order="C")
    sytrd, sytrd_lwork = scipy.linalg.lapack.get_lapack_funcs(("sytrd", "sytrd_lwork"), (g,))
    work, info = sytrd_lwork(g.shape[0], lower=1)
    lwork = max(1, int(work)) if info == 0 else max(1, 64 * g.shape[0])
    c, d, e, tau, info = sytrd(g.T, lower=1, lwork=lwork, overwrite_a=1)
    if info != 0:
        raise np.linalg.LinAlgError(f"LAPACK sytrd failed (info {info})")
    return c.T, tau, _tridiagonal_top(d, e, rank)


def _tridiagonal_top(d, e, rank: int) -> np.ndarray:
    """(n, rank): the eigenvectors of the ``rank`` largest eigenvalues of the tridiagonal (d, e), largest
    first (LAPACK ``stevd``; NumPy's ``eigh`` of the dense matrix in float64 should ``stevd`` report a
    failure)."""
    d, e = np.asarray(d), np.asarray(e)
    (stevd,) = scipy.linalg.lapack.get_lapack_funcs(("stevd",), (d,))
    _, z, info = stevd(d, e, compute_v=1)
    if info != 0:
        t = np.diag(d.astype(np.float64)) + np.diag(e.astype(np.float64), 1) + np.diag(e.astype(np.float64), -1)
        z = np.linalg.eigh(t)[1]
    return np.ascontiguousarray(z[:, ::-1][:, :rank], dtype=d.dtype)


#: Reflectors per block in :func:`apply_householder`.
HOUSEHOLDER_BLOCK = 256


def apply_householder(ht, taus, x, block: int = HOUSEHOLDER_BLOCK):
    """``Q @ x`` for ``Q = H_0 H_1 … H_{p-1}``, the Householder reflectors ``H_i = I − τ_i v_i v_iᵀ`` as
    LAPACK stores them, transposed: ``v_i`` right of the diagonal of row ``i`` of ``ht`` (p, r), unit at ``i``
    (the rows of a C-order array are the columns of the Fortran array LAPACK wrote).

    Blocks of ``block`` reflectors, last block first, each applied as one compact-WY update
    ``x ← x − V T (Vᵀ x)`` with ``T⁻¹ = diag(1/τ) + striu(VᵀV)`` (the UT transform): matrix products rather
    than LAPACK ``ormqr``'s narrow blocks. A reflector with ``τ = 0`` is the identity and is left out.

    References:
      Joffrain, Low, Quintana-Ortí, van de Geijn & Van Zee (2006), "Accumulating Householder
      transformations, revisited", ACM TOMS 32(2).
    """
    p, r = ht.shape
    x = jnp.asarray(x)
    for start in reversed(range(0, p, block)):
        stop = min(p, start + block)
        t = taus[start:stop]
        vt = jnp.triu(ht[start:stop, start:], 1) + jnp.eye(stop - start, r - start, dtype=ht.dtype)   # Vᵀ
        vt = jnp.where(t[:, None] == 0, 0, vt)
        t_inv = jnp.triu(contract(vt, vt, 1, 1), 1) + jnp.diag(jnp.where(t == 0, 1, 1 / jnp.where(t == 0, 1, t)))
        t_mat = jax.lax.linalg.triangular_solve(t_inv, jnp.eye(stop - start, dtype=ht.dtype), left_side=True,
                                                lower=False)
        z = jnp.matmul(t_mat, contract(vt, x[start:], 1, 0), precision=HIGHEST)
        x = x.at[start:].add(-contract(vt, z, 0, 0))
    return x


def back_transform(refl_t, taus, z):
    """(n, rank): the eigenvectors of ``g`` from :func:`tridiagonal_eigenvectors`' ``(reflectors, τ, Z_k)``:
    ``Q Z_k`` with ``Q = diag(1, Q')``, the reflectors applied to the kept columns only (traced)."""
    return jnp.concatenate([z[:1], apply_householder(refl_t[:-1, 1:], taus, z[1:])], axis=0)
