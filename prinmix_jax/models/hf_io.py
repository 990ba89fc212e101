"""Hugging Face checkpoint folders -> NNX param trees, streamed tensor by tensor through safetensors.

Reading never builds a whole-model copy besides the returned params: each tensor is read from the
memory-mapped safetensors file, cast, moved to the device and released before the next one. Sharded
checkpoints (``model.safetensors.index.json``) are handled; pickle-based ``*.bin`` checkpoints are refused.

Writing (:class:`CheckpointWriter`, :func:`save_hf_model`) lives in :mod:`prinmix_jax.models.hf_writer`
and is re-exported here.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax.numpy as jnp
import numpy as np
from safetensors import safe_open

from prinmix_jax.models.checkpoint_files import (SAFE_INDEX, SAFE_SINGLE, SAFETENSORS_DTYPES, TOKENIZER_FILES,
                                                   numpy_dtype, rows_per_block)
from prinmix_jax.models.config import ModelConfig
from prinmix_jax.models.errors import CheckpointError
from prinmix_jax.models.hf_writer import CheckpointWriter, parse_size, save_hf_model
from prinmix_jax.models.llama import params as P
from prinmix_jax.models.llama.modeling import CausalLM, model_from_params

__all__ = ["CheckpointReader", "CheckpointWriter", "load_hf_params", "load_hf_model", "read_block",
           "read_globals", "save_hf_model", "parse_size", "TOKENIZER_FILES"]

_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # non-persistent buffers some old checkpoints carry
_FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}
_DTYPE_OF_CODE = {code: np.dtype(name) for name, code in SAFETENSORS_DTYPES.items()}


class CheckpointReader:
    """Random access to the tensors of a Hugging Face checkpoint folder.

    Opening reads config.json and every safetensors header (no tensor data) and checks that the set of
    tensors and their shapes agree with the config. Keep one reader to stream a checkpoint block by block.

    Args:
      path: checkpoint folder (config.json + model.safetensors or sharded files + index.json).

    Raises:
      FileNotFoundError: missing folder, config.json or a shard named by the index.
      CheckpointError: corrupt safetensors/index, missing/extra tensors, wrong shapes, non-float dtypes.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        if not os.path.isdir(self.path):
            what = "is a file, not a folder" if os.path.exists(self.path) else "does not exist"
            raise FileNotFoundError(f"checkpoint folder {self.path!r} {what}")
        self.config = ModelConfig.from_pretrained_dir(self.path)
        self._handles: dict[str, Any] = {}
        self._layouts: dict[str, dict] = {}
        self._where = self._locate_tensors()
        self.expected = P.expected_tensors(self.config)
        self._validate()

    # ----- discovery ----------------------------------------------------------------------
    def _open(self, fname: str):
        if fname not in self._handles:
            full = os.path.join(self.path, fname)
            if not os.path.isfile(full):
                raise FileNotFoundError(f"safetensors file {full!r} (named by {SAFE_INDEX}) does not exist")
            try:
                self._handles[fname] = safe_open(full, framework="numpy")
            except Exception as e:  # SafetensorError, OSError
                raise CheckpointError(f"{full}: not a valid safetensors file ({e})") from e
        return self._handles[fname]

    def _locate_tensors(self) -> dict[str, str]:
        index = os.path.join(self.path, SAFE_INDEX)
        if os.path.isfile(os.path.join(self.path, SAFE_SINGLE)):
            f = self._open(SAFE_SINGLE)
            return {k: SAFE_SINGLE for k in f.keys()}
        if os.path.isfile(index):
            try:
                with open(index, encoding="utf-8") as fh:
                    weight_map = json.load(fh)["weight_map"]
                assert isinstance(weight_map, dict)
            except (json.JSONDecodeError, KeyError, TypeError, AssertionError, UnicodeDecodeError) as e:
                raise CheckpointError(f"{index}: not a valid safetensors index (needs a 'weight_map' object)") from e
            where: dict[str, str] = {}
            for fname in sorted(set(weight_map.values())):
                keys = set(self._open(fname).keys())
                listed = {k for k, v in weight_map.items() if v == fname}
                if listed - keys:
                    raise CheckpointError(f"{os.path.join(self.path, fname)} lacks tensor(s) "
                                          f"{sorted(listed - keys)[:5]} that {SAFE_INDEX} places there")
                for k in keys:
                    if k in where:
                        raise CheckpointError(f"tensor {k!r} is stored twice: in {where[k]} and {fname}")
                    where[k] = fname
            return where
        others = sorted(os.listdir(self.path))
        if any(n.endswith((".bin", ".pt", ".pth")) for n in others):
            raise CheckpointError(f"{self.path}: only safetensors checkpoints are supported (found pickle-based "
                                  f"weights; convert them with save_pretrained(safe_serialization=True))")
        raise FileNotFoundError(f"{self.path}: no {SAFE_SINGLE} or {SAFE_INDEX} found (files: {others[:10]})")

    def _validate(self) -> None:
        cfg, present = self.config, set(self._where)
        expected = set(self.expected)
        ignored = {n for n in present if n.endswith(_IGNORED_SUFFIXES)}
        if cfg.tie_word_embeddings and "lm_head.weight" in present:
            ignored.add("lm_head.weight")  # redundant copy of a tied head; checked equal when loading
        missing = sorted(expected - present)
        if missing:
            raise CheckpointError(f"{self.path}: checkpoint lacks {len(missing)} tensor(s) that config.json "
                                  f"({cfg.architecture}) requires, e.g. {missing[:5]}")
        extra = sorted(present - expected - ignored)
        if extra:
            where = sorted({self._where[n] for n in extra})
            raise CheckpointError(f"{self.path}: unexpected tensor(s) {extra[:5]} in {where} (not part of a "
                                  f"{cfg.architecture} with this config.json)")
        for name in sorted(expected):
            sl = self._open(self._where[name]).get_slice(name)
            shape, dt = tuple(sl.get_shape()), sl.get_dtype()
            want = self.expected[name][1]
            if shape != want:
                raise CheckpointError(f"{os.path.join(self.path, self._where[name])}: tensor {name!r} has shape "
                                      f"{shape} but config.json implies {want}")
            if dt not in _FLOAT_DTYPES:
                raise CheckpointError(f"{os.path.join(self.path, self._where[name])}: tensor {name!r} has "
                                      f"dtype {dt}; expected a floating type")

    # ----- access -------------------------------------------------------------------------
    def names(self) -> list[str]:
        """All tensor names stored in the checkpoint."""
        return sorted(self._where)

    def file_of(self, name: str) -> str:
        """Full path of the safetensors file that holds tensor ``name``."""
        if name not in self._where:
            raise CheckpointError(f"{self.path}: no tensor named {name!r}")
        return os.path.join(self.path, self._where[name])

    def tensor_header(self, name: str) -> tuple[tuple[int, ...], str]:
        """``(shape, stored dtype)`` of tensor ``name`` as its safetensors header gives them (e.g. ``"BF16"``);
        reads no tensor data."""
        sl = self._open(os.path.basename(self.file_of(name))).get_slice(name)
        return tuple(sl.get_shape()), sl.get_dtype()

    def read(self, name: str, dtype=None) -> np.ndarray:
        """Read one tensor into host memory as a NumPy array, optionally cast to ``dtype``.

        With ``dtype`` the result is a new writeable array, filled a block of rows at a time by plain file reads
        (:func:`~prinmix_jax.models.checkpoint_files.rows_per_block`): the tensor is never whole in its stored
        dtype beside it, neither as an array nor as memory-mapped pages, which count towards the process's
        resident memory (1 GB for a 128256x4096 bf16 embedding read as float32)."""
        f = self._open(os.path.basename(self.file_of(name)))
        dt = numpy_dtype(dtype)
        try:
            if dt is None:
                return f.get_tensor(name)
            return self._read_converted(name, dt)
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"{self.file_of(name)}: cannot read tensor {name!r} ({e})") from e

    def _read_converted(self, name: str, dt: np.dtype) -> np.ndarray:
        shape, stored, _, _ = self._entry(name)
        if not shape:
            return np.asarray(self._open(self._where[name]).get_tensor(name), dt).copy()
        out = np.empty(shape, dt)
        step = rows_per_block(shape, stored)
        for a in range(0, shape[0], step):
            self.read_rows(name, a, min(a + step, shape[0]), dt, out=out[a:a + step])
        return out

    def read_rows(self, name: str, start: int, stop: int, dtype=None, *, out=None) -> np.ndarray:
        """Rows ``start:stop`` (first axis) of tensor ``name`` by a plain file read (no memory map), in ``dtype``
        (default: the stored one), as a new array or written into ``out``."""
        shape, stored, begin, end = self._entry(name)
        if not shape or not 0 <= start <= stop <= shape[0]:
            raise ValueError(f"rows {start}:{stop} of tensor {name!r} of shape {shape}")
        row = int(np.prod(shape[1:], dtype=np.int64)) * stored.itemsize
        if shape[0] * row != end - begin:
            raise CheckpointError(f"{self.file_of(name)}: tensor {name!r} holds {end - begin} bytes, its shape "
                                  f"{shape} and dtype {stored} {shape[0] * row}")
        buf = np.empty((stop - start,) + tuple(shape[1:]), stored.newbyteorder("<"))
        raw = buf.reshape(-1).view(np.uint8)
        with open(self.file_of(name), "rb") as fh:
            fh.seek(begin + start * row)
            if fh.readinto(raw) != raw.size:
                raise CheckpointError(f"{self.file_of(name)}: tensor {name!r} is cut short")
        if out is not None:
            out[...] = buf
            return out
        dt = numpy_dtype(dtype)
        return buf if dt is None or dt == buf.dtype else buf.astype(dt)

    def _entry(self, name: str) -> tuple[tuple[int, ...], np.dtype, int, int]:
        """``(shape, stored dtype, begin, end)`` of tensor ``name``, its data's absolute byte offsets, from its
        file's header (parsed once per file; safetensors validated it when the reader opened the file)."""
        fname = self._where[name]
        if fname not in self._layouts:
            with open(os.path.join(self.path, fname), "rb") as fh:
                n = int.from_bytes(fh.read(8), "little")
                head = json.loads(fh.read(n))
            self._layouts[fname] = {k: (tuple(v["shape"]), v["dtype"], 8 + n + v["data_offsets"][0],
                                        8 + n + v["data_offsets"][1]) for k, v in head.items() if k != "__metadata__"}
        shape, code, begin, end = self._layouts[fname][name]
        if code not in _DTYPE_OF_CODE:
            raise CheckpointError(f"{self.file_of(name)}: tensor {name!r} has dtype {code}, which this reader "
                                  "cannot convert")
        return shape, _DTYPE_OF_CODE[code], begin, end

    def stored_dtype(self, name: str) -> np.dtype:
        """The NumPy dtype tensor ``name`` is stored in (from its header)."""
        return self._entry(name)[1]

    def _read_into(self, rows, dtype, device_put: bool) -> dict:
        tree: dict = {}
        for name, path in rows:
            arr = self.read(name, dtype)
            P.put_path(tree, path, jnp.asarray(arr) if device_put else arr)
            del arr
        return tree

    def read_block(self, block: int, dtype=None, *, device_put: bool = True) -> dict:
        """The param subtree of decoder block ``block`` (the layout of ``params["layers"][block]``).

        Args:
          block: 0 <= block < num_layers.
          dtype: cast every tensor to this dtype (default: keep the stored dtype).
          device_put: return jax arrays (default) or NumPy arrays.
        """
        return self._read_into(self.block_rows(block), dtype, device_put)

    def block_rows(self, block: int) -> list[tuple[str, tuple]]:
        """``(tensor name, path in the block's param subtree)`` of every tensor of decoder block ``block``."""
        if not 0 <= block < self.config.num_layers:
            raise ValueError(f"block {block} out of range: the checkpoint has {self.config.num_layers} blocks")
        return [(f"model.layers.{block}.{s}", p) for s, p, _ in P.block_param_table(self.config)]

    def read_globals(self, dtype=None, *, device_put: bool = True) -> dict:
        """The params outside the blocks: ``{"embed_tokens", "norm"[, "lm_head"]}``."""
        tree: dict = {}
        for _, path, _ in P.global_param_table(self.config):
            arr = self.read_global(path, dtype)
            tree.setdefault(path[0], {})[path[1]] = jnp.asarray(arr) if device_put else arr
            del arr
        return tree

    def read_global(self, path: tuple, dtype=None) -> np.ndarray:
        """One param outside the blocks by its tree path (``("embed_tokens", "weight")``), as NumPy.

        With tied embeddings, a stored ``lm_head.weight`` must equal the embedding it is tied to."""
        names = {p: n for n, p, _ in P.global_param_table(self.config)}
        if tuple(path) not in names:
            raise ValueError(f"no param {'/'.join(map(str, path))} outside the blocks (have: "
                             f"{', '.join('/'.join(p) for p in names)})")
        arr = self.read(names[tuple(path)], dtype)
        if tuple(path) == ("embed_tokens", "weight"):
            self.check_tied_rows(0, len(arr), arr)
        return arr

    def check_tied_rows(self, start: int, stop: int, rows) -> None:
        """With ``tie_word_embeddings`` and a stored ``lm_head.weight``, its rows ``start:stop`` must equal
        ``rows``, the embedding's (any dtype the stored values convert to exactly); raises otherwise."""
        if not (self.config.tie_word_embeddings and "lm_head.weight" in self._where):
            return
        if not np.array_equal(self.read_rows("lm_head.weight", start, stop, np.asarray(rows).dtype), rows):
            raise CheckpointError(f"{self.file_of('lm_head.weight')}: tie_word_embeddings is true but "
                                  "'lm_head.weight' differs from 'model.embed_tokens.weight'")

    def read_params(self, dtype=None, *, device_put: bool = True) -> dict:
        """The whole param tree (see :mod:`prinmix_jax.models.llama.params` for the layout)."""
        tree = self.read_globals(dtype, device_put=device_put)
        tree["layers"] = {i: self.read_block(i, dtype, device_put=device_put)
                          for i in range(self.config.num_layers)}
        return tree

    def close(self) -> None:
        """Drop the open file handles (memory maps)."""
        self._handles.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def load_hf_params(path: str | os.PathLike, dtype=None, *, device_put: bool = True) -> dict:
    """Read a checkpoint folder into a plain param tree without building a model.

    Args:
      path: Hugging Face checkpoint folder.
      dtype: cast every tensor to this dtype (e.g. ``jnp.float32``); default keeps the stored dtype.
      device_put: jax arrays on the default device (default) or host NumPy arrays.

    Returns:
      Nested dict in the NNX state layout of :class:`CausalLM` (int keys under ``"layers"``).
    """
    with CheckpointReader(path) as r:
        return r.read_params(dtype, device_put=device_put)


