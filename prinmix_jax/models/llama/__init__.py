"""Llama-architecture decoder (Llama 2/3/3.1+, Mistral, Qwen2/2.5, Qwen3): NNX modules and the HF key map."""

from prinmix_jax.models.llama.modeling import (
    CausalLM, DecoderLayer, layer_from_params, model_from_params, params_from_model)
from prinmix_jax.models.llama.params import (
    HESSIAN_FOR_LINEAR, LINEAR_NAMES, get_linear, hf_name, iter_block_linears, linear_names, linear_path,
    set_linear)

__all__ = ["CausalLM", "DecoderLayer", "layer_from_params", "model_from_params", "params_from_model",
           "HESSIAN_FOR_LINEAR", "LINEAR_NAMES", "get_linear", "hf_name", "iter_block_linears", "linear_names",
           "linear_path", "set_linear"]
