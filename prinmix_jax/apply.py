"""Applying a delta checkpoint: merge into Flax params / an NNX model / a Hugging Face checkpoint, or serve
it factored (``y = W_base x + Û (σ ⊙ (V̂ x))``) without merging.

Every entry point checks the base fingerprint (see :mod:`prinmix_jax.storage`) and refuses a base that
differs from the one the delta was computed against, unless ``force=True``.
"""
from __future__ import annotations

import os
import shutil
import sys

import jax
import jax.numpy as jnp
import numpy as np

from prinmix_jax import formats
from prinmix_jax.delta_tree import check_compatible, merge_block, merge_rows, param_groups, step_digest
from prinmix_jax.storage import (DeltaCheckpoint, FingerprintMismatchError, OUTPUT_MARKER, TensorDigest,
                                 check_output_location, is_prinmix_output, load_delta, write_output_marker)

__all__ = ["apply_delta", "apply_delta_to_model", "apply_delta_to_checkpoint", "factored_linear",
           "check_base_compatible", "FingerprintMismatchError"]


def _model_config_of(delta: DeltaCheckpoint):
    from prinmix_jax.models import ModelConfig

    return ModelConfig.from_hf_config(delta.meta["model"]["hf_config"], source=f"{delta.path} metadata")


def check_base_compatible(base_config, delta: DeltaCheckpoint) -> None:
    """Architecture and shapes of the base must match the delta's model (not overridable by ``force``).

    Raises:
      IncompatibleModelsError: (a ``ValueError``) they differ.
    """
    check_compatible(base_config, _model_config_of(delta), "base", "delta's model")


def _check_digest(delta: DeltaCheckpoint, step: int, base_tree, table, force: bool) -> None:
    if not force:
        _check_digest_value(delta, step, step_digest(base_tree, table))


def _check_digest_value(delta: DeltaCheckpoint, step: int, got: str) -> None:
    want = delta.meta["base"]["step_digests"][step]
    if got != want:
        what = "the embedding / final norm / output head" if step == 0 else f"decoder block {step - 1}"
        raise FingerprintMismatchError(
            f"wrong base: {what} differs from the base the delta was computed against (fingerprint "
            f"{delta.fingerprint[:16]}…); pass --force / force=True to apply anyway")


def _cast_like(tree_new, tree_old):
    return jax.tree.map(lambda n, o: jnp.asarray(n).astype(o.dtype) if hasattr(o, "dtype") else n, tree_new, tree_old)


def apply_delta(base_params: dict, delta, *, force: bool = False) -> dict:
    """``base + reconstructed delta`` as a new Flax param tree (the NNX state layout of ``CausalLM``).

    Args:
      base_params: the base param tree (e.g. ``load_hf_params(base)``); every leaf keeps its dtype.
      delta: a :class:`~prinmix_jax.storage.DeltaCheckpoint` or its folder.
      force: skip the base fingerprint check.

    Raises:
      FingerprintMismatchError: the base differs from the delta's base (unless ``force``).
      ValueError: architecture / shape mismatch.
    """
    delta = load_delta(delta)
    cfg = _model_config_of(delta)
    from prinmix_jax.models import check_params

    check_params(base_params, cfg)
    block_table, global_table = param_groups(cfg)
    glob = {k: v for k, v in base_params.items() if k != "layers"}
    _check_digest(delta, 0, glob, global_table, force)
    for b in range(delta.num_blocks):
        _check_digest(delta, b + 1, base_params["layers"][b], block_table, force)
    out = dict(_cast_like(merge_block(glob, delta.globals(), global_table), glob))
    out["layers"] = {b: _cast_like(merge_block(base_params["layers"][b], delta.block(b), block_table),
                                   base_params["layers"][b])
                     for b in range(delta.num_blocks)}
    return out


