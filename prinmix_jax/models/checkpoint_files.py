"""File names and storage dtypes of a Hugging Face checkpoint folder, shared by the reader, the writer
and the calibration-data loader."""

from __future__ import annotations

import re

import jax.numpy as jnp
import ml_dtypes  # noqa: F401  (registers bfloat16 with NumPy, which safetensors' numpy backend needs)
import numpy as np

__all__ = ["SAFE_SINGLE", "SAFE_INDEX", "SHARD_RE", "TOKENIZER_CORE_FILES", "TOKENIZER_FILES", "numpy_dtype"]

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
