"""Data of the SFT pairs: pretraining text from the Python standard library's own sources (ships with every
Python install, read deterministically) and exact-match fine-tuning tasks on a word of distinct lowercase
letters (:data:`TASKS`). Task format (bytes, see :mod:`prinmix_jax.sft.tokenizer`)::

    sort      prompt "sort: qdmax =>"      answer " admqx"   then EOS
    reverse   prompt "reverse: qdmax =>"   answer " xamdq"
    sortdesc  prompt "sort desc: qdmax =>" answer " xqmda"
    upper     prompt "upper: qdmax =>"     answer " QDMAX"

The base model (pretrained on code) scores ~0 exact match on each; a fully fine-tuned model learns its task.
Several fine-tunes of one base (one per task) make a multi-tenant setting (:func:`~prinmix_jax.sft.make_sft_family`).
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import string
import sysconfig

import numpy as np

from prinmix_jax.sft.tokenizer import BOS_ID, PAD_ID, encode

__all__ = ["TASKS", "TASK_TITLES", "stdlib_files", "corpus_ids", "text_windows", "make_task", "task_windows", "task_batch",
           "write_task_jsonl", "read_task_jsonl", "corpus_fingerprint", "prompt_format"]

#: Fine-tuning tasks: name -> (prompt format, answer of a word).
TASKS = {
    "sort": ("sort: {} =>", lambda w: "".join(sorted(w))),
    "reverse": ("reverse: {} =>", lambda w: w[::-1]),
    "sortdesc": ("sort desc: {} =>", lambda w: "".join(sorted(w, reverse=True))),
    "upper": ("upper: {} =>", str.upper),
}
#: What each task asks, in words.
TASK_TITLES = {"sort": "sort letters", "reverse": "reverse letters", "sortdesc": "sort letters descending",
               "upper": "upper-case letters"}
PROMPT_FMT = TASKS["sort"][0]


def prompt_format(task: str) -> str:
    """The prompt format of ``task`` (ValueError naming the known tasks when it is unknown)."""
    if task not in TASKS:
        raise ValueError(f"unknown SFT task {task!r}; known: {', '.join(TASKS)}")
    return TASKS[task][0]


def stdlib_files(stdlib_dir: str | None = None) -> list[str]:
    """Sorted list of the top-level ``*.py`` files of the standard library (deterministic order)."""
    d = stdlib_dir or sysconfig.get_paths()["stdlib"]
    files = sorted(glob.glob(os.path.join(d, "*.py")))
    if not files:
        raise FileNotFoundError(f"no *.py files under {d!r} (the standard library's sources are needed)")
    return files


def corpus_fingerprint(files: list[str]) -> str:
    """Hash of the file names and sizes (changes when the Python install changes)."""
    h = hashlib.sha256()
    for f in files:
        h.update(f"{os.path.basename(f)}:{os.path.getsize(f)};".encode())
    return h.hexdigest()[:16]


def corpus_ids(split: str, *, max_bytes: int, stdlib_dir: str | None = None, holdout_every: int = 10) -> np.ndarray:
    """Byte ids of the stdlib sources: ``split="train"`` takes the files whose index is not a multiple of
    ``holdout_every``, ``"heldout"`` the others; files are joined with BOS and cut at ``max_bytes``."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    files = stdlib_files(stdlib_dir)
    pick = [f for i, f in enumerate(files) if (i % holdout_every == 0) == (split == "heldout")]
    out: list[int] = []
    for f in pick:
        with open(f, "rb") as fh:
            data = fh.read()
        out.append(BOS_ID)
        out.extend(data)
        if len(out) >= max_bytes:
            break
    return np.asarray(out[:max_bytes], np.int32)


def text_windows(ids: np.ndarray, seq_len: int, num: int | None = None) -> np.ndarray:
    """Consecutive non-overlapping windows ``(num, seq_len)`` from the start of ``ids``."""
    k = len(ids) // seq_len if num is None else num
    if k * seq_len > len(ids) or k < 1:
        raise ValueError(f"need {k * seq_len} tokens for {k} windows of {seq_len}, have {len(ids)}")
    return np.asarray(ids[:k * seq_len], np.int32).reshape(k, seq_len)