def apply_delta_to_model(model, delta, *, force: bool = False):
    """Merges the delta into an NNX ``CausalLM`` in place (``nnx.update``) and returns the model."""
    from flax import nnx

    from prinmix_jax.models import params_from_model

    new = apply_delta(params_from_model(model), delta, force=force)
    state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(state, new)
    nnx.update(model, state)
    return model


def factored_linear(x, base_weight, cm, bias=None):
    """Serving without merging: ``y = x W_baseᵀ + Û (σ ⊙ (V̂ x)) [+ bias]`` for ``x`` (..., in).

    Args:
      x: inputs (..., in).
      base_weight: the base ``[out, in]`` weight.
      cm: the compressed delta of that linear (``DeltaCheckpoint.matrix(block, name)``); None = zero delta.
      bias: optional (merged) bias.
    """
    y = jnp.einsum("...i,oi->...o", x, base_weight)
    if cm is not None:
        y = y + cm.apply(x.astype(jnp.float32)).astype(y.dtype)
    return y if bias is None else y + bias


def apply_delta_to_checkpoint(base_dir, delta, out, *, force: bool = False, overwrite: bool = False,
                              dtype=None, max_shard_size="5GB", progress: bool = False) -> str:
    """Writes ``base + delta`` as a Hugging Face checkpoint folder that ``transformers`` loads.

    Streams: each tensor is read, checked against the fingerprint, merged and written a block of rows at a
    time (:func:`~prinmix_jax.formats.reconstruct_rows`), so memory holds about one such block and one step of
    the delta, whatever the model's size. The output is written to a temporary folder next to ``out`` and
    renamed when complete, once every step's fingerprint matched; on any error nothing is left behind.
    config.json and the tokenizer files come from the fine-tuned checkpoint (stored in the delta), else from
    the base.

    Args:
      base_dir: the base Hugging Face checkpoint folder.
      delta: a delta checkpoint folder or :class:`~prinmix_jax.storage.DeltaCheckpoint`.
      out: output folder.
      force: apply even if the base fingerprint differs.
      overwrite: replace an existing ``out``.
      dtype: dtype of the written tensors (default: each base tensor's stored dtype).
      max_shard_size: shard the safetensors above this size.
      progress: show a progress bar on stderr.

    Returns:
      ``out`` (absolute).
    """
    from tqdm.auto import tqdm

    from prinmix_jax.models import CheckpointReader, CheckpointWriter, ModelConfig
    from prinmix_jax.storage import publish

    out = check_output_location(out, overwrite, [base_dir, getattr(delta, "path", delta)])
    _remove_stale_tmp(out)
    delta = load_delta(delta)
    with CheckpointReader(base_dir) as reader:
        check_base_compatible(reader.config, delta)
        hf_dir = delta.hf_dir
        cfg = ModelConfig.from_pretrained_dir(hf_dir) if hf_dir and os.path.isfile(
            os.path.join(hf_dir, "config.json")) else reader.config
        block_table, global_table = param_groups(cfg)
        tmp = f"{out}.tmp-apply-{os.getpid()}"
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
        writer = None
        try:
            os.makedirs(tmp)
            write_output_marker(tmp, "merged")     # first, so that a killed apply's folder is known as ours
            writer = CheckpointWriter(tmp, cfg, dtype=dtype, max_shard_size=max_shard_size)

            def stream_step(step, rows, bd):
                """Every tensor of one step (HF name, tree path), in the digest's name order, each a block of rows
                at a time: read, hashed, merged, checked and written, never whole. The step's digest is checked
                once all of them are read; nothing is published before every step's matched."""
                digest = None if force else TensorDigest()
                for name, path in sorted(rows, key=lambda r: "/".join(r[1])):
                    shape = reader.tensor_header(name)[0]
                    if digest is not None:
                        digest.begin("/".join(path), shape)
                    writer.add_rows(name, shape, _merged_rows(reader, name, path, shape, bd, digest),
                                    dtype=reader.stored_dtype(name) if dtype is None else None)
                reader.close()
                if digest is not None:
                    _check_digest_value(delta, step, digest.hexdigest())

            if delta.num_blocks and sorted(p for _, p in reader.block_rows(0)) != sorted(p for p, _ in block_table):
                raise ValueError("the base's block tensors do not match the delta's model")    # the same every block
            stream_step(0, [(_hf_global(p, cfg), p) for p, _ in global_table], delta.globals())
            bar = tqdm(total=delta.num_blocks, desc="apply", unit="block", disable=not progress, file=sys.stderr)
            for b in range(delta.num_blocks):
                stream_step(b + 1, reader.block_rows(b), delta.block(b))
                bar.update(1)
            bar.close()
            writer.close(copy_from=hf_dir if hf_dir else os.fspath(base_dir))
            _tokenizer_fallback(hf_dir, os.fspath(base_dir), tmp)
            publish(tmp, out, overwrite)
        except BaseException:
            if writer is not None:
                writer.abort()
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return out


