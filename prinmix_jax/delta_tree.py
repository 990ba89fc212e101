"""The delta tree of one step, shared by compression (:mod:`prinmix_jax.pipeline`) and apply
(:mod:`prinmix_jax.apply`): which parameter is which kind, ``base + delta`` for one step, and the check that
two models have the same architecture and tensors.

A step's params are the nested dict of :mod:`prinmix_jax.models.llama.params` (a decoder block's subtree,
or the globals: embedding, final norm, output head); paths into it are tuples, read and written with
:func:`~prinmix_jax.models.llama.params.get_path` / :func:`~prinmix_jax.models.llama.params.set_path`.
"""
from __future__ import annotations

import zlib

import jax
import numpy as np

from prinmix_jax import formats
from prinmix_jax.models.llama.params import (block_param_table, expected_tensors, get_path, global_param_table,
                                             put_path, set_path)
from prinmix_jax.storage import TensorDigest, tensor_digest

__all__ = ["IncompatibleModelsError", "ChangedWhileReadingError", "DeferredDelta", "materialise", "is_zero",
           "check_compatible", "param_groups", "entry_name", "merge_block", "merge_rows", "step_digest", "get_path",
           "set_path", "block_deltas", "global_deltas"]


class IncompatibleModelsError(ValueError):
    """Two models (base and fine-tuned, or a base and a delta's model) differ in architecture, tensor names
    or shapes."""


def check_compatible(config_a, config_b, label_a: str = "base", label_b: str = "fine-tuned model") -> None:
    """Raises :class:`IncompatibleModelsError` unless both configs describe the same architecture with the
    same tensor names and shapes (a delta between them is defined).

    Args:
      config_a, config_b: the two ``ModelConfig``\\ s.
      label_a, label_b: what the messages call them (e.g. ``"base"``, ``"delta's model"``).
    """
    ca, cb = config_a, config_b
    if ca.architecture != cb.architecture or ca.model_type != cb.model_type:
        raise IncompatibleModelsError(f"the {label_a} is a {ca.architecture} ({ca.model_type}) but the {label_b} is "
                                      f"a {cb.architecture} ({cb.model_type}); a delta needs the same architecture")
    ea, eb = expected_tensors(ca), expected_tensors(cb)
    if set(ea) != set(eb):
        diff = sorted(set(ea) ^ set(eb))
        raise IncompatibleModelsError(f"the {label_a} and the {label_b} have different tensors, e.g. {diff[:4]}")
    for name in sorted(ea):
        if ea[name][1] != eb[name][1]:
            raise IncompatibleModelsError(f"tensor {name!r} has shape {ea[name][1]} in the {label_a} but "
                                          f"{eb[name][1]} in the {label_b} (different sizes or vocabulary)")


def _kind(path) -> str:
    if path[-1] == "bias":
        return "biases"
    if path[0] == "embed_tokens":
        return "embeddings"
    if path[0] == "lm_head":
        return "lm_head"
    if path[-2].endswith("norm"):
        return "norms"
    return "linear"


def param_groups(config) -> tuple[list, list]:
    """``(block_table, global_table)``: for every tensor, ``(path, policy_key)`` where policy_key is
    ``"linear"``, ``"norms"``, ``"biases"``, ``"embeddings"`` or ``"lm_head"``."""
    return ([(p, _kind(p)) for _, p, _ in block_param_table(config)],
            [(p, _kind(p)) for _, p, _ in global_param_table(config)])


def entry_name(path) -> str:
    """The name a compressed matrix is stored under: for a ``weight`` its module's name (``"q_proj"``,
    ``"embed_tokens"``), else the path joined by ``/`` (dense deltas are keyed by the joined path)."""
    return path[-2] if path[-1] == "weight" else "/".join(path)


def merge_block(base_tree: dict, bd, table, *, in_place: bool = False) -> dict:
    """``base + reconstructed delta`` for one step, in float32.

    Args:
      base_tree: the step's base params (NumPy), block subtree or globals dict.
      bd: the step's :class:`~prinmix_jax.storage.BlockDelta`.
      table: the step's ``(path, kind)`` list from :func:`param_groups`.
      in_place: add the deltas into ``base_tree``'s own arrays (writeable float32 NumPy the caller owns) and
        return it, rather than into float32 copies (``base_tree`` then unchanged): one block's worth of
        float32 memory less.
    """
    if in_place:
        bad = [p for p, _ in table if not _owned_float32(get_path(base_tree, p))]
        if bad:
            raise ValueError(f"merge_block(in_place=True) needs writeable float32 NumPy arrays; "
                             f"{'/'.join(map(str, bad[0]))} is not")
        out = base_tree
    else:
        out = jax.tree.map(lambda a: np.array(a, np.float32), base_tree)      # copies: the sums go in place
    for path, _ in table:
        leaf = get_path(out, path)
        for _ in merge_rows(lambda a, z: leaf[a:z], leaf.shape, bd, path):   # the sums land in leaf's rows
            pass
    return out