def make_task(n: int, *, seed: int, min_len: int = 4, max_len: int = 8, task: str = "sort") -> list[dict]:
    """``n`` examples of ``task`` (:data:`TASKS`), e.g. ``{"prompt": "sort: qdmax =>", "answer": " admqx"}``.

    The words (distinct lowercase letters, ``min_len..max_len`` of them) depend on ``seed`` only, so two tasks
    with one seed share their words.
    """
    fmt = prompt_format(task)
    answer = TASKS[task][1]
    rng = np.random.default_rng(seed)
    letters = np.array(list(string.ascii_lowercase))
    out = []
    for _ in range(n):
        k = int(rng.integers(min_len, max_len + 1))
        w = "".join(rng.choice(letters, size=k, replace=False))
        out.append({"prompt": fmt.format(w), "answer": " " + answer(w)})
    return out


def task_windows(settings, num: int, seq_len: int, seed: int) -> np.ndarray:
    """``num`` consecutive windows ``(num, seq_len)`` (int32) cut from one stream of ``BOS prompt answer EOS``
    examples of ``settings``' task (an :class:`~prinmix_jax.sft.SFTSettings`: its ``task``, ``task_min_len``,
    ``task_max_len``), drawn with ``seed``: calibration data of the fine-tuning task, as a user who calibrates on
    fine-tuning data would have. Use another seed than the test prompts' (``prinmix demo`` takes
    ``settings.seed + 3000``; its test prompts are ``settings.seed + 2000``)."""
    n = max(1, num * 12)  # (the count benchmarks/bench_demo_variants.py used; ample for windows of 128)
    while True:
        ex = make_task(n, seed=seed, min_len=settings.task_min_len, max_len=settings.task_max_len,
                       task=settings.task)
        stream = np.concatenate([np.concatenate([encode(e["prompt"], bos=True), encode(e["answer"], eos=True)])
                                 for e in ex])
        if len(stream) >= num * seq_len:
            # make_task(2n) starts with make_task(n): a longer stream only extends the shorter one
            return stream[: num * seq_len].reshape(num, seq_len).astype(np.int32)
        n *= 2


def task_batch(examples: list[dict], seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Token ids ``(B, seq_len)`` of ``BOS prompt answer EOS`` (right-padded) and a loss mask that is 1 on
    the positions whose *next* token is an answer token or the EOS."""
    ids = np.full((len(examples), seq_len), PAD_ID, np.int32)
    mask = np.zeros((len(examples), seq_len), np.float32)
    for r, ex in enumerate(examples):
        p = encode(ex["prompt"], bos=True)
        a = encode(ex["answer"], eos=True)
        seq = p + a
        if len(seq) > seq_len:
            raise ValueError(f"example of {len(seq)} tokens does not fit seq_len={seq_len}")
        ids[r, :len(seq)] = seq
        mask[r, len(p) - 1:len(seq) - 1] = 1.0
    return ids, mask


def write_task_jsonl(path: str, examples: list[dict]) -> None:
    """One ``{"prompt": ..., "answer": ...}`` object per line."""
    with open(path, "w", encoding="utf-8") as f:
        for ex in examples:
            f.write(json.dumps({"prompt": ex["prompt"], "answer": ex["answer"]}) + "\n")


def read_task_jsonl(path: str) -> list[dict]:
    """Read prompt/answer JSONL (blank lines skipped); raises ValueError on a malformed line."""
    out = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                ex = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{i}: not JSON ({e.msg})") from None
            if not isinstance(ex, dict) or not isinstance(ex.get("prompt"), str) \
                    or not isinstance(ex.get("answer"), str):
                raise ValueError(f"{path}:{i}: expected an object with string fields \"prompt\" and \"answer\"")
            out.append({"prompt": ex["prompt"], "answer": ex["answer"]})
    if not out:
        raise ValueError(f"{path}: no examples")
    return out