def _merged_rows(reader, name, path, shape, bd, digest):
    """Blocks of rows of ``base + delta`` for the param at ``path`` (HF tensor ``name``) of step ``bd``, in row
    order: each base block is read as float32, fed to the ``digest`` (unless None) and, for the embedding,
    checked against a stored tied head."""
    def base_rows(a, z):
        rows = reader.read_rows(name, a, z, np.float32)
        if digest is not None:
            digest.update_rows(rows)
        if tuple(path) == ("embed_tokens", "weight"):
            reader.check_tied_rows(a, z, rows)
        return rows

    for _, _, rows in merge_rows(base_rows, shape, bd, path):
        if not _all_finite(rows):
            raise ValueError(f"{name}: base + delta has NaN/Inf values (the base or the delta holds non-finite "
                             "numbers); nothing was written")
        yield rows


def _all_finite(arr: np.ndarray) -> bool:
    """``np.isfinite(arr).all()`` a block of rows at a time (no mask of the whole tensor)."""
    if arr.ndim == 0:
        return bool(np.isfinite(arr))
    rows = formats.reconstruct_rows(np.prod(arr.shape[1:], dtype=np.int64))
    return all(np.isfinite(arr[a:a + rows]).all() for a in range(0, len(arr), rows))


def _tokenizer_fallback(hf_dir: str | None, base_dir: str, dst: str) -> None:
    """Copies the base's tokenizer files into ``dst`` when the delta kept no tokenizer of the fine-tune."""
    if hf_dir is not None and any(os.path.isfile(os.path.join(hf_dir, f))
                                  for f in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        return
    from prinmix_jax.models.hf_io import TOKENIZER_FILES

    for f in TOKENIZER_FILES:
        src = os.path.join(base_dir, f)
        if os.path.isfile(src) and not os.path.exists(os.path.join(dst, f)):
            shutil.copyfile(src, os.path.join(dst, f))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:         # exists, owned by someone else
        return True
    return True


def _remove_stale_tmp(out: str) -> None:
    """Deletes ``OUT.tmp-apply-<pid>`` folders left by killed applies: their process is gone and they hold
    the output marker (written first thing), so prinmix made them."""
    parent, name = os.path.split(out)
    for n in os.listdir(parent):
        head, _, pid = n.rpartition("-")
        if head != f"{name}.tmp-apply" or not pid.isdigit() or int(pid) == os.getpid() or _pid_alive(int(pid)):
            continue
        p = os.path.join(parent, n)
        # ours: it holds the marker, or nothing but the marker being written (killed right after the mkdir)
        if is_prinmix_output(p) or (os.path.isdir(p) and not os.path.islink(p)
                                    and set(os.listdir(p)) <= {OUTPUT_MARKER + ".tmp"}):
            shutil.rmtree(p, ignore_errors=True)
            print(f"removed {p!r}, left by an interrupted apply", file=sys.stderr)


def _hf_global(path, cfg) -> str:
    from prinmix_jax.models.llama.params import global_param_table

    for name, p, _ in global_param_table(cfg):
        if tuple(p) == tuple(path):
            return name
    raise KeyError(path)
