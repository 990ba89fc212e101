"""The Gram SVD on the CPU (core.svd.cpu_gram_svd): the upper-triangle Gram product, the host step (LAPACK sytrd,
then stevd), the compact-WY back-transform of only the kept columns, and the whole route, each against a
float64 NumPy oracle; and which SVDs take the route."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prinmix_jax.core import svd as S
from prinmix_jax.core import tridiagonal as T
from prinmix_jax.core.mesh import single_device_mesh
from prinmix_jax.synthetic import long_tailed_delta

ON_CPU = jax.default_backend() == "cpu"


def _reflector_product(h, taus):
    """Q = H_0 H_1 … H_{p-1} in float64 from LAPACK's storage (v_i below the diagonal of h, unit at i)."""
    r, p = h.shape
    q = np.eye(r)
    for i in range(p):
        v = np.zeros(r)
        v[i] = 1.0
        v[i + 1:] = h[i + 1:, i]
        q = q @ (np.eye(r) - taus[i] * np.outer(v, v))
    return q


@pytest.mark.parametrize("block", [1, 7, 64, 500])
def test_apply_householder_is_the_product_of_the_reflectors(block):
    rng = np.random.default_rng(0)
    a = rng.standard_normal((90, 60)).astype(np.float32)
    a[:, 5] = 0.0                                   # its reflector is the identity: LAPACK's τ = 0
    h, taus = jnp.linalg.qr(a, mode="raw")
    ht, taus = np.asarray(h), np.asarray(taus)       # raw: the reflectors as rows (LAPACK's, transposed)
    h = ht.T
    assert taus[5] == 0.0
    c = rng.standard_normal((90, 17)).astype(np.float32)
    want = _reflector_product(h.astype(np.float64), taus.astype(np.float64)) @ c
    got = np.asarray(T.apply_householder(ht, taus, c, block))
    np.testing.assert_allclose(got, want, atol=2e-5 * np.abs(want).max())
    dropped = taus.copy()
    dropped[40] = 0.0                             # the test can fail: one reflector left out
    assert np.abs(np.asarray(T.apply_householder(ht, dropped, c, block)) - want).max() > 1e-2


@pytest.mark.parametrize("shape,side", [((70, 130), 1), ((130, 70), 0)])
@pytest.mark.parametrize("blocks", [1, 3, 8, 1000])
def test_gram_upper_holds_the_upper_triangle_of_the_gram_matrix(shape, side, blocks):
    d = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    d64 = d.astype(np.float64)
    want = d64.T @ d64 if side == 0 else d64 @ d64.T
    got = np.asarray(T.gram_upper(jnp.asarray(d), side, blocks), np.float64)
    assert got.shape == want.shape
    np.testing.assert_allclose(np.triu(got), np.triu(want), atol=1e-5 * np.abs(want).max())


