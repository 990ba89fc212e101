"""TPU readiness: every core program runs in float32 with ``jax_enable_x64`` off and lowers for TPU.

Each program (full, Gram and randomized truncated SVD, error table, GPTQ, the U-side estimate, RTC, packing, the
reconstruction and the error terms) is exported with :mod:`jax.export` for the ``tpu`` platform from this
CPU machine: an op with no TPU lowering (a LAPACK-only call, a host callback) fails the export. The
exported inputs and outputs are float32 or integer, and no float64 appears anywhere in the lowered module.
The programs are also run here on CPU with x64 off and their outputs' dtypes checked.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

from prinmix_jax.compress import compress_matrix
from prinmix_jax.config import CompressionConfig
from prinmix_jax.core.error_table import error_table, u_error_estimate
from prinmix_jax.core.gptq import gptq_quantize
from prinmix_jax.core.packing import pack_bits, unpack_bits
from prinmix_jax.core.rtc import h_times_vt, refit_sigma, rtc_target, u_hessian
from prinmix_jax.core.svd import gram_svd, thin_svd, truncated_svd
from prinmix_jax.methods.prinmix import _unwhiten, _whiten
from prinmix_jax.methods.shared import _energy, _error_terms, _factored_error_terms, delta_times_h
from prinmix_jax.synthetic import long_tailed_delta

M, N, K = 48, 64, 12
F32, I32 = jnp.float32, jnp.int32
GPTQ = dict(group_size=16, act_order=True, block_size=16, scale_dtype=jnp.float16)
# Host-side calls that only exist on CPU; none may appear in a program meant for TPU.
CPU_ONLY = ("lapack_", "cpu_callback", "xla_python", "host_callback")


def _programs():
    """``name -> (function, example float32/int arguments)``: the core programs as the library runs them."""
    d, h = long_tailed_delta(M, N, seed=3)
    v = np.linalg.svd(d, full_matrices=False)[2][:K].astype(np.float32)
    u = np.linalg.svd(d, full_matrices=False)[0][:, :K].astype(np.float32)
    s = np.linspace(2.0, 0.1, K).astype(np.float32)
    bits = np.full(K, 3, np.int32)
    valid = np.arange(K) < K - 2
    codes = np.arange(K * N, dtype=np.uint8).reshape(K, N) % 8
    return {
        "thin_svd": (thin_svd, (d,)),
        "truncated_svd": (functools.partial(truncated_svd, rank=K, oversample=6, iters=2), (d,)),
        "gram_svd": (functools.partial(gram_svd, rank=K), (d,)),
        "gram_svd_wide_vmapped": (jax.vmap(functools.partial(gram_svd, rank=K)), (np.stack([d.T, d.T]),)),
        "truncated_svd_vmapped": (jax.vmap(functools.partial(truncated_svd, rank=K, oversample=6, iters=2)),
                                  (np.stack([d, d]),)),
        "error_table": (functools.partial(error_table, widths=(0, 2, 3, 4, 8), **GPTQ), (v, s, h, np.float32(0.01))),
        "gptq_rows": (functools.partial(gptq_quantize, scale_axis="row", **GPTQ), (v, h, bits, np.float32(0.01))),
        "gptq_cols": (functools.partial(gptq_quantize, scale_axis="col", **GPTQ),
                      (u, np.eye(K, dtype=np.float32), bits, np.float32(0.01))),
        "u_error_estimate": (functools.partial(u_error_estimate, widths=(0, 2, 3, 4, 8), group_size=16,
                                               scale_dtype=jnp.float16), (u, s)),
        "error_table_mse": (functools.partial(error_table, widths=(0, 1, 2, 3, 8), grid="mse", **GPTQ),
                            (v, s, h, np.float32(0.01))),
        "gptq_cols_mse": (functools.partial(gptq_quantize, scale_axis="col", grid="mse", **GPTQ),
                          (u, np.eye(K, dtype=np.float32), np.full(K, 1, np.int32), np.float32(0.01))),
        "u_error_estimate_mse": (functools.partial(u_error_estimate, widths=(0, 1, 2, 8), group_size=16,
                                                   scale_dtype=jnp.float16, grid="mse"), (u, s)),
        "refit_sigma": (refit_sigma, (d, h, u, v, s, valid)),
        "whiten": (_whiten, (d, h, np.float32(0.01))),
        "unwhiten": (_unwhiten, (v, np.linalg.cholesky(h).astype(np.float32), np.float32(1))),
        "rtc_target": (rtc_target, (d, h, v, s, np.float32(1e-4), valid)),
        "u_hessian": (u_hessian, (v, s, h, valid)),
        "pack_bits": (functools.partial(pack_bits, bits=3), (codes,)),
        "unpack_bits": (functools.partial(unpack_bits, bits=3, length=N), (np.asarray(pack_bits(codes, 3)),)),
        "error_terms": (_error_terms, (d, d * 0.5, h)),
        "factored_error_terms": (_factored_error_terms, (d, u, s, v, h)),
        "factored_error_terms_given_products": (_factored_error_terms, (d, u, s, v, h, d @ h, h @ v.T)),
        "h_times_vt": (h_times_vt, (h, v)),
        "delta_times_h": (delta_times_h, (d, h)),
        "rtc_target_given_hv": (rtc_target, (d, h, v, s, np.float32(1e-4), valid, h @ v.T)),
        "energy": (_energy, (d, h, np.float32(1))),
    }


def _ok_dtype(dt) -> bool:
    dt = np.dtype(dt)
    return dt == np.float32 or dt == np.float16 or np.issubdtype(dt, np.integer) or dt == np.bool_


def _leaves(x):
    return jax.tree.leaves(x)


@pytest.mark.parametrize("name", sorted(_programs()))
def test_program_is_float32_and_lowers_for_tpu(name):
    fn, args = _programs()[name]
    with jax.enable_x64(False):
        assert not jax.config.jax_enable_x64
        for a in args:
            assert _ok_dtype(np.asarray(a).dtype), (name, np.asarray(a).dtype)
        out = jax.jit(fn)(*args)                           # runs here (CPU), x64 off
        for leaf in _leaves(out):
            assert _ok_dtype(leaf.dtype), (name, leaf.dtype)
            if np.issubdtype(leaf.dtype, np.floating):
                assert np.all(np.isfinite(np.asarray(leaf))), name
        specs = [jax.ShapeDtypeStruct(np.shape(a), np.asarray(a).dtype) for a in args]
        exp = export.export(jax.jit(fn), platforms=("tpu",))(*specs)    # fails on an op with no TPU lowering
    for aval in list(exp.in_avals) + list(exp.out_avals):
        assert _ok_dtype(aval.dtype), (name, aval.dtype)
    text = exp.mlir_module()
    assert "f64" not in text, f"{name}: float64 in the TPU program"
    for marker in CPU_ONLY:
        assert marker not in text, f"{name}: CPU-only call {marker!r} in the TPU program"


def test_the_checks_catch_float64_and_cpu_only_calls():
    """The assertions above can fail: a float64 program and a LAPACK call are caught."""
    d = np.ones((8, 8), np.float32)
    with jax.enable_x64(True):
        text = export.export(jax.jit(lambda x: x.astype(jnp.float64) * 2), platforms=("tpu",))(
            jax.ShapeDtypeStruct((8, 8), np.float32)).mlir_module()
    assert "f64" in text
    cpu_text = export.export(jax.jit(thin_svd), platforms=("cpu",))(
        jax.ShapeDtypeStruct((8, 8), np.float32)).mlir_module()
    assert any(marker in cpu_text for marker in CPU_ONLY)
    with pytest.raises(Exception):
        export.export(jax.jit(lambda x: jax.pure_callback(np.sin, jax.ShapeDtypeStruct(x.shape, x.dtype), x)),
                      platforms=("tpu",))(jax.ShapeDtypeStruct((8, 8), np.float32))
    assert d.dtype == np.float32


def test_compress_matrix_with_x64_off_truncated_and_full():
    """The whole path (SVD, tables, ILP, GPTQ, RTC, packing) with x64 off: float32/int arrays out."""
    d, h = long_tailed_delta(64, 128, seed=1)
    with jax.enable_x64(False):
        for svd in ("full", "gram", "truncated"):
            cm, info = compress_matrix(d, h, CompressionConfig(group_size=32, svd=svd), return_info=True)
            for leaf in _leaves(cm):
                assert _ok_dtype(leaf.dtype), (svd, leaf.dtype)
            assert np.asarray(cm.reconstruct()).dtype == np.float32
            assert 0 < info["rel_output_error"] < 1
            assert (info["svd_rank"] < 64) == (svd != "full")
