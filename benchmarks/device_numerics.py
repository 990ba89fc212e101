"""How accurate is float32 linear algebra on this backend? A probe for a lent accelerator (and its CPU baseline).

On the first H200 run (2026-12-04, jax 0.11.2), 4 of the first 8 cases of tests/test_svd_truncated.py failed:
the wide (256x512) Gram SVD, the randomized range finder in both orientations, and the Gram SVD's fallback
test. The tall (512x256) Gram SVD passed. The time limit cut off the failure reports. On the CPU, rounding the
operands to TF32 (10 mantissa bits) only in the products that contract the left operand's first axis (``AᵀB``:
``lax.dot_general`` with lhs contracting dim 0, and the range finder's ``(xᵀ A)ᵀ``) reproduces that pattern.
The Gram SVD's fallback test still passes under it, though. Rounding every product, or every product with a
transposed operand, makes the tall Gram SVD fail too. This script tells the cases apart in well under a minute:

1. each product form the SVD path uses, at ``Precision.HIGHEST`` and at the default precision: its relative
   error against float64 (float32 gives ~1e-7, TF32 ~1e-4, bf16 ~1e-3), and how XLA compiled it (a cuBLAS
   call or a Triton GEMM fusion: Triton's default f32 dot precision is TF32x3 since triton-lang/triton#9080);
2. residuals and orthogonality of ``eigh``, ``qr``, ``lu`` and ``svd``;
3. for the failing test cases: how close each of the test's checks is to its tolerance (1.0 = at the
   tolerance), and whether ``svd_sharded`` of a stack gives the bytes of ``svd_delta`` of the matrix alone.

Everything is printed as soon as it is known (the device tool's command can be stopped at its time limit).

    python benchmarks/device_numerics.py            # on whatever JAX's default backend is
"""
from __future__ import annotations

import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from prinmix_jax import CompressionConfig  # noqa: E402
from prinmix_jax.core.numerics import PRODUCT_FORMS, float64_product, product_form  # noqa: E402
from prinmix_jax.core.svd import svd_delta, svd_sharded  # noqa: E402
from prinmix_jax.methods.shared import max_kept_rank, oversample_columns, svd_rank  # noqa: E402
from prinmix_jax.synthetic import long_tailed_delta  # noqa: E402

HIGHEST = jax.lax.Precision.HIGHEST


#: ``name: (f(x, y, precision), float64 reference of the same)``: the core's product forms
#: (:data:`~prinmix_jax.core.numerics.PRODUCT_FORMS`, which the library checks itself at ``HIGHEST``), and the
#: range finder's ``(xᵀ A)`` written as a matmul of a transposed operand.
PRODUCTS = {
    **{name: (lambda x, y, p, dims=dims: product_form(dims, p)(x, y), lambda x, y, dims=dims: float64_product(x, y, dims))
       for name, dims in PRODUCT_FORMS.items()},
    "(Aᵀ B) as matmul(x.T, y)": (lambda x, y, p: jnp.matmul(x.T, y, precision=p), lambda x, y: x.T @ y),
}


def _rel(a, ref) -> float:
    return float(np.linalg.norm(np.asarray(a, np.float64) - ref) / np.linalg.norm(ref))


def products(n: int = 512) -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, n)).astype(np.float32)
    y = rng.standard_normal((n, n)).astype(np.float32)
    x64, y64 = x.astype(np.float64), y.astype(np.float64)
    print(f"\n1. products of two {n}x{n} float32 matrices, relative error against float64 "
          "(float32 ~1e-7, TF32 ~1e-4, bf16 ~1e-3):", flush=True)
    for name, (f, ref) in PRODUCTS.items():
        errs, paths = [], []
        for p in (HIGHEST, None):
            fn = jax.jit(lambda a, b, p=p, f=f: f(a, b, p))
            errs.append(_rel(fn(x, y), ref(x64, y64)))
            paths.append(compiled_path(fn.lower(x, y).compile().as_text()))
        print(f"   {name:34s} HIGHEST {errs[0]:.1e} ({paths[0]})   default {errs[1]:.1e} ({paths[1]})", flush=True)


def compiled_path(hlo: str) -> str:
    """How XLA compiled a product: a cuBLAS(Lt) call, a Triton GEMM fusion, or neither (e.g. the CPU's)."""
    text = hlo.lower()
    found = [n for n, key in (("cublaslt", "__cublas$lt"), ("cublas", "__cublas$gemm"), ("triton", "triton"),
                              ("cudnn", "__cudnn")) if key in text]
    return "+".join(found) or "other"


