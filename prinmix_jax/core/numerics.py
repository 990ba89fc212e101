"""Are float32 matrix products at ``Precision.HIGHEST`` really float32 on this backend? A check, once per device
kind, before the first SVD.

Every product of the core asks for ``Precision.HIGHEST`` (full float32, also on TPU, whose default is one
bfloat16 pass). The accuracy targets rest on it: the Gram SVD's σ lose ``ε·(σ₁/σ)²`` to the rounding of
``ΔWᵀΔW``, so products ~1000× less accurate than float32 (TF32, bfloat16) put the kept σ off by far more than
1e-3 (core/svd.py), and GPTQ's error feedback and the error tables lose accuracy with them. A backend or
compiler that computes such a product at lower precision all the same (on the first H200 run, the SVD tests
that failed were those whose products contract the left operand's first axis: see
benchmarks/device_numerics.py) would do so silently. :func:`check_float32_products` measures it on a
256×256 product in each of the core's product forms against float64 and warns (:class:`PrecisionWarning`)
when one is off by more than :data:`FLOAT32_PRODUCT_TOLERANCE`. On the CPU it is not run: XLA:CPU computes
float32 products in float32.
"""
from __future__ import annotations

import functools
import warnings

import jax
import numpy as np

HIGHEST = jax.lax.Precision.HIGHEST

#: The product forms of the core, as ``lax.dot_general`` contracting dimensions ``(lhs, rhs)`` of two 2-D
#: operands: ``A B`` (``jnp.matmul``), ``Aᵀ B`` (the Gram matrix, ``contract(x, y, 0, 0)``), ``A Bᵀ`` and
#: ``Aᵀ Bᵀ``.
PRODUCT_FORMS = {"A B": (1, 0), "Aᵀ B": (0, 0), "A Bᵀ": (1, 1), "Aᵀ Bᵀ": (0, 1)}

#: The largest relative (Frobenius) error of a 256×256 product of standard normal float32 matrices taken as
#: float32. Measured against float64 on the CPU: float32 2.9e-7, three bfloat16 passes 4.4e-6, TF32 2.9e-4,
#: one bfloat16 pass 2.3e-3 (three TF32 passes, as cuBLAS and Triton emulate float32: 7.6e-8).
FLOAT32_PRODUCT_TOLERANCE = 2e-6


class PrecisionWarning(UserWarning):
    """Float32 products at ``Precision.HIGHEST`` are less accurate than float32 on this backend."""


def float64_product(x, y, dims) -> np.ndarray:
    """The product of form ``dims`` (:data:`PRODUCT_FORMS`) of two 2-D arrays, in float64."""
    a = x.T if dims[0] == 0 else x
    b = y.T if dims[1] == 1 else y
    return a.astype(np.float64) @ b.astype(np.float64)


def contract(x, y, ax: int, ay: int, precision=HIGHEST):
    """``Σ_l x[.., l (axis ax) ..] y[.., l (axis ay) ..]`` as one ``lax.dot_general`` (full float32 precision
    by default): the shared axis contracted in place, never through a transposed operand."""
    return jax.lax.dot_general(x, y, (((ax,), (ay,)), ((), ())), precision=precision)


def product_form(dims, precision=HIGHEST):
    """``f(x, y)``: the product of form ``dims`` (:data:`PRODUCT_FORMS`) as one ``lax.dot_general``."""
    return lambda x, y: contract(x, y, *dims, precision=precision)


@functools.cache
def _product(dims):
    return jax.jit(product_form(dims))


def float32_product_errors(device=None, n: int = 256, product=None) -> dict[str, float]:
    """The relative (Frobenius) error of each of :data:`PRODUCT_FORMS` at ``Precision.HIGHEST`` on ``device``
    against float64, for two ``n×n`` standard normal float32 matrices.

    Args:
      device: a JAX device of this process (default: its first).
      n: the matrices' size.
      product: ``product(dims) -> f(x, y)``, the product of each form (default: ``lax.dot_general`` at
        ``Precision.HIGHEST``, jitted).

    Returns:
      ``{form: relative error}``.
    """
    device = local_device(device)
    product = product or _product
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, n)).astype(np.float32)
    y = rng.standard_normal((n, n)).astype(np.float32)
    xd, yd = jax.device_put(x, device), jax.device_put(y, device)
    out = {}
    for name, dims in PRODUCT_FORMS.items():
        ref = float64_product(x, y, dims)
        got = np.asarray(product(dims)(xd, yd), np.float64)
        out[name] = float(np.linalg.norm(got - ref) / np.linalg.norm(ref))
    return out


_CHECKED: dict = {}


def local_device(devices=None):
    """``devices`` if it is one device, else the first of this process's devices among ``devices`` (e.g. a
    mesh's ``devices.flat``), else this process's first device."""
    if hasattr(devices, "platform"):
        return devices
    me = jax.process_index()
    return next((d for d in (devices if devices is not None else ()) if d.process_index == me),
                jax.local_devices()[0])


def check_float32_products(device=None, *, product=None, force: bool = False) -> dict[str, float] | None:
    """Warns (:class:`PrecisionWarning`) where a float32 product at ``Precision.HIGHEST`` on ``device`` is off by
    more than :data:`FLOAT32_PRODUCT_TOLERANCE` (:func:`float32_product_errors`), once per platform and device
    kind (later calls return the first result). CPU devices are not checked (``None``) unless ``force``.

    ``device``: one device, or devices (e.g. a mesh's ``devices.flat``) of which this process's first is
    measured (:func:`local_device`); default this process's first device.

    Returns:
      ``{form: relative error}``, or ``None`` where nothing was checked.
    """
    device = local_device(device)
    if device.platform == "cpu" and not force:
        return None
    key = (device.platform, getattr(device, "device_kind", ""))
    if key in _CHECKED and not force:
        return _CHECKED[key]
    errors = float32_product_errors(device, product=product)
    _CHECKED[key] = errors
    bad = {k: e for k, e in errors.items() if e > FLOAT32_PRODUCT_TOLERANCE}
    if bad:
        worst = max(bad, key=bad.get)
        hint = (" On NVIDIA GPUs, XLA_FLAGS=--xla_gpu_enable_triton_gemm=false (set before JAX starts) sends "
                "every product to cuBLAS." if device.platform in ("gpu", "cuda") else "")
        warnings.warn(
            f"float32 matrix products at Precision.HIGHEST on {key[1] or key[0]} are less accurate than float32: "
            f"{', '.join(f'{k} {e:.1e}' for k, e in bad.items())} relative error against float64 (float32: "
            f"~3e-7, worst form {worst}). The SVD, GPTQ and error tables lose accuracy with them (the kept σ "
            f"can be off by more than 1e-3).{hint}", PrecisionWarning, stacklevel=3)
    return errors
