"""File names and storage dtypes of a Hugging Face checkpoint folder, shared by the reader, the writer
and the calibration-data loader."""

from __future__ import annotations

import re

import jax.numpy as jnp
import ml_dtypes  # noqa: F401  (registers bfloat16 with NumPy, which safetensors' numpy backend needs)
import numpy as np

__all__ = ["SAFE_SINGLE", "SAFE_INDEX", "SHARD_RE", "TOKENIZER_CORE_FILES", "TOKENIZER_FILES", "numpy_dtype",
           "SAFETENSORS_DTYPES", "READ_BLOCK_BYTES", "rows_per_block"]

SAFE_SINGLE = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
#: Names of the shards of a sharded checkpoint (``model-00001-of-00003.safetensors``).
SHARD_RE = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")
#: Files that each define a tokenizer: a folder holding none of them has no tokenizer.
TOKENIZER_CORE_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
#: Non-weight files copied next to a saved checkpoint from its source folder: the tokenizer's files and
#: the generation config.
TOKENIZER_FILES = TOKENIZER_CORE_FILES + ("special_tokens_map.json", "merges.txt", "added_tokens.json",
                                          "chat_template.jinja", "chat_template.json", "generation_config.json")


def numpy_dtype(dtype) -> np.dtype | None:
    """The NumPy dtype of a JAX/NumPy dtype (or name); None stays None (keep the stored dtype)."""
    return None if dtype is None else np.dtype(jnp.dtype(dtype))


#: NumPy dtype name -> safetensors dtype code.
SAFETENSORS_DTYPES = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16", "int64": "I64",
                      "uint64": "U64", "int32": "I32", "uint32": "U32", "int16": "I16", "uint16": "U16",
                      "int8": "I8", "uint8": "U8", "bool": "BOOL"}
#: Bytes of a tensor converted at a time between its stored dtype and another (reading and writing).
READ_BLOCK_BYTES = 64 << 20


def rows_per_block(shape, dtype) -> int:
    """Rows (first axis) of a tensor of ``shape`` in ``dtype`` that hold about :data:`READ_BLOCK_BYTES`, at least
    one: what is converted at a time."""
    row = int(np.prod(shape[1:], dtype=np.int64)) * np.dtype(dtype).itemsize
    return max(1, READ_BLOCK_BYTES // max(1, row))