def _repeated_spectrum(m, n, values, seed=0):
    """(m, n) float32 with singular values ``values`` (each repeated), random singular vectors."""
    rng = np.random.default_rng(seed)
    r = min(m, n)
    q1 = np.linalg.qr(rng.standard_normal((m, r)))[0]
    q2 = np.linalg.qr(rng.standard_normal((n, r)))[0]
    s = np.repeat(values, -(-r // len(values)))[:r]
    return ((q1 * s) @ q2.T).astype(np.float32)


def _span_cosine(w_true, w):
    """Smallest cosine of the principal angles between two column spans (1: the same span)."""
    return np.linalg.svd(w_true.T @ w, compute_uv=False).min()


def _host_route_eigenvectors(g, rank):
    """The eigenvectors :func:`~prinmix_jax.core.svd.cpu_gram_svd` computes from ``g``: its host step, then
    the back-transform of the kept columns."""
    return np.asarray(T.back_transform(*T.tridiagonal_eigenvectors(g, rank)))


@pytest.mark.parametrize("case", ["long_tailed", "repeated"])
def test_tridiagonal_eigenvectors_span_the_top_eigenspace(case):
    """Against float64 ``eigh``: orthonormal columns, largest first, spanning the top eigenspace, also where
    48 eigenvalues are one repeated value (a bulk in which eigenvectors are defined only as a span)."""
    if case == "long_tailed":
        d, _ = long_tailed_delta(300, 200, seed=3)
        rank, check = 60, [1, 10, 30, 60]
    else:
        d = _repeated_spectrum(128, 96, [3.0, 1.0])
        rank, check = 57, [48]                      # the 48 of σ = 3; any 9 of the next 48 are right
    g = d.T.astype(np.float64) @ d
    lam, vec = np.linalg.eigh(g)
    vec = vec[:, ::-1]
    upper = np.triu(g).astype(np.float32)           # only the upper triangle is read
    w = _host_route_eigenvectors(upper, rank).astype(np.float64)
    assert w.shape == (200 if case == "long_tailed" else 96, rank)
    np.testing.assert_allclose(w.T @ w, np.eye(rank), atol=1e-5)
    for j in check:
        assert _span_cosine(vec[:, :j], w[:, :j]) > 1 - 1e-5, j
    ritz = np.einsum("ij,ik,kj->j", w, g, w)
    np.testing.assert_allclose(ritz[:check[-1]], lam[::-1][:check[-1]], rtol=1e-4)


HARD = ["tiny", "huge", "zero", "rank2", "repeated", "wide"]


def _hard_delta(kind):
    rng = np.random.default_rng(4)
    m, n = 160, 96
    return {"tiny": rng.standard_normal((m, n)) * 1e-30, "huge": rng.standard_normal((m, n)) * 1e15,
            "zero": np.zeros((m, n)), "rank2": rng.standard_normal((m, 2)) @ rng.standard_normal((2, n)),
            "repeated": _repeated_spectrum(m, n, [3.0, 1.0]),
            "wide": long_tailed_delta(n, m, seed=5)[0]}[kind].astype(np.float32)


@pytest.mark.parametrize("route", ["cpu stages", "one program"])
@pytest.mark.parametrize("kind", HARD)
def test_gram_svd_on_hard_deltas(kind, route):
    """The Gram SVD, through the CPU's stages (n ≥ 64) and as one program (what GPUs and TPUs run), against
    float64: finite, orthonormal factors, σ within 1e-4·σ₁. ``tiny`` underflows ΔWᵀΔW in float32 unless ΔW
    is scaled first, ``huge`` nearly overflows it; ``repeated`` has 48 equal σ."""
    d = _hard_delta(kind)
    k = 57
    if route == "cpu stages":
        out = S.cpu_gram_svd(d[None], single_device_mesh(), k)
        u, s, v = (np.asarray(x, np.float64)[0] for x in out)
    else:
        u, s, v = (np.asarray(x, np.float64) for x in jax.jit(S.gram_svd, static_argnums=1)(jnp.asarray(d), k))
    assert u.shape == (d.shape[0], k) and s.shape == (k,) and v.shape == (k, d.shape[1])
    assert np.isfinite(u).all() and np.isfinite(s).all() and np.isfinite(v).all()
    s_full = np.linalg.svd(d.astype(np.float64), compute_uv=False)[:k]
    scale = max(s_full[0], np.finfo(np.float64).tiny)
    assert np.abs(s - s_full).max() <= 1e-4 * scale, np.abs(s - s_full).max() / scale
    if kind not in ("zero", "rank2"):       # past the rank the factors are any orthonormal completion
        np.testing.assert_allclose(u.T @ u, np.eye(k), atol=2e-5)
        np.testing.assert_allclose(v @ v.T, np.eye(k), atol=2e-5)
        np.testing.assert_allclose(u.T @ d.astype(np.float64) @ v.T, np.diag(s), atol=1e-5 * scale)


@pytest.mark.skipif(not ON_CPU, reason="the stages are the CPU's route")
def test_the_cpu_takes_the_stages_from_the_minimum_size_and_keeps_them_out_of_the_programs():
    """svd_delta and svd_sharded give the stages' bytes from :data:`~prinmix_jax.core.svd.TRIDIAGONAL_MIN_SIZE`
    on (not the one program's), and the one program's below it; the compiled stages call no host callback
    and no dense ``eigh`` (a callback inside a sharded program crashed the process under load)."""
    rng = np.random.default_rng(6)
    one_program = jax.jit(S.gram_svd, static_argnums=1)
    big = rng.standard_normal((3, 100, S.TRIDIAGONAL_MIN_SIZE)).astype(np.float32)
    stages = [np.asarray(x) for x in S.cpu_gram_svd(big, single_device_mesh(), 8)]
    for got in (S.svd_delta(big[1], 8), [x[1] for x in S.svd_sharded(big, rank=8)]):
        for f in range(3):
            np.testing.assert_array_equal(np.asarray(got[f]), stages[f][1])
    assert not np.array_equal(np.asarray(one_program(big[1], 8)[2]), stages[2][1])
    small = big[1, :, 1:]
    for got, want in zip(S.svd_delta(small, 8), one_program(small, 8)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    d = jnp.zeros((100, 96), jnp.float32)
    gram = jax.jit(S._gram_stage(0)).lower(d).compile().as_text()
    ritz = jax.jit(S._ritz_stage(0)).lower(d, jnp.zeros((96, 96)), jnp.zeros((95,)), jnp.zeros((96, 8)))
    for text in (gram, ritz.compile().as_text()):
        assert "callback" not in text and "syevd" not in text