def merge_rows(base_rows, shape, bd, path):
    """Yields ``(start, stop, base + delta)`` of the param at ``path`` (of ``shape``), a block of rows at a time in
    row order (a linear's ``row_blocks()``, which are ``reconstruct()``'s; else
    :func:`~prinmix_jax.formats.reconstruct_rows` rows).

    Args:
      base_rows: ``base_rows(start, stop)`` -> those rows of the base as a writeable float32 array, which the
        delta is added into and which is yielded (a view of a whole tensor merges it in place).
      shape: the param's shape.
      bd: the step's :class:`~prinmix_jax.storage.BlockDelta`.
      path: the param's tree path.
    """
    key, name = "/".join(path), entry_name(path)
    cm = bd.linears.get(name)
    if cm is not None:
        if tuple(shape) != tuple(cm.shape):
            raise ValueError(f"{key}: base {tuple(shape)}, delta {tuple(cm.shape)}")
        for a, z, d in cm.row_blocks():
            rows = base_rows(a, z)
            rows += d
            yield a, z, rows
        return
    d = bd.dense.get(key)               # stored 16-bit (e.g. an embedding): float32 by rows
    if d is not None:
        d = np.asarray(d)
        if d.shape != tuple(shape):
            raise ValueError(f"{key}: base {tuple(shape)}, delta {d.shape}")
    step = formats.reconstruct_rows(np.prod(shape[1:], dtype=np.int64))
    for a in range(0, shape[0], step):
        z = min(a + step, shape[0])
        rows = base_rows(a, z)
        if d is not None:
            rows += np.asarray(d[a:z], np.float32)
        yield a, z, rows


def _owned_float32(a) -> bool:
    return isinstance(a, np.ndarray) and a.dtype == np.float32 and a.flags.writeable


def step_digest(tree: dict, table) -> str:
    """The fingerprint digest of one step's tensors (``tensor_digest`` over the ``(path, kind)`` of
    ``table``, from :func:`param_groups`): what a step records of the base and fine-tuned weights it
    consumed, what a resume and ``apply`` compare against."""
    return tensor_digest([("/".join(p), get_path(tree, p)) for p, _ in table])


class ChangedWhileReadingError(RuntimeError):
    """A model file changed between the globals step's two reads of a tensor (:class:`DeferredDelta`)."""


class DeferredDelta:
    """A global tensor's float32 delta, taken again from both models when it is compressed.

    The globals step reads every tensor once for its digests (:func:`global_deltas`). Holding every delta
    from then on kept a 7B model's head (2.1 GB in float32 at 128256×4096) waiting while the embedding went
    through its SVD, error tables and U step: the globals' peak. A large delta is read again, right before its
    own compression (:func:`~prinmix_jax.step_compress.compress_entries` loads one stack at a time), and checked
    against the first read (CRC-32 of the delta's bytes): a model file changed in between is refused rather
    than compressed under the digests of other bytes.

    Attributes:
      path: the tensor's tree path; ``shape``, ``nbytes``: those of the delta; ``nonzero``: whether any entry
        of the delta is nonzero.
    """

    def __init__(self, path, delta: np.ndarray, base_src, ft_src):
        self.path, self.shape, self.nbytes = tuple(path), delta.shape, delta.nbytes
        self.nonzero = bool(np.any(delta))
        self._crc = zlib.crc32(np.ascontiguousarray(delta).data)
        self._sources = (base_src, ft_src)

    def load(self) -> np.ndarray:
        base_src, ft_src = self._sources
        ft = ft_src.global_tensor(self.path)
        delta = np.subtract(ft, base_src.global_tensor(self.path), out=ft)
        if delta.shape != self.shape or zlib.crc32(np.ascontiguousarray(delta).data) != self._crc:
            raise ChangedWhileReadingError(
                f"{'/'.join(self.path)} changed on disk while it was being compressed (its second read differs "
                f"from the first); nothing of this run is published: run again once the model files are stable")
        return delta


