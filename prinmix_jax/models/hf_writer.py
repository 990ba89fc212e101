"""NNX param trees -> Hugging Face checkpoint folders, written tensor by tensor through safetensors.

Writing produces ``model.safetensors`` or, above ``max_shard_size``, ``model-0000k-of-0000n.safetensors``
shards plus ``model.safetensors.index.json``, and a config.json, in the layout ``transformers`` loads.
"""

from __future__ import annotations

import json
import os
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from prinmix_jax.models.checkpoint_files import (SAFE_INDEX, SAFE_SINGLE, SAFETENSORS_DTYPES, SHARD_RE,
                                                   TOKENIZER_FILES, numpy_dtype, rows_per_block)
from prinmix_jax.models.config import ModelConfig
from prinmix_jax.models.errors import CheckpointError
from prinmix_jax.models.llama import params as P
from prinmix_jax.models.llama.modeling import params_from_model

__all__ = ["CheckpointWriter", "save_hf_model", "parse_size"]


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string like "5GB", "200MB", "2GiB" (decimal and binary units)."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)\s*", str(size), re.IGNORECASE)
    if not m:
        raise ValueError(f"cannot parse size {size!r}; use bytes or e.g. '5GB', '500MB'")
    unit = m.group(2).upper()
    base = 1024 if "I" in unit else 1000
    power = {"B": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit[0]] if unit != "B" else 0
    return int(float(m.group(1)) * base ** power)