def read_block(path_or_reader, block: int, dtype=None, *, device_put: bool = True) -> dict:
    """One decoder block's tensors; see :meth:`CheckpointReader.read_block`.

    Pass a :class:`CheckpointReader` to stream many blocks without re-reading the headers.
    """
    if isinstance(path_or_reader, CheckpointReader):
        return path_or_reader.read_block(block, dtype, device_put=device_put)
    with CheckpointReader(path_or_reader) as r:
        return r.read_block(block, dtype, device_put=device_put)


def read_globals(path_or_reader, dtype=None, *, device_put: bool = True) -> dict:
    """The embedding, final norm and (untied) output head; see :meth:`CheckpointReader.read_globals`."""
    if isinstance(path_or_reader, CheckpointReader):
        return path_or_reader.read_globals(dtype, device_put=device_put)
    with CheckpointReader(path_or_reader) as r:
        return r.read_globals(dtype, device_put=device_put)


def load_hf_model(path: str | os.PathLike, dtype=None) -> CausalLM:
    """Load a Hugging Face checkpoint folder as a Flax NNX :class:`CausalLM`.

    Args:
      path: folder with config.json and safetensors weights (single file or sharded with index.json).
      dtype: parameter (and activation) dtype, e.g. ``jnp.float32`` or ``jnp.bfloat16``; default keeps
        the checkpoint's dtype.

    Returns:
      The model, with ``model.config`` the :class:`ModelConfig` read from config.json.
    """
    with CheckpointReader(path) as r:
        return model_from_params(r.config, r.read_params(dtype))
