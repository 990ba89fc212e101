"""Thin SVD of deltas, ``ΔW = U diag(σ) V`` with V's rows orthonormal (numpy's ``Vᵀ``).

Three SVDs with one layout (``U`` (m, k), ``σ`` (k,) descending, ``V`` (k, n)):

- :func:`thin_svd`: XLA's full thin SVD, every ``min(m, n)`` triplet.
- :func:`gram_svd`: the top ``k`` triplets from the eigenvectors of the Gram matrix ``ΔWᵀΔW`` of the
  smaller side, made exact for ``ΔW`` by a Rayleigh–Ritz step on ``ΔW`` itself. No allocation keeps more
  than ``k_max`` indices (:func:`~prinmix_jax.methods.shared.max_kept_rank`), so the methods ask for
  ``k_max`` plus a margin (:func:`~prinmix_jax.methods.shared.svd_rank`) and skip the 60–80% of the
  triplets a full SVD computes and throws away. The default wherever it pays. On the CPU it runs in
  three stages (:func:`cpu_gram_svd`: the Gram product on the devices, LAPACK on the host, then only the
  kept eigenvectors back-transformed on the devices).
- :func:`truncated_svd`: the top ``k`` triplets from a randomized range finder with subspace
  iterations (Halko, Martinsson & Tropp 2011, Alg. 4.4 and 5.1), built from matrix products, LU and QR
  only, in float32: an option (slower and less accurate than :func:`gram_svd` on the CPU, docs/method.md).

The one SVD path of the project: :func:`compress_stack <prinmix_jax.compress.compress_stack>` and
:func:`error_tables <prinmix_jax.compress.error_tables>` call :func:`svd_sharded`. Within
:func:`reusing_svds`, that path looks each matrix's SVD up in a store first (the global scope's two passes
compute it once; the store, which does the I/O, is the caller's). On several devices the pipeline starts a
block's stacks' SVDs together beforehand (:func:`prefetch_svds`, each stack on devices of its own), and that
path takes them (:func:`using_prefetched_svds`). Before the first SVD on an accelerator,
:func:`~prinmix_jax.core.numerics.check_float32_products` checks that its float32 products are float32.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from prinmix_jax.core.mesh import BATCH_AXIS, default_mesh, run_sharded, single_device_mesh, sub_mesh
from prinmix_jax.core.numerics import HIGHEST, check_float32_products
from prinmix_jax.core.numerics import contract as _contract
from prinmix_jax.core.tridiagonal import apply_householder, back_transform, gram_upper, tridiagonal_eigenvectors

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


def gram_svd(delta, rank: int):
    """The top ``rank`` triplets ``(U (m, rank), σ (rank,), V (rank, n))`` of one delta: traced, not jitted.

    With ``A`` the delta in its tall orientation (``m ≥ n``; a wide delta is decomposed as its transpose):

        G = AᵀA (n×n);  G = W Λ Wᵀ (eigh)  ⇒  W_k: the eigenvectors of the top ``rank`` eigenvalues
        B = A W_k;  B = Q R (QR);  R = Ũ S Ṽᵀ (a rank×rank SVD)       (Rayleigh–Ritz on A)
        U = Q Ũ,  σ = S,  V = Ṽᵀ W_kᵀ

    Squaring ``A`` in float32 perturbs ``G`` by about ``ε·σ₁²``, which mixes eigenvectors whose eigenvalues
    lie that close. The Rayleigh–Ritz step on ``A`` (not the eigenvalues of ``G``) keeps σ accurate to about
    ``c·ε·√n·(σ₁/σ)²`` (``c`` measured 0.01–0.08): fine on long-tailed and fine-tuning deltas, not on steep
    spectra, which :func:`svd_delta` and :func:`svd_sharded` send to the full SVD
    (:data:`GRAM_MAX_ERROR_ESTIMATE`). ``U`` and ``V`` are orthonormal to float32 rounding. Costs one
    ``m·n²`` product, an n×n ``eigh``, an ``m·n·rank`` product, a QR of ``m×rank`` and a ``rank×rank`` SVD.
    On TPU, ``eigh`` is matrix-product based (QDWH).

    This is one program, what GPUs and TPUs run. On the CPU, :func:`svd_delta` and :func:`svd_sharded` take
    the same steps in three stages instead (:func:`cpu_gram_svd`), computing only the ``rank`` eigenvectors
    kept: 3.2x faster than XLA's full SVD at 4096² (docs/benchmarks.md).

    ``rank`` must be a Python int in ``1..min(m, n)``. Sign conventions of U, V can differ from
    :func:`thin_svd`'s.
    """
    side = _check_rank(delta.shape, rank)
    return rayleigh_ritz(delta, _eigh_top(_scaled(delta), side, rank), side)


def _check_rank(shape, rank: int) -> int:
    """The axis ``side`` of a delta of ``shape`` that its (smaller) Gram matrix contracts; ``rank`` checked."""
    m, n = shape[-2:]
    if not 1 <= rank <= min(m, n):
        raise ValueError(f"rank must be in 1..{min(m, n)} for a {m}x{n} delta, got {rank}")
    return 1 if m < n else 0                       # work on the smaller Gram matrix: ΔWΔWᵀ for a wide delta


def _scaled(delta):
    """``delta`` scaled by a power of two to ``|ΔW| < 1``: exact, the same eigenvectors of the Gram matrix, and
    no overflow or underflow in it (a delta of 1e-30 would square to zero in float32)."""
    _, exponent = jnp.frexp(jnp.max(jnp.abs(delta)))
    return delta * jnp.ldexp(jnp.ones((), delta.dtype), -exponent)


def rayleigh_ritz(delta, w_k, side: int, implicit_q: bool = False):
    """``(U, σ, V)`` of ``delta`` on the span of ``w_k`` (its top right singular vectors in the tall
    orientation; left ones for a wide delta, ``side = 1``): ``B = A W_k = Q R``, ``R = Ũ S Ṽᵀ``.

    ``implicit_q``: ``Q Ũ`` as the QR's reflectors applied to ``[Ũ; 0]`` (:func:`apply_householder`, matrix
    products) rather than ``Q`` formed, then multiplied (LAPACK ``orgqr``, then a product): the same
    product to rounding, 0.2 s less at 4096² with k = 1202 on the CPU."""
    # Every product contracts the shared axis in place (dot_general), never through a transposed operand:
    # XLA:CPU rounds a product with a transposed operand differently under a vmap of batch 1 than unbatched.
    wide = side == 1
    b = _contract(delta, w_k, 0, 0) if wide else jnp.matmul(delta, w_k, precision=HIGHEST)
    if implicit_q:
        k = b.shape[1]
        ht, taus = jnp.linalg.qr(b, mode="raw")    # the reflectors as rows, R in the upper triangle of ht.T
        ub, s, vbt = jnp.linalg.svd(jnp.triu(ht[:, :k].T), full_matrices=False)
        qu = apply_householder(ht, taus, jnp.pad(ub, ((0, b.shape[0] - k), (0, 0))))
        if wide:
            return _contract(w_k, vbt, 1, 1), s, qu.T
        return qu, s, _contract(vbt, w_k, 1, 1)
    q, rr = jnp.linalg.qr(b)
    ub, s, vbt = jnp.linalg.svd(rr, full_matrices=False)
    if wide:                                       # ΔW ≈ W_k Bᵀ = W_k Ṽ S Ũᵀ Qᵀ
        return _contract(w_k, vbt, 1, 1), s, _contract(ub, q, 0, 1)
    return jnp.matmul(q, ub, precision=HIGHEST), s, _contract(vbt, w_k, 1, 1)     # ΔW ≈ B W_kᵀ


def _eigh_top(delta, side: int, rank: int):
    _, w = jnp.linalg.eigh(_contract(delta, delta, side, side))         # ascending eigenvalues
    return w[:, ::-1][:, :rank]


# ----- the Gram SVD on the CPU: three stages ----------------------------------------------------------------
#: From this size of the Gram matrix (the delta's smaller side) on, :func:`svd_delta` and :func:`svd_sharded`
#: take :func:`cpu_gram_svd` on the CPU; below it the one-program :func:`gram_svd` (nothing to gain there).
TRIDIAGONAL_MIN_SIZE = 64


def takes_cpu_gram_svd(mesh: Mesh, shape, rank: int | None, method: str) -> bool:
    """Whether the SVD of rank ``rank`` by ``method`` of deltas of ``shape`` on ``mesh`` goes through
    :func:`cpu_gram_svd`: the Gram SVD, on CPU devices, from :data:`TRIDIAGONAL_MIN_SIZE` on."""
    return (rank is not None and method == "gram" and min(shape[-2:]) >= TRIDIAGONAL_MIN_SIZE
            and mesh.devices.flat[0].platform == "cpu")


def cpu_gram_svd(deltas, mesh: Mesh | None, rank: int, axis: str = BATCH_AXIS):
    """:func:`gram_svd`'s triplets of a stack ``(B, m, n)`` on ``mesh`` (or of one delta ``(m, n)`` with
    ``mesh=None``, each stage one jitted program), computing only the ``rank`` eigenvectors kept:

        G = AᵀA, upper block triangle only        (on the devices: :func:`gram_upper` of the scaled delta)
        G = Q T Qᵀ;  T = Z Λ Zᵀ                   (on the host: :func:`tridiagonal_eigenvectors`)
        W_k = Q Z_k;  Rayleigh–Ritz on A          (on the devices: :func:`back_transform`, :func:`rayleigh_ritz`)

    These are the steps of LAPACK's ``syevd`` (what ``jnp.linalg.eigh`` runs on the CPU), whose last one,
    the back-transform of all ``n`` eigenvectors (``2n³`` flops), is cut to ``2n²·rank`` here, as products;
    and the Gram product computes 62.5% of ``G``. The host step runs between two sharded programs
    (:func:`~prinmix_jax.core.mesh.run_sharded`), never inside one: a host callback inside a sharded program
    was seen to crash the process under load. Each stage takes one matrix at a time, so a matrix's bytes
    do not depend on the batch or the mesh.

    Returns:
      ``(U, σ, V)`` as :func:`run_sharded <prinmix_jax.core.mesh.run_sharded>` returns them (for one delta:
      as the jitted program does).
    """
    side = _check_rank(deltas.shape, rank)
    if mesh is None:      # a sharded program of one matrix ran 1.3x slower at 32000x4096 (docs/benchmarks.md)
        g = _jitted(_gram_stage(side))(deltas)
        return _jitted(_ritz_stage(side))(deltas, *tridiagonal_eigenvectors(g, rank))
    g = run_sharded(_gram_stage(side), mesh, deltas, axis=axis)
    host = [tridiagonal_eigenvectors(gi, rank) for gi in np.asarray(g)]
    del g
    refl, taus, z = (np.stack(x) for x in zip(*host))
    del host
    return run_sharded(_ritz_stage(side), mesh, deltas, refl, taus, z, axis=axis)


@functools.cache
def _gram_stage(side: int):
    return lambda delta: gram_upper(_scaled(delta), side)


@functools.cache
def _ritz_stage(side: int):
    def ritz(delta, refl_t, taus, z):
        return rayleigh_ritz(delta, back_transform(refl_t, taus, z), side, implicit_q=True)
    return ritz


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


#: The truncated SVDs :func:`svd_delta` and :func:`svd_sharded` can take (``method``).
SVD_METHODS = ("gram", "randomized")


@functools.cache
def svd_fn(rank: int | None = None, method: str = "gram", oversample: int = 32, iters: int = 4):
    """The traced SVD of one delta with its static settings bound: :func:`thin_svd` (``rank=None``),
    :func:`gram_svd` or :func:`truncated_svd` (``method="randomized"``, with ``oversample`` and ``iters``).
    One long-lived function per setting, so :func:`~prinmix_jax.core.mesh.run_sharded` compiles it once per
    shape. (:func:`run_svd` takes :func:`cpu_gram_svd` instead of the Gram SVD's one program on the CPU.)"""
    if rank is None:
        return thin_svd
    if method == "gram":
        return functools.partial(gram_svd, rank=int(rank))
    if method == "randomized":
        return functools.partial(truncated_svd, rank=int(rank), oversample=int(oversample), iters=int(iters),
                                 seed=SVD_SEED)
    raise ValueError(f"SVD method must be one of {', '.join(SVD_METHODS)}, got {method!r}")


@functools.cache
def _jitted(fn):
    return jax.jit(fn)


def run_svd(deltas, mesh: Mesh, rank: int | None = None, method: str = "gram", oversample: int = 32,
            iters: int = 4, axis: str = BATCH_AXIS):
    """The unguarded SVDs of a stack ``(B, m, n)`` on ``mesh`` (:func:`svd_sharded` without the Gram SVD's
    accuracy guard and the prefetched SVDs): :func:`cpu_gram_svd` where :func:`takes_cpu_gram_svd`, else one
    sharded program of :func:`svd_fn` (:func:`~prinmix_jax.core.mesh.run_sharded`)."""
    if takes_cpu_gram_svd(mesh, deltas.shape, rank, method):
        return cpu_gram_svd(deltas, mesh, int(rank), axis)
    return run_sharded(svd_fn(rank, method, oversample, iters), mesh, deltas, axis=axis)


def svd_delta(delta, rank: int | None = None, *, method: str = "gram", oversample: int = 32, iters: int = 4):
    """Thin SVD of one delta ``(m, n)`` or of a stack ``(batch, m, n)``.

    Args:
      delta: float32/float64 array; bf16/f16 is refused (upcast it yourself).
      rank: ``None``: the full thin SVD (:func:`thin_svd`); an int: the top ``rank`` triplets.
      method: how the top ``rank`` are computed: ``"gram"`` (:func:`gram_svd`) or ``"randomized"``
        (:func:`truncated_svd` with ``oversample`` and ``iters``).

    Returns:
      ``(U, σ, V)`` with shapes ``(..., m, r)``, ``(..., r)``, ``(..., r, n)``, ``r = min(m, n)`` (or
      ``rank``), σ descending.
    """
    delta = jnp.asarray(delta)
    _check_dtype(delta)
    check_float32_products()                       # once per device kind, not on the CPU
    mesh = single_device_mesh()

    def full_svd(d):
        return run_sharded(thin_svd, mesh, d)
    if delta.ndim == 3:           # one matrix at a time on the first device: the bytes of svd_sharded's
        return _gram_fallback(delta, run_svd(delta, mesh, rank, method, oversample, iters), rank, method, full_svd)
    if takes_cpu_gram_svd(mesh, delta.shape, rank, method):
        out = cpu_gram_svd(delta, None, int(rank))
    else:
        out = _jitted(svd_fn(rank, method, oversample, iters))(delta)
    if rank is None or method != "gram":     # nothing to guard: no stack of one made and taken apart
        return out
    fixed = _gram_fallback(delta[None], [x[None] for x in out], rank, method, full_svd)
    return tuple(x[0] for x in fixed)


def svd_sharded(deltas, mesh: Mesh | None = None, axis: str = BATCH_AXIS, *, rank: int | None = None,
                method: str = "gram", oversample: int = 32, iters: int = 4, tags=None):
    """SVD of a stack ``(batch, m, n)`` of same-shape deltas, spread over the devices of ``mesh``.

    One ``jax.jit``-compiled program of :func:`svd_fn` (the full SVD for ``rank=None``, else the top
    ``rank`` triplets by ``method``; on the CPU the Gram SVD's three stages, :func:`cpu_gram_svd`, each
    sharded the same way) over the batch-sharded stack (:func:`~prinmix_jax.core.mesh.run_sharded`:
    no padding copies; a batch that does not fill the mesh runs on as many devices as it has matrices), each
    device taking its matrices one at a time: a matrix's bytes are those of :func:`svd_delta` of it alone,
    whatever the batch and the mesh. (A ``vmap`` rounded by ~1e-7 with the batch on XLA:CPU. Processes with
    different simulated CPU device counts can still differ: XLA:CPU's products round with the threads each
    device gets, e.g. 1–2 against 4–8 devices on a 2-core machine.)

    Args:
      deltas: float32/float64 array (batch, m, n); bf16/f16 is refused. A numpy array goes to the
        devices shard by shard.
      mesh: a 1-D mesh; default all devices.
      axis: the mesh axis name.
      rank, method, oversample, iters: as for :func:`svd_delta`.
      tags: optional, one hashable per matrix (``(key, settings)``): inside :func:`using_prefetched_svds`, the
        SVDs :func:`prefetch_svds` started under these tags are taken instead of computed (the same bytes).

    Returns:
      ``(U, σ, V)`` for the batch: on the mesh, or on the host (numpy) when it did not fill the mesh.
    """
    deltas = deltas if isinstance(deltas, (np.ndarray, jax.Array)) else jnp.asarray(deltas)
    _check_dtype(deltas)
    if deltas.ndim != 3:
        raise ValueError(f"svd_sharded expects (batch, m, n), got shape {deltas.shape}")
    mesh = default_mesh(mesh, axis)
    check_float32_products(mesh.devices.flat)  # once per device kind, not on the CPU
    out = None if tags is None else take_prefetched(tags)
    if out is None:
        out = run_svd(deltas, mesh, rank, method, oversample, iters, axis)
    return _gram_fallback(deltas, out, rank, method, lambda d: run_sharded(thin_svd, mesh, d, axis=axis))


#: The Gram SVD's σ lose relative accuracy as about ``c · ε · √n · (σ₁/σ)²`` (``ε`` = 1.19e-7, float32's
#: machine epsilon, ``n`` the smaller side; ``c`` measured 0.01–0.08), from the rounding of ``ΔWᵀΔW``. Where
#: that estimate at the last index, ``ε · √n · (σ₁/σ_k)²``, exceeds this, the matrix's SVD is taken again in
#: full and cut to ``k`` (:func:`gram_fallback_needed`). Measured: 0.08–0.12 on the long-tailed 4096-wide
#: benchmark deltas (largest σ error over the top ``k_max`` ≤ 2e-4); 0.21 and 1.07 on steep spectra
#: (σ ~ i^-1.5), where the Gram SVD's σ were off by up to 2.5e-3 over the top 80% of ``k``. Fine-tuning
#: deltas are far flatter (σ₁/σ_k 3–40 on the demo pair).
GRAM_MAX_ERROR_ESTIMATE = 0.15


def gram_fallback_needed(sigma, n: int) -> np.ndarray:
    """(B,) bool: which of a stack's Gram SVDs (σ (B, k) as returned, ``n`` = min(m, n)) are not trusted:
    ``ε · √n · (σ₁/σ_k)² >`` :data:`GRAM_MAX_ERROR_ESTIMATE`, or σ_k = 0 (a delta of rank < k: its full
    SVD is as cheap to trust)."""
    sigma = np.asarray(sigma, np.float64)
    first, last = sigma[:, 0], sigma[:, -1]
    eps = float(np.finfo(np.float32).eps)
    with np.errstate(divide="ignore", invalid="ignore"):
        est = eps * np.sqrt(n) * (first / last) ** 2
    return (last <= 0) & (first > 0) | (est > GRAM_MAX_ERROR_ESTIMATE)


def _gram_fallback(deltas, out, rank: int | None, method: str, full_svd):
    """``out`` (a stack's SVDs by ``rank`` and ``method``) with the untrusted Gram SVDs' triplets replaced by
    the top ``rank`` of their full SVD (``full_svd(stack) -> (U, σ, V)``); ``out`` unchanged for the other
    SVDs and when every Gram SVD is trusted."""
    if rank is None or method != "gram":
        return out
    redo = np.nonzero(gram_fallback_needed(out[1], min(deltas.shape[-2:])))[0]
    if not len(redo):
        return out
    u, s, v = (np.array(x) for x in out)
    fu, fs, fv = full_svd(deltas[redo])
    u[redo], s[redo], v[redo] = (np.asarray(fu)[:, :, :rank], np.asarray(fs)[:, :rank],
                                 np.asarray(fv)[:, :rank])
    return u, s, v


_REUSE: contextvars.ContextVar = contextvars.ContextVar("prinmix_svd_reuse", default=None)


@contextlib.contextmanager
def reusing_svds(store, keys):
    """Within the ``with`` block, the stack SVDs (:func:`~prinmix_jax.methods.shared.stack_svd`) go through
    ``store`` (looked up, or computed and offered to it) under one key per matrix of the stack.

    Args:
      store: an object with ``stack_svd(keys, deltas, compute, settings) -> (U, σ, V)`` (e.g.
        :class:`~prinmix_jax.svd_store.SVDStore`), or ``None`` (nothing is kept: the keys then only name
        the matrices for :func:`prefetch_svds`).
      keys: one string per matrix of the stacks computed in the block (e.g. ``"3/q_proj"``).
    """
    token = _REUSE.set((store, tuple(keys)))
    try:
        yield
    finally:
        _REUSE.reset(token)


def active_svd_reuse():
    """``(store, keys)`` set by the innermost :func:`reusing_svds`, or ``None``."""
    return _REUSE.get()


def svd_settings(rank: int | None = None, method: str = "gram", oversample: int = 32, iters: int = 4) -> str:
    """A short name of the SVD that :func:`svd_sharded` computes with these settings (part of a reuse key)."""
    if rank is None:
        return "full"
    if method == "gram":
        return f"g{int(rank)}"
    return f"r{int(rank)}-o{int(oversample)}-i{int(iters)}-s{SVD_SEED}"


# ----- several stacks' SVDs at once ---------------------------------------------------------------
_PREFETCHED: contextvars.ContextVar = contextvars.ContextVar("prinmix_svd_prefetched", default=None)


def svd_cost(m: int, n: int, rank: int | None = None) -> float:
    """A rough relative cost of one (m, n) SVD of rank ``rank`` (``None``: full): for the Gram SVD the Gram
    product, the ``eigh`` (~9 r³) and the Rayleigh–Ritz step on the larger side; for the full SVD ~4·m·n·r.
    Only its order matters (:func:`prefetch_svds` places the largest first)."""
    big, r = max(m, n), min(m, n)
    if rank is None:
        return 4.0 * big * r * r
    return big * r * r + 9.0 * r ** 3 + 4.0 * big * r * rank


def plan_devices(sizes, costs, devices: int) -> list[list[int]]:
    """Which devices start each stack's SVDs: stacks by falling cost, each on the ``size`` least-loaded
    devices (ties to the lower index), one matrix per device (greedy longest-processing-time scheduling).
    A stack of more matrices than devices is left out (``[]``): it fills the mesh on its own."""
    load = [0.0] * devices
    out: list[list[int]] = [[] for _ in sizes]
    for i in sorted(range(len(sizes)), key=lambda i: -costs[i] * sizes[i]):
        if sizes[i] > devices:
            continue
        out[i] = sorted(sorted(range(devices), key=lambda d: (load[d], d))[:sizes[i]])
        for d in out[i]:
            load[d] += costs[i]
    return out


def prefetch_svds(requests, mesh: Mesh | None = None, axis: str = BATCH_AXIS) -> dict:
    """Starts the SVDs of several stacks at once, each stack on devices of its own, and returns them unwaited
    for :func:`using_prefetched_svds`.

    On a mesh of several devices a Llama block's stacks (q,k,v · o · gate,up · down) hold 1–3 matrices each:
    one after the other, each stack would leave most devices idle. Here they run side by side, one matrix per
    device (:func:`plan_devices`), each stack as :func:`svd_sharded` would run it on a mesh of its own devices
    (one batch item per device: the same bytes as on a mesh of more devices).

    Args:
      requests: ``[(tags, deltas, kw)]``: one hashable tag per matrix, the (B, m, n) float32 stack, and
        :func:`svd_sharded`'s ``rank``/``method``/``oversample``/``iters`` (``{}``: the full SVD).
      mesh: the 1-D mesh; default all devices.

    Returns:
      ``{tag: (outputs, index)}``: the stack's ``(U, σ, V)`` (on its devices) and the matrix's batch index.
    """
    mesh = default_mesh(mesh, axis)
    devs = list(mesh.devices.flat)
    check_float32_products(devs)
    sizes = [len(t) for t, _, _ in requests]
    costs = [svd_cost(*d.shape[-2:], kw.get("rank")) for _, d, kw in requests]
    out = {}
    for (tags, deltas, kw), place in zip(requests, plan_devices(sizes, costs, len(devs))):
        if not place:
            continue
        _check_dtype(deltas)
        sub = sub_mesh(mesh, [devs[d] for d in place], axis)
        res = run_svd(deltas, sub, kw.get("rank"), kw.get("method", "gram"), kw.get("oversample", 32),
                      kw.get("iters", 4), axis)
        out.update({tag: (res, i) for i, tag in enumerate(tags)})
    return out


@contextlib.contextmanager
def using_prefetched_svds(prefetched: dict):
    """Within the ``with`` block, :func:`svd_sharded` calls with ``tags`` take the SVDs of ``prefetched``
    (:func:`prefetch_svds`); each is dropped once taken."""
    token = _PREFETCHED.set(prefetched)
    try:
        yield
    finally:
        _PREFETCHED.reset(token)


def active_prefetched():
    """The SVDs of the innermost active :func:`using_prefetched_svds` (a dict, possibly emptied), or ``None``."""
    return _PREFETCHED.get()


def take_prefetched(tags):
    """``(U, σ, V)`` (numpy) of the matrices ``tags`` from the active :func:`using_prefetched_svds`, removed
    from it, or ``None`` (nothing removed) unless every one is there."""
    pre = _PREFETCHED.get()
    if not pre or any(t not in pre for t in tags):
        return None
    got = [pre.pop(t) for t in tags]
    return tuple(np.stack([np.asarray(res[f])[i] for res, i in got]) for f in range(3))