class CheckpointWriter:
    """Write a checkpoint tensor by tensor (or block by block), sharding above ``max_shard_size``.

    Each tensor goes to disk as it is added (into a temporary shard file whose header space is reserved
    and filled in when the shard is full), so no more than the tensor being added is held in host memory,
    whatever ``max_shard_size``. :meth:`close` checks that
    exactly the tensors of ``config`` were written, names the shards, writes the index (when sharded) and
    config.json. Stale ``model*.safetensors`` files and index in ``path`` are removed first, like
    ``save_pretrained`` does.

    Args:
      path: output folder (created).
      config: the model config written to config.json.
      dtype: cast every tensor to this dtype (default: keep); recorded in config.json.
      max_shard_size: bytes or a string like "5GB".
    """

    def __init__(self, path, config: ModelConfig, *, dtype=None, max_shard_size: int | str = "5GB"):
        self.path, self.config = os.fspath(path), config
        self.dtype = numpy_dtype(dtype)
        self.max_shard_size = parse_size(max_shard_size)
        os.makedirs(self.path, exist_ok=True)
        for n in os.listdir(self.path):
            if n in (SAFE_SINGLE, SAFE_INDEX) or SHARD_RE.match(n):
                os.remove(os.path.join(self.path, n))
        self._expected = P.expected_tensors(config)
        self._header_room = _header_room(self._expected)
        self._file = None                 # the open temporary shard, its entries and the bytes written to it
        self._entries: dict[str, tuple[str, tuple[int, ...], int, int]] = {}
        self._offset = 0
        self._shards: list[tuple[str, list[str]]] = []  # (temp file name, names)
        self._written: set[str] = set()
        self._dtypes: set[str] = set()
        self._total = 0

    def add(self, name: str, array, dtype=None) -> None:
        """Writes one tensor (HF name, HF layout) to the current shard file, starting a new shard when the size
        limit would be passed. It is stored in ``dtype`` if given, else in the writer's dtype if it has one, else
        in its own; a conversion is made a block of rows at a time (no converted copy of the whole tensor)."""
        arr = np.asarray(jax.device_get(array))
        dt = dtype if dtype is not None else self.dtype if self.dtype is not None else arr.dtype
        if arr.ndim == 0:
            self.add_rows(name, (), [arr], dt)
            return
        step = rows_per_block(arr.shape, arr.dtype)
        self.add_rows(name, arr.shape, (arr[a:a + step] for a in range(0, len(arr), step)), dt)

    def add_rows(self, name: str, shape, blocks, dtype=None) -> None:
        """Writes tensor ``name`` of ``shape`` from ``blocks``, consecutive blocks of its rows (first axis) made
        one at a time, stored in ``dtype``, else in the writer's dtype: the tensor need never be whole in memory.
        Too few or too many rows raise (the shard is then unusable: :meth:`abort`)."""
        shape = tuple(int(d) for d in shape)
        if name not in self._expected:
            raise CheckpointError(f"{self.path}: tensor {name!r} is not part of a {self.config.architecture} "
                                  f"with this config")
        if name in self._written or name in self._entries:
            raise CheckpointError(f"{self.path}: tensor {name!r} written twice")
        if shape != self._expected[name][1]:
            raise CheckpointError(f"{self.path}: tensor {name!r} has shape {shape}, config implies "
                                  f"{self._expected[name][1]}")
        out = numpy_dtype(dtype) if dtype is not None else self.dtype
        if out is None:
            raise ValueError(f"{name!r}: no dtype to store it in (the writer has none)")
        code = SAFETENSORS_DTYPES.get(jnp.dtype(out).name)
        if code is None:
            raise CheckpointError(f"{self.path}: tensor {name!r} has dtype {out}, which safetensors "
                                  "cannot store")
        nbytes = int(np.prod(shape, dtype=np.int64)) * out.itemsize
        if self._entries and self._offset + nbytes > self.max_shard_size:
            self._flush()
        if self._file is None:
            self._file = open(os.path.join(self.path, self._shard_name(len(self._shards))), "wb")
            self._file.seek(8 + self._header_room)
        le, written = out.newbyteorder("<"), 0
        for part in blocks:
            part = np.asarray(jax.device_get(part))
            if part.shape[1:] != shape[1:] or part.ndim != len(shape):
                raise CheckpointError(f"{self.path}: a block of {name!r} has shape {part.shape}, the tensor {shape}")
            raw = np.ascontiguousarray(part).astype(le, copy=False).reshape(-1)
            self._file.write(raw.view(np.uint8).data)
            written += raw.nbytes
        if written != nbytes:
            raise CheckpointError(f"{self.path}: {name!r} got {written} bytes of rows, its shape takes {nbytes}")
        self._entries[name] = (code, shape, self._offset, self._offset + nbytes)
        self._offset += nbytes
        self._dtypes.add(jnp.dtype(out).name)

    def add_block(self, block: int, block_params: dict) -> None:
        """Queue every tensor of one decoder block's param subtree."""
        for suffix, path, _ in P.block_param_table(self.config):
            self.add(f"model.layers.{block}.{suffix}", P.get_path(block_params, path))

    def add_globals(self, params: dict) -> None:
        """Queue the embedding, final norm and (untied) output head from a tree holding them."""
        for name, path, _ in P.global_param_table(self.config):
            self.add(name, P.get_path(params, path))

    @staticmethod
    def _shard_name(k: int) -> str:
        return f".tmp-shard-{k:05d}.safetensors"

    def _flush(self) -> None:
        """Finish the open shard: its header, space-padded to the reserved room (the format allows trailing
        spaces), goes in front of the tensors already written."""
        header = _header_json(self._entries)
        if len(header) > self._header_room:      # cannot happen: the room fits every expected tensor
            raise AssertionError(f"safetensors header of {len(header)} bytes over its room {self._header_room}")
        f, self._file = self._file, None
        try:
            f.seek(0)
            f.write(self._header_room.to_bytes(8, "little") + header + b" " * (self._header_room - len(header)))
        finally:
            f.close()
        self._shards.append((self._shard_name(len(self._shards)), list(self._entries)))
        self._written.update(self._entries)
        self._total += self._offset
        self._entries, self._offset = {}, 0

    def abort(self) -> None:
        """Close the open temporary shard without finishing it (after an error; the caller removes the
        folder)."""
        if self._file is not None:
            self._file.close()
            self._file = None

    def close(self, copy_from: str | None = None) -> None:
        """Finish the checkpoint: last shard, shard names, index.json, config.json.

        Args:
          copy_from: a checkpoint folder whose tokenizer/generation files (:data:`TOKENIZER_FILES`) are
            copied next to the weights.
        """
        if self._file is not None:
            self._flush()
        missing = sorted(set(self._expected) - self._written)
        if missing:
            raise CheckpointError(f"{self.path}: not written: {len(missing)} tensor(s), e.g. {missing[:5]}")
        n = len(self._shards)
        weight_map = {}
        for k, (tmp, names) in enumerate(self._shards):
            final = SAFE_SINGLE if n == 1 else f"model-{k + 1:05d}-of-{n:05d}.safetensors"
            os.replace(os.path.join(self.path, tmp), os.path.join(self.path, final))
            weight_map.update({nm: final for nm in names})
        if n > 1:
            index = {"metadata": {"total_size": self._total},
                     "weight_map": {k: weight_map[k] for k in sorted(weight_map)}}
            with open(os.path.join(self.path, SAFE_INDEX), "w", encoding="utf-8") as f:
                json.dump(index, f, indent=2)
        dtype = self._dtypes.pop() if len(self._dtypes) == 1 else None
        with open(os.path.join(self.path, "config.json"), "w", encoding="utf-8") as f:
            json.dump(self.config.to_hf_dict(dtype=dtype), f, indent=2, sort_keys=True)
        if copy_from and os.path.isdir(copy_from) and os.path.abspath(copy_from) != os.path.abspath(self.path):
            for fname in TOKENIZER_FILES:
                src = os.path.join(copy_from, fname)
                if os.path.isfile(src):
                    shutil.copyfile(src, os.path.join(self.path, fname))