def materialise(delta) -> np.ndarray:
    """``delta`` itself, or a :class:`DeferredDelta`'s array, read now."""
    return delta.load() if isinstance(delta, DeferredDelta) else delta


def is_zero(delta) -> bool:
    """Whether every entry of ``delta`` (an array or a :class:`DeferredDelta`, not read again) is zero."""
    return not (delta.nonzero if isinstance(delta, DeferredDelta) else np.any(delta))


def block_deltas(table, base_src, ft_src, b: int, *, digests: bool = True, deltas: bool = True,
                 keep_ft: bool = False, keep_base: bool = False
                 ) -> tuple[tuple[str, str] | None, dict, dict | None, dict | None]:
    """Decoder block ``b``'s deltas, read one tensor at a time: ``(digests, deltas, ft block, base block)``.

    In the digests' (name) order, both models' tensor is read
    (:meth:`~prinmix_jax.sources.ModelSource.block_tensor`), fed to the digests (the same as
    :func:`step_digest` of the whole blocks) and turned into its float32 delta (the same values as
    ``ft − base`` of the whole blocks); a model's copy is dropped at once unless its block is kept. Reading
    both blocks whole first held 1.6 GB of float32 beside the deltas for a 7B block (the data-free run's
    peak, "block read").

    Args:
      table: the block's ``(path, kind)`` list (:func:`param_groups`).
      base_src, ft_src: the two :class:`~prinmix_jax.sources.ModelSource`.
      b: the block.
      digests: compute the step digests (``None`` in their place otherwise).
      deltas: keep the deltas (an empty dict otherwise: the digests alone, one tensor held at a time).
      keep_ft, keep_base: also return that model's block (its param subtree), e.g. for a calibration forward.

    Returns:
      The digests (or ``None``), ``{path: float32 delta}``, and the fine-tuned and base blocks (or ``None``).
    """
    hashes = (TensorDigest(), TensorDigest()) if digests else None
    out_deltas, kept = {}, ({} if keep_base else None, {} if keep_ft else None)
    for path, _ in sorted(table, key=lambda pk: "/".join(pk[0])):
        name, path = "/".join(path), tuple(path)
        base = base_src.block_tensor(b, path)
        ft = ft_src.block_tensor(b, path)
        if hashes is not None:
            hashes[0].update(name, base)
            hashes[1].update(name, ft)
        for tree, a in zip(kept, (base, ft)):
            if tree is not None:
                put_path(tree, path, a)
        if deltas:
            out_deltas[path] = np.subtract(ft, base) if keep_ft else np.subtract(ft, base, out=ft)
        del base, ft
    out = None if hashes is None else (hashes[0].hexdigest(), hashes[1].hexdigest())
    return out, out_deltas, kept[1], kept[0]


def global_deltas(table, base_src, ft_src, *, keep: bool = True,
                  defer_bytes: int | None = None) -> tuple[tuple[str, str], dict]:
    """The globals step's inputs, read one tensor at a time: ``((base digest, fine-tuned digest), deltas)``.

    In the digests' (name) order, both models' tensor is read (:meth:`~prinmix_jax.sources.ModelSource.
    global_tensor`), fed to the digests (the same as :func:`step_digest` of the whole globals) and, with
    ``keep``, turned into its float32 delta in place of the fine-tuned copy; the base copy is dropped at once.
    A 128256 x 4096 embedding is 2.1 GB in float32: reading both models' globals whole, then taking the
    deltas, peaked at 13.4 GB for Llama-3-8B shapes.

    Args:
      defer_bytes: deltas of at least this many bytes are kept as a :class:`DeferredDelta` (read again when
        compressed), not as arrays; ``None``: none are.

    Returns:
      The digests, and ``{path: delta or DeferredDelta}`` (empty without ``keep``).
    """
    digests, deltas = (TensorDigest(), TensorDigest()), {}
    for path, _ in sorted(table, key=lambda pk: "/".join(pk[0])):
        name = "/".join(path)
        base = base_src.global_tensor(path)
        digests[0].update(name, base)
        ft = ft_src.global_tensor(path)
        digests[1].update(name, ft)
        if keep:
            d = np.subtract(ft, base, out=ft)
            big = defer_bytes is not None and d.nbytes >= defer_bytes
            deltas[tuple(path)] = DeferredDelta(path, d, base_src, ft_src) if big else d
            del d
        del base, ft
    return (digests[0].hexdigest(), digests[1].hexdigest()), deltas

