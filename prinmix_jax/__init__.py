"""prinmix-jax: PrinMix delta compression of fine-tuned LLMs in JAX/Flax.

The public API is re-exported flat here.
"""
from prinmix_jax.allocation import (Allocation, allocate_bits, allocate_bits_global, index_cost_bits,
                                    milp_solvers_installed)
from prinmix_jax.compress import compress_matrix, compress_stack, error_tables, output_error
from prinmix_jax.config import METHODS, CompressionConfig
from prinmix_jax.core.error_table import error_table
from prinmix_jax.core.gptq import GPTQResult, gptq_quantize
from prinmix_jax.core.packing import pack_bits, packed_nbytes, unpack_bits
from prinmix_jax.core.quantizer import rtn_quantize
from prinmix_jax.core.rtc import rtc_target, u_hessian
from prinmix_jax.core.svd import svd_delta, svd_sharded
from prinmix_jax.formats import CompressedMatrix, LowRankDelta, SignDelta, SVDQuantDelta, from_state, to_state
from prinmix_jax.models import (BlockHessians, CalibrationDataError, CausalLM, CheckpointError, CheckpointReader, CheckpointWriter, HESSIAN_FOR_LINEAR, LINEAR_NAMES, ModelConfig, UnsupportedArchitectureError, block_forward, block_forward_with_hessians, collect_hessians, collect_hessians_sequential, get_linear, hf_name, iter_block_linears, linear_names, load_hf_model, load_hf_params, read_block, read_globals, save_hf_model, set_linear, tokenize_calibration)
from prinmix_jax.pipeline import ParamPolicy, compress_model
from prinmix_jax.storage import DeltaCheckpoint, load_delta
from prinmix_jax.apply import apply_delta, apply_delta_to_checkpoint, apply_delta_to_model, factored_linear
from prinmix_jax.evaluation import exact_match, greedy_generate, perplexity, token_metrics
from prinmix_jax.sft import SFTSettings, make_sft_pair
from prinmix_jax.demo import run_demo
