"""Flax NNX LLMs read from and written to Hugging Face checkpoint folders, and calibration Hessians.

Supported architectures: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM.

* :func:`load_hf_model` / :func:`load_hf_params` / :func:`read_block` read checkpoints (streamed);
  :func:`save_hf_model` / :class:`CheckpointWriter` write them.
* :func:`iter_block_linears`, :func:`get_linear`, :func:`set_linear`, :func:`hf_name` address the seven
  decoder-block linears as Hugging Face ``[out, in]`` matrices.
* :func:`tokenize_calibration`, :func:`collect_hessians` (parallel mode) and :func:`embed`,
  :func:`block_forward`, :func:`block_forward_with_hessians`, :func:`final_logits` (building blocks of the
  sequential mode) produce the per-layer input Hessians ``H = X Xᵀ / N``.
"""

from prinmix_jax.models.calibration import (
    HESSIAN_KEYS, BlockHessians, block_forward, block_forward_with_hessians, collect_hessians,
    collect_hessians_sequential, embed, final_logits, tokenize_calibration)
from prinmix_jax.models.config import SUPPORTED_ARCHITECTURES, ModelConfig, RopeConfig
from prinmix_jax.models.errors import CalibrationDataError, CheckpointError, UnsupportedArchitectureError
from prinmix_jax.models.hf_io import (
    CheckpointReader, CheckpointWriter, load_hf_model, load_hf_params, read_block, read_globals, save_hf_model)
from prinmix_jax.models.llama.modeling import CausalLM, layer_from_params, model_from_params, params_from_model
from prinmix_jax.models.llama.params import (
    HESSIAN_FOR_LINEAR, LINEAR_NAMES, check_params, get_linear, hf_name, iter_block_linears, linear_names,
    linear_path, set_linear)

__all__ = [
    "SUPPORTED_ARCHITECTURES", "ModelConfig", "RopeConfig",
    "CalibrationDataError", "CheckpointError", "UnsupportedArchitectureError",
    "CheckpointReader", "CheckpointWriter", "load_hf_model", "load_hf_params", "read_block", "read_globals",
    "save_hf_model",
    "CausalLM", "layer_from_params", "model_from_params", "params_from_model",
    "HESSIAN_FOR_LINEAR", "LINEAR_NAMES", "check_params", "get_linear", "hf_name", "iter_block_linears",
    "linear_names", "linear_path", "set_linear",
    "HESSIAN_KEYS", "BlockHessians", "block_forward", "block_forward_with_hessians", "collect_hessians",
    "collect_hessians_sequential", "embed", "final_logits", "tokenize_calibration",
]
