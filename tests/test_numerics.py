"""The float32 product check (core/numerics.py): float32 products pass, and products at TF32 or bfloat16
precision, as a backend could compute them despite ``Precision.HIGHEST``, are caught and named. The tests run
on JAX's default device (on a GPU, the first test is the check itself, held as a test)."""
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prinmix_jax.core import numerics
from prinmix_jax.core.numerics import (FLOAT32_PRODUCT_TOLERANCE, PRODUCT_FORMS, PrecisionWarning,
                                       check_float32_products, float32_product_errors, float64_product, product_form)



def _rounded_product(mantissa_bits: int, forms):
    """Products with both operands rounded to ``mantissa_bits`` (TF32: 10, bfloat16: 7) in ``forms`` only."""
    def product(dims):
        bits = mantissa_bits if dims in forms else 23

        def f(x, y):
            x, y = (jax.lax.reduce_precision(t, exponent_bits=8, mantissa_bits=bits) for t in (x, y))
            return product_form(dims)(x, y)
        return f
    return product


@pytest.fixture(autouse=True)
def _fresh_checks(monkeypatch):
    monkeypatch.setattr(numerics, "_CHECKED", {})


def _cpu():
    try:
        return jax.devices("cpu")[0]
    except RuntimeError:           # JAX_PLATFORMS without cpu
        pytest.skip("no CPU backend")


def test_float32_products_pass_and_every_form_is_measured():
    device = jax.local_devices()[0]
    errors = float32_product_errors(device)
    assert set(errors) == set(PRODUCT_FORMS)
    assert all(0 < e < FLOAT32_PRODUCT_TOLERANCE / 3 for e in errors.values()), errors
    with warnings.catch_warnings():
        warnings.simplefilter("error", PrecisionWarning)
        assert check_float32_products(device, force=True) == pytest.approx(errors)


def test_the_forms_are_the_products_they_name():
    """Each form's reference is its own product: a transposition mixed up would show as an O(1) error."""
    rng = np.random.default_rng(1)
    x, y = (rng.standard_normal((16, 16)).astype(np.float32) for _ in range(2))
    refs = {"A B": x @ y, "Aᵀ B": x.T @ y, "A Bᵀ": x @ y.T, "Aᵀ Bᵀ": x.T @ y.T}
    for name, dims in PRODUCT_FORMS.items():
        got = product_form(dims)(jnp.asarray(x), jnp.asarray(y))
        np.testing.assert_allclose(np.asarray(got), refs[name], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(float64_product(x, y, dims), refs[name], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bits,forms", [(10, {(0, 0)}), (7, set(PRODUCT_FORMS.values())), (10, {(0, 1), (1, 1)})])
def test_reduced_precision_products_warn_and_name_their_forms(bits, forms):
    with pytest.warns(PrecisionWarning) as caught:
        errors = check_float32_products(jax.local_devices()[0], product=_rounded_product(bits, forms), force=True)
    bad = {n for n, d in PRODUCT_FORMS.items() if d in forms}
    assert {n for n, e in errors.items() if e > FLOAT32_PRODUCT_TOLERANCE} == bad
    assert min(errors[n] for n in bad) > 50 * FLOAT32_PRODUCT_TOLERANCE       # TF32 ~3e-4, bf16 ~2e-3
    message = str(caught[0].message)
    assert all(n in message for n in bad) and "Precision.HIGHEST" in message


def test_checked_once_per_device_kind_and_never_on_the_cpu(monkeypatch):
    cpu = _cpu()
    assert check_float32_products(cpu) is None and numerics._CHECKED == {}
    calls = []

    def counting(dims):
        calls.append(dims)
        return _rounded_product(10, {(0, 0)})(dims)

    class Accelerator:          # an accelerator's identity (platform, kind) on the CPU's arrays
        platform, device_kind = "gpu", "test accelerator"

    monkeypatch.setattr(numerics.jax, "device_put", lambda x, device: jnp.asarray(x))
    with pytest.warns(PrecisionWarning, match="xla_gpu_enable_triton_gemm"):
        first = check_float32_products(Accelerator(), product=counting)
    with warnings.catch_warnings():
        warnings.simplefilter("error", PrecisionWarning)
        assert check_float32_products(Accelerator(), product=counting) is first
    assert len(calls) == len(PRODUCT_FORMS)


def test_the_svd_checks_its_device_before_computing(monkeypatch):
    from prinmix_jax.core import svd

    seen = []
    monkeypatch.setattr(svd, "check_float32_products", lambda devices=None: seen.append(numerics.local_device(devices)))
    d = np.random.default_rng(0).standard_normal((3, 32, 16)).astype(np.float32)
    svd.svd_sharded(d, rank=4)
    svd.svd_delta(d[0], 4)
    svd.prefetch_svds([(("a", "b", "c"), d, {"rank": 4})])
    assert seen == [jax.local_devices()[0]] * 3


@pytest.mark.eight_devices
def test_the_device_checked_is_this_processes_own():
    class Remote:
        platform, process_index = "gpu", jax.process_index() + 1

    devices = jax.local_devices()
    assert numerics.local_device(devices[3]) is devices[3]
    assert numerics.local_device([Remote(), devices[2], devices[1]]) is devices[2]
    assert numerics.local_device([Remote()]) is devices[0] and numerics.local_device() is devices[0]
