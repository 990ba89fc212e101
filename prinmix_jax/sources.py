"""Model sources for compression: a checkpoint folder, a ``CheckpointReader``, an NNX model or a param tree,
read one step at a time (the globals, or one decoder block) as float32 NumPy, with every tensor checked
finite as it is read."""
from __future__ import annotations

import collections
import concurrent.futures
import hashlib
import os
import threading

import jax
import numpy as np
from flax import nnx

from prinmix_jax.models import CheckpointReader, check_params, params_from_model
from prinmix_jax.models.llama.params import block_param_table, get_path, global_param_table, iter_leaves

__all__ = ["ModelSource", "NonFiniteWeightsError", "read_ahead"]


class NonFiniteWeightsError(ValueError):
    """A base or fine-tuned tensor holds NaN or Inf."""


def _owned(a) -> np.ndarray:
    """A float32 NumPy copy of an in-memory param: what a read returns is the caller's to change (the deltas
    are taken in place of the fine-tuned copy), never a view of the user's own arrays, which a NumPy float32
    tree would otherwise be (and a JAX array's NumPy view is read-only)."""
    return np.array(a, np.float32, copy=True)


class ModelSource:
    """A checkpoint folder, a CheckpointReader, an NNX model or a param tree, read block by block.

    Args:
      obj: the model.
      model_config: its ``ModelConfig`` when ``obj`` is a param tree (else ignored).
      label: what messages call it (``"base"``, ``"fine-tuned"``).

    Attributes:
      config: the model's ``ModelConfig``.
      path: the checkpoint folder, or None for in-memory models.
      label: as given.
    """

    def __init__(self, obj, model_config, label: str):
        self.label, self.reader, self.params, self.path = label, None, None, None
        self._lock = threading.Lock()           # one read at a time (a read-ahead thread may read too)
        if isinstance(obj, (str, os.PathLike)):
            self.path = os.fspath(obj)
            self.reader = CheckpointReader(self.path)
            self.config = self.reader.config
        elif isinstance(obj, CheckpointReader):
            self.reader, self.path, self.config = obj, obj.path, obj.config
        elif isinstance(obj, nnx.Module):
            self.params, self.config = params_from_model(obj), obj.config
        elif isinstance(obj, dict):
            if model_config is None:
                raise ValueError(f"{label}: a param tree needs model_config=ModelConfig(...)")
            self.params, self.config = obj, model_config
            check_params(self.params, self.config)
        else:
            raise TypeError(f"{label}: expected a checkpoint folder, CheckpointReader, CausalLM or param tree, "
                            f"got {type(obj).__name__}")

    def _read(self, fn):
        # Copy out of the memory map and drop the file handles after every read: mapped pages count towards
        # the process RSS, so keeping the maps open would make the peak grow with the model size.
        with self._lock:
            tree = jax.tree.map(_owned, fn())
            self.reader.close()
        return tree

    def block(self, b: int) -> dict:
        """Decoder block ``b``'s params (float32 NumPy)."""
        if self.reader is not None:
            tree = self._read(lambda: self.reader.read_block(b, None, device_put=False))
        else:
            tree = jax.tree.map(_owned, self.params["layers"][b])
        return self._check_finite(tree, b)

    def block_tensor(self, b: int, path: tuple) -> np.ndarray:
        """One tensor of decoder block ``b`` (float32 NumPy) by its path in the block's subtree, read on its own:
        :func:`~prinmix_jax.delta_tree.block_deltas` holds one tensor of each model at a time, not both blocks
        (1.6 GB in float32 for a 7B block)."""
        if self.reader is not None:
            name = dict((p, n) for n, p in self.reader.block_rows(b))[tuple(path)]     # b range-checked there
            with self._lock:     # a new float32 array, filled by plain file reads (CheckpointReader.read)
                a = self.reader.read(name, np.float32)
                self.reader.close()
        else:
            name = f"model.layers.{b}.{'.'.join(path)}"
            a = _owned(get_path(self.params["layers"][b], path))
        self._check_one(name, a, b)
        return a

    def globals(self) -> dict:
        """The params outside the decoder blocks (float32 NumPy)."""
        if self.reader is not None:
            tree = self._read(lambda: self.reader.read_globals(None, device_put=False))
        else:
            tree = {k: jax.tree.map(_owned, v) for k, v in self.params.items() if k != "layers"}
        return self._check_finite(tree, None)

    def global_tensor(self, path: tuple) -> np.ndarray:
        """One param outside the decoder blocks (float32 NumPy) by its tree path, read on its own: the
        globals step holds a 7B model's embedding and head (2.1 GB each in float32) one at a time."""
        names = {p: n for n, p, _ in global_param_table(self.config)}
        if self.reader is not None:
            a = self._read(lambda: self.reader.read_global(path))
        else:
            a = _owned(get_path(self.params, path))
        self._check_one(names.get(tuple(path), "/".join(path)), a, None)
        return a

    def embedding(self) -> dict:
        """``{"embed_tokens": {"weight": ...}}``: what the calibration's first hidden states need (a 7B
        model's head is another 2.1 GB in float32)."""
        return {"embed_tokens": {"weight": self.global_tensor(("embed_tokens", "weight"))}}

    def _check_finite(self, tree: dict, block: int | None) -> dict:
        """Refuses a tensor with NaN or Inf as soon as it is read, naming it (HF name) and its block."""
        table = [(f"model.layers.{block}.{suffix}", path) for suffix, path, _ in block_param_table(self.config)] \
            if block is not None else [(name, path) for name, path, _ in global_param_table(self.config)]
        for name, path in table:
            try:
                a = get_path(tree, path)
            except ValueError:      # absent from this tree
                continue
            self._check_one(name, a, block)
        return tree

    def _check_one(self, name: str, a: np.ndarray, block: int | None) -> None:
        bad = int(a.size - np.count_nonzero(np.isfinite(a)))
        if bad:
            where = f"block {block}" if block is not None else "outside the decoder blocks"
            src = f" ({self.path})" if self.path else ""
            raise NonFiniteWeightsError(
                f"{self.label} model{src}: tensor {name} ({where}) has {bad} NaN/Inf value(s) of {a.size}; "
                "a checkpoint with non-finite weights cannot be compressed")

    def header_digest(self) -> str:
        """Cheap identity: tensor names, shapes and stored dtypes (and file sizes for folders)."""
        h = hashlib.sha256()
        if self.reader is not None:
            for name in self.reader.names():
                shape, dtype = self.reader.tensor_header(name)
                h.update(f"{name}:{list(shape)}:{dtype};".encode())
            for f in sorted({self.reader.file_of(n) for n in self.reader.names()}):
                h.update(f"{os.path.basename(f)}={os.path.getsize(f)};".encode())
        else:
            for path, leaf in sorted(iter_leaves(self.params), key=lambda x: str(x[0])):
                h.update(f"{path}:{tuple(leaf.shape)}:{leaf.dtype};".encode())
                h.update(np.asarray(leaf, np.float32).tobytes())
        return h.hexdigest()

    def close(self):
        """Drops the reader's file handles (it reopens them when read again)."""
        if self.reader is not None and self.path is not None:
            with self._lock:
                self.reader.close()


def read_ahead(fn, items, ahead: int = 1):
    """Yields ``fn(x)`` for each of ``items`` in order, computing up to ``ahead`` of the next ones in a
    background thread while the caller works on the current one (``ahead=0``: each when asked for).

    The reads of a compress run (safetensors, the float32 copies, the digests: host work that releases the
    GIL) then overlap the devices' work on the block before, instead of leaving them idle. At most
    ``ahead + 1`` results are alive at once: the one yielded and those read ahead. An exception raised by
    ``fn`` reaches the caller when it asks for that item; closing the generator early (``break``, an
    exception in the caller) waits for the read in flight and drops what was read ahead.
    """
    items = list(items)
    if ahead < 1 or len(items) < 2:
        for x in items:
            yield fn(x)
        return
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="prinmix-read-ahead")
    pending = collections.deque()
    try:
        for x in items[:ahead]:
            pending.append(pool.submit(fn, x))
        for i in range(len(items)):
            result = pending.popleft().result()
            if i + ahead < len(items):
                pending.append(pool.submit(fn, items[i + ahead]))
            yield result
            del result
    finally:
        for f in pending:
            f.cancel()
        pool.shutdown(wait=True)