def decompositions(n: int = 512) -> None:
    rng = np.random.default_rng(1)
    a = rng.standard_normal((2 * n, n)).astype(np.float32)
    g = (a.T.astype(np.float64) @ a).astype(np.float32)
    eye = np.eye(n)
    print(f"\n2. decompositions in float32 ({2 * n}x{n}, and its {n}x{n} Gram matrix); residual / ‖input‖, "
          "orthogonality:", flush=True)
    lam, w = (np.asarray(t, np.float64) for t in jax.jit(jnp.linalg.eigh)(g))
    print(f"   eigh  ‖G W − W Λ‖/‖G‖ {np.linalg.norm(g @ w - w * lam) / np.linalg.norm(g):.1e}   "
          f"‖WᵀW − I‖ {np.abs(w.T @ w - eye).max():.1e}", flush=True)
    q, r = (np.asarray(t, np.float64) for t in jax.jit(jnp.linalg.qr)(a))
    print(f"   qr    ‖Q R − A‖/‖A‖ {_rel(q @ r, a.astype(np.float64)):.1e}   "
          f"‖QᵀQ − I‖ {np.abs(q.T @ q - eye).max():.1e}", flush=True)
    lu, _, perm = (np.asarray(t) for t in jax.jit(jax.lax.linalg.lu)(a))
    lo = np.tril(lu.astype(np.float64), -1)[:, :n] + np.eye(2 * n, n)
    print(f"   lu    ‖L U − P A‖/‖A‖ {_rel(lo @ np.triu(lu.astype(np.float64)[:n]), a[perm].astype(np.float64)):.1e}",
          flush=True)
    u, s, vt = (np.asarray(t, np.float64) for t in jax.jit(lambda m: jnp.linalg.svd(m, full_matrices=False))(a))
    print(f"   svd   ‖U Σ Vᵀ − A‖/‖A‖ {_rel((u * s) @ vt, a.astype(np.float64)):.1e}   "
          f"‖UᵀU − I‖ {np.abs(u.T @ u - eye).max():.1e}   σ descending {bool(np.all(np.diff(s) <= 0))}", flush=True)


def svd_test_margins() -> None:
    """The checks of test_svd_truncated's accuracy test, as fractions of their tolerances (1.0 = at it)."""
    cfg = CompressionConfig(svd="truncated")
    print("\n3. test_svd_truncated's checks as fractions of their tolerances (>1 fails):", flush=True)
    for shape in ((256, 512), (512, 256)):
        d, _ = long_tailed_delta(*shape, seed=5)
        k_max = max_kept_rank(*shape, cfg)
        k = svd_rank(*shape, cfg, k_max)
        s_full = np.linalg.svd(d.astype(np.float64), compute_uv=False)
        for method in ("gram", "randomized"):
            u, s, v = (np.asarray(t, np.float64) for t in svd_delta(
                d, k, method=method, oversample=oversample_columns(k, cfg), iters=cfg.svd_iters))
            err = np.abs(s - s_full[:k]) / s_full[:k]
            proj = d @ v.T @ v if method == "gram" else u @ (u.T @ d)
            checks = {
                "VVᵀ−I (2e-5)": np.abs(v @ v.T - np.eye(k)).max() / 2e-5,
                "UᵀU−I (2e-5)": np.abs(u.T @ u - np.eye(k)).max() / 2e-5,
                "σ err top k_max (1e-3)": err[:k_max].max() / 1e-3,
                "σ err all k (1e-4, gram)": err.max() / 1e-4 if method == "gram" else float("nan"),
                "U Σ V − projection (1e-5 max|Δ|)": np.abs((u * s) @ v - proj).max() / (1e-5 * np.abs(d).max()),
            }
            print(f"   {shape[0]}x{shape[1]} {method:10s} " + "  ".join(f"{n} {c:.2f}" for n, c in checks.items())
                  + f"  descending {bool(np.all(np.diff(s) <= 0))}", flush=True)
    tail, _ = long_tailed_delta(256, 128, seed=7)
    s1 = np.asarray(svd_delta(tail, 48)[1])
    s3 = np.asarray(svd_sharded(np.stack([tail, tail, tail]), rank=48)[1])
    print(f"   svd_sharded(stack of 3)[1] == svd_delta(alone): bytes equal {bool(np.array_equal(s3[1], s1))}, "
          f"largest relative difference {np.abs(s3[1] / s1 - 1).max():.1e}", flush=True)


def main() -> None:
    print(f"jax {jax.__version__}, devices {jax.devices()}", flush=True)
    products()
    decompositions()
    svd_test_margins()


if __name__ == "__main__":
    main()