def _header_json(entries: dict) -> bytes:
    """The safetensors header of ``{name: (dtype code, shape, begin, end)}``, compact JSON."""
    head = {"__metadata__": {"format": "pt"}}
    head.update({n: {"dtype": c, "shape": list(s), "data_offsets": [b, e]} for n, (c, s, b, e) in entries.items()})
    return json.dumps(head, separators=(",", ":")).encode()


def _header_room(expected: dict) -> int:
    """Bytes reserved for a shard's header: the header of every expected tensor with the longest dtype code
    and 20-digit offsets, rounded up to a multiple of 8 (the tensors then start 8-byte aligned)."""
    big = 10 ** 19
    n = len(_header_json({name: ("BOOL", shape, big, big) for name, (_, shape) in expected.items()}))
    return -(-n // 8) * 8


def save_hf_model(model_or_params, path: str | os.PathLike, config_from=None, *, dtype=None,
                  max_shard_size: int | str = "5GB") -> None:
    """Write a model or param tree as a Hugging Face checkpoint folder that ``transformers`` loads.

    Args:
      model_or_params: a :class:`~prinmix_jax.models.llama.modeling.CausalLM` or a param tree in its state layout.
      path: output folder.
      config_from: where config.json comes from: a checkpoint folder (its config.json is the template,
        so unknown keys survive, and its tokenizer/generation files are copied), a :class:`ModelConfig`,
        or a config.json dict. Default: ``model.config`` when a model is given.
      dtype: cast every tensor (e.g. ``jnp.bfloat16``); default keeps each array's dtype.
      max_shard_size: shard above this many bytes (int or "5GB"-style string).
    """
    copy_from = None
    if isinstance(config_from, (str, os.PathLike)):
        copy_from = os.fspath(config_from)
        cfg = ModelConfig.from_pretrained_dir(copy_from)
    elif isinstance(config_from, ModelConfig):
        cfg = config_from
    elif isinstance(config_from, dict):
        cfg = ModelConfig.from_hf_config(config_from, source="config_from")
    elif config_from is None and isinstance(model_or_params, nnx.Module):
        cfg = model_or_params.config
    else:
        raise ValueError("save_hf_model needs config_from (checkpoint folder, ModelConfig or config dict) "
                         "when given a param tree")
    params = params_from_model(model_or_params) if isinstance(model_or_params, nnx.Module) else model_or_params
    P.check_params(params, cfg)
    w = CheckpointWriter(path, cfg, dtype=dtype, max_shard_size=max_shard_size)
    w.add(P.global_param_table(cfg)[0][0], params["embed_tokens"]["weight"])
    for i in range(cfg.num_layers):
        w.add_block(i, params["layers"][i])
    for name, tree_path, _ in P.global_param_table(cfg)[1:]:
        w.add(name, P.get_path(params, tree_path))
    w.close(copy_from=copy_from)
