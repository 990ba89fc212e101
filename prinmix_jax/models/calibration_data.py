"""Calibration data: files or in-memory ids -> fixed-length token windows, and the checks that go with
them (a tokenizer is present, windows fit the model's context)."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import jax
import numpy as np

from prinmix_jax.models.checkpoint_files import TOKENIZER_CORE_FILES
from prinmix_jax.models.config import ModelConfig
from prinmix_jax.models.errors import CalibrationDataError

__all__ = ["tokenize_calibration", "require_tokenizer", "check_context"]


def require_tokenizer(folder, purpose: str, hint: str = "save the tokenizer there or pass pre-tokenized ids"
                      ) -> str:
    """Checks that ``folder`` holds a Hugging Face tokenizer (one of ``tokenizer.json``,
    ``tokenizer_config.json``, ``tokenizer.model``, ``vocab.json``) before anything is loaded, so a missing
    tokenizer is reported in one line instead of transformers' advice to install sentencepiece.

    Args:
      folder: the checkpoint (or tokenizer) folder.
      purpose: what the tokenizer is for, completing "no tokenizer files ... to <purpose>".
      hint: what to do about it.

    Returns:
      ``folder`` as a string.

    Raises:
      CalibrationDataError: no tokenizer file in ``folder``.
    """
    folder = os.fspath(folder)
    if not (os.path.isdir(folder) and any(os.path.isfile(os.path.join(folder, f)) for f in TOKENIZER_CORE_FILES)):
        raise CalibrationDataError(f"{folder}: no tokenizer files ({', '.join(TOKENIZER_CORE_FILES)}) to {purpose}; "
                                   f"{hint}")
    return folder


def check_context(seq_len: int, config: ModelConfig, what: str = "seq_len") -> None:
    """Refuses sequences longer than the model's context (``max_position_embeddings``).

    Dynamic-NTK RoPE (``rope_type: dynamic``) rescales its frequencies for longer inputs, so it is exempt.

    Raises:
      CalibrationDataError: ``seq_len`` exceeds the context.
    """
    limit = config.max_position_embeddings
    if seq_len > limit and config.rope.rope_type != "dynamic":
        raise CalibrationDataError(f"{what}={seq_len} is longer than the model's context of {limit} tokens "
                                   f"(max_position_embeddings); use {limit} or less")


def _context_config(tokenizer_dir) -> ModelConfig | None:
    """The model config of ``tokenizer_dir`` when it is a readable checkpoint folder, else None."""
    if tokenizer_dir is None or not os.path.isfile(os.path.join(os.fspath(tokenizer_dir), "config.json")):
        return None
    try:
        return ModelConfig.from_pretrained_dir(tokenizer_dir)
    except (OSError, ValueError):  # not a model we read: its own loader reports that
        return None


def _load_tokenizer(tokenizer_dir, source: str):
    if tokenizer_dir is None:
        raise CalibrationDataError(f"{source}: calibration text needs a tokenizer; pass tokenizer_dir "
                                   "(the checkpoint folder) or pre-tokenized ids")
    tokenizer_dir = require_tokenizer(tokenizer_dir, f"tokenize {source}")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    except Exception as e:  # transformers raises many types here
        raise CalibrationDataError(f"{tokenizer_dir}: cannot load its tokenizer ({e})") from e


def _read_documents(path: str) -> list[str | list[int]]:
    """Documents of a calibration file: texts, or id lists (JSONL "ids"/"input_ids")."""
    if path.endswith(".jsonl"):
        docs: list[str | list[int]] = []
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise CalibrationDataError(f"{path}:{lineno}: not valid JSON ({e})") from e
                if isinstance(rec, dict) and isinstance(rec.get("text"), str):
                    docs.append(rec["text"])
                elif isinstance(rec, dict) and isinstance(rec.get("ids", rec.get("input_ids")), list):
                    docs.append(list(rec.get("ids", rec.get("input_ids"))))
                else:
                    raise CalibrationDataError(f"{path}:{lineno}: expected an object with a 'text' string or an "
                                               "'ids' / 'input_ids' list")
        return docs
    with open(path, encoding="utf-8") as f:
        return [f.read()]


def _documents(source, seq_len: int) -> tuple[str, Sequence]:
    """``(label for messages, documents)`` of a calibration source (see :func:`tokenize_calibration`)."""
    if isinstance(source, (str, os.PathLike)):
        label = os.fspath(source)
        if not os.path.isfile(label):
            raise FileNotFoundError(f"calibration file {label!r} does not exist")
        if not label.endswith(".npy"):
            return label, _read_documents(label)
        try:
            return label, [np.load(label, allow_pickle=False).reshape(-1)]
        except ValueError as e:
            raise CalibrationDataError(f"{label}: cannot read as a NumPy int array ({e})") from e
    label = "calibration ids"
    if isinstance(source, (np.ndarray, jax.Array)) and np.ndim(source) == 2 and np.shape(source)[1] == seq_len:
        return label, list(np.asarray(source))
    if isinstance(source, (np.ndarray, jax.Array)):
        return label, [np.asarray(source).reshape(-1)]
    docs = list(source)
    if docs and isinstance(docs[0], (int, np.integer)):
        docs = [docs]
    return label, docs


def tokenize_calibration(source, tokenizer_dir=None, *, seq_len: int, num_sequences: int | None = None,
                         model_config: ModelConfig | None = None) -> np.ndarray:
    """Turn calibration data into ``num_sequences`` token sequences of length ``seq_len``.

    Documents are tokenized one by one with the checkpoint's own tokenizer (``AutoTokenizer``, with its
    default special tokens), concatenated into one stream, and cut into consecutive non-overlapping
    windows from the start.

    Args:
      source: a path to a ``.txt`` (or any UTF-8 text) file, a ``.jsonl`` file whose lines hold ``"text"``
        or pre-tokenized ``"ids"`` / ``"input_ids"``, a ``.npy`` int array; or in-memory ids (an int array,
        or a list of id lists). A 2-D array with ``seq_len`` columns is used row by row.
      tokenizer_dir: folder holding the tokenizer (usually the checkpoint folder); needed for text.
      seq_len: tokens per sequence.
      num_sequences: how many sequences; None takes every complete window.
      model_config: the model the windows are for; ``seq_len`` beyond its context is refused (see
        :func:`check_context`). Default: the config of ``tokenizer_dir`` when that is a checkpoint folder.

    Returns:
      int32 array ``(num_sequences, seq_len)``.

    Raises:
      FileNotFoundError: ``source`` is a path that does not exist.
      CalibrationDataError: unreadable data, no tokenizer for text, windows longer than the model's context,
        or fewer tokens than requested.
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    context = model_config if model_config is not None else _context_config(tokenizer_dir)
    label, docs = _documents(source, seq_len)
    # A missing tokenizer is reported first, then windows too long for the model, before any tokenizing.
    tok = _load_tokenizer(tokenizer_dir, label) if any(isinstance(doc, str) for doc in docs) else None
    if context is not None:
        check_context(seq_len, context)
    stream: list[np.ndarray] = []
    for doc in docs:
        if isinstance(doc, str):
            doc = tok(doc, verbose=False)["input_ids"]
        arr = np.asarray(doc)
        if arr.size and not np.issubdtype(arr.dtype, np.integer):
            raise CalibrationDataError(f"{label}: token ids must be integers, got dtype {arr.dtype}")
        stream.append(arr.reshape(-1).astype(np.int64))
    ids = np.concatenate(stream) if stream else np.zeros((0,), np.int64)
    available = ids.size // seq_len
    if available == 0:
        raise CalibrationDataError(f"{label}: calibration data has {ids.size} tokens, shorter than one sequence "
                                   f"of seq_len={seq_len}")
    if num_sequences is not None and num_sequences > available:
        raise CalibrationDataError(f"{label}: {num_sequences} sequences of {seq_len} tokens requested but the "
                                   f"data holds {ids.size} tokens ({available} sequences)")
    n = available if num_sequences is None else num_sequences
    if ids.min() < 0 or ids.max() > np.iinfo(np.int32).max:
        raise CalibrationDataError(f"{label}: token ids out of range")
    return ids[: n * seq_len].reshape(n, seq_len).astype(np.int32)
