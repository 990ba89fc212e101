"""prinmix-jax: PrinMix delta compression of fine-tuned LLMs in JAX/Flax.

The public API is re-exported flat here. The names are imported on first use (PEP 562), so that
``import prinmix_jax`` and the ``prinmix`` command line start without loading JAX, CVXPY and the models.
"""
from __future__ import annotations

import importlib

#: Public name -> the module that defines it.
_EXPORTS = {
    **dict.fromkeys(['Allocation', 'allocate_bits', 'allocate_bits_global', 'index_cost_bits', 'milp_solvers_installed'], "prinmix_jax.allocation"),
    **dict.fromkeys(['compress_matrix', 'compress_stack', 'error_tables', 'output_error'], "prinmix_jax.compress"),
    **dict.fromkeys(['METHODS', 'CompressionConfig'], "prinmix_jax.config"),
    **dict.fromkeys(['error_table'], "prinmix_jax.core.error_table"),
    **dict.fromkeys(['GPTQResult', 'gptq_quantize'], "prinmix_jax.core.gptq"),
    **dict.fromkeys(['PrecisionWarning', 'check_float32_products', 'float32_product_errors'], "prinmix_jax.core.numerics"),
    **dict.fromkeys(['pack_bits', 'packed_nbytes', 'unpack_bits'], "prinmix_jax.core.packing"),
    **dict.fromkeys(['rtn_quantize'], "prinmix_jax.core.quantizer"),
    **dict.fromkeys(['rtc_target', 'u_hessian'], "prinmix_jax.core.rtc"),
    **dict.fromkeys(['svd_delta', 'svd_sharded'], "prinmix_jax.core.svd"),
    **dict.fromkeys(['CompressedMatrix', 'LowRankDelta', 'SignDelta', 'SVDQuantDelta', 'from_state', 'to_state'], "prinmix_jax.formats"),
    **dict.fromkeys(['BlockHessians', 'CalibrationDataError', 'CausalLM', 'CheckpointError', 'CheckpointReader', 'CheckpointWriter', 'HESSIAN_FOR_LINEAR', 'LINEAR_NAMES', 'ModelConfig', 'UnsupportedArchitectureError', 'block_forward', 'block_forward_with_hessians', 'collect_hessians', 'collect_hessians_sequential', 'get_linear', 'hf_name', 'iter_block_linears', 'linear_names', 'load_hf_model', 'load_hf_params', 'read_block', 'read_globals', 'save_hf_model', 'set_linear', 'tokenize_calibration'], "prinmix_jax.models"),
    **dict.fromkeys(['ParamPolicy', 'compress_model'], "prinmix_jax.pipeline"),
    **dict.fromkeys(['DeltaCheckpoint', 'load_delta'], "prinmix_jax.storage"),
    **dict.fromkeys(['apply_delta', 'apply_delta_to_checkpoint', 'apply_delta_to_model', 'factored_linear'], "prinmix_jax.apply"),
    **dict.fromkeys(['distill_delta'], "prinmix_jax.distill"),
    **dict.fromkeys(['exact_match', 'greedy_generate', 'perplexity', 'token_metrics'], "prinmix_jax.evaluation"),
    **dict.fromkeys(['SFTSettings', 'make_sft_family', 'make_sft_pair'], "prinmix_jax.sft"),
    **dict.fromkeys(['run_demo'], "prinmix_jax.demo"),
    **dict.fromkeys(['DeltaBank', 'SlotCapacityError', 'UnsupportedDeltaError'], "prinmix_jax.serving"),
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'prinmix_jax' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
