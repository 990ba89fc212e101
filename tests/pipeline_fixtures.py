"""Shared helpers for the pipeline / storage / apply / CLI tests: tiny random HF (base, fine-tuned) pairs.

fine-tuned = base + a random rank-4 delta + noise on every matrix, small noise on norms and biases. Built
with numpy + safetensors from a transformers-saved base (no pickle, no network).
"""
from __future__ import annotations

import json
import os
import shutil

import numpy as np

from hf_fixtures import random_torch_model, save_checkpoint, save_tiny_tokenizer

SMALL_CONFIG = dict(ratio=1 / 16, bits=(0, 2, 3, 4, 8), group_size=16)  # = the CLI with --group-size 16
#: Every block linear of the test models is 32x32 (one shape: one compilation per mesh).
DIMS = dict(vocab_size=64, hidden_size=32, intermediate_size=32, num_attention_heads=2, num_key_value_heads=2,
            max_position_embeddings=64, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def torch_model(family: str, layers: int = 2, seed: int = 0):
    """A float32 transformers model of ``family`` ("llama", "qwen2", "qwen3", "mistral") at :data:`DIMS`."""
    import transformers as tf

    cls = {"llama": tf.LlamaConfig, "qwen2": tf.Qwen2Config, "qwen3": tf.Qwen3Config,
           "mistral": tf.MistralConfig}[family]
    extra = {"head_dim": 16} if family == "qwen3" else {}
    return random_torch_model(cls(num_hidden_layers=layers, **DIMS, **extra), seed)


def _perturb(name: str, w: np.ndarray, rng) -> np.ndarray:
    w32 = w.astype(np.float32)
    if w.ndim == 2:
        m, n = w.shape
        a = rng.standard_normal((m, 4)) * np.array([1.0, 0.5, 0.2, 0.1])
        b = rng.standard_normal((4, n))
        d = 0.05 * (a @ b) / np.sqrt(n) + 0.002 * rng.standard_normal((m, n))
    else:
        d = 0.01 * rng.standard_normal(w.shape)
    return (w32 + d.astype(np.float32)).astype(w.dtype)


def make_finetuned(base_dir: str, out_dir: str, seed: int = 1, frozen=()) -> str:
    """Writes ``base + delta`` next to ``base_dir`` (same config and tokenizer files)."""
    from safetensors.numpy import load_file, save_file

    os.makedirs(out_dir, exist_ok=True)
    rng = np.random.default_rng(seed)
    tensors = load_file(os.path.join(base_dir, "model.safetensors"))
    new = {k: (v if any(f in k for f in frozen) else _perturb(k, v, rng)) for k, v in sorted(tensors.items())}
    save_file(new, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    for f in os.listdir(base_dir):
        if f != "model.safetensors" and os.path.isfile(os.path.join(base_dir, f)):
            shutil.copyfile(os.path.join(base_dir, f), os.path.join(out_dir, f))
    return out_dir


_PAIRS: dict = {}


def make_pair(root, family: str = "llama", tokenizer: bool = True, seed: int = 0, layers: int = 2
              ) -> tuple[str, str]:
    """``(base_dir, finetuned_dir)`` for ``family``; cached per arguments."""
    key = (os.fspath(root), family, tokenizer, seed, layers)
    if key not in _PAIRS:
        tag = f"{family}-L{layers}-t{int(tokenizer)}-s{seed}"
        base = os.path.join(os.fspath(root), f"base-{tag}")
        save_checkpoint(torch_model(family, layers, seed=seed), base)
        if tokenizer:
            save_tiny_tokenizer(base)
        ft = make_finetuned(base, os.path.join(os.fspath(root), f"ft-{tag}"), seed + 1)
        _PAIRS[key] = (base, ft)
    return _PAIRS[key]


CALIB_TEXT = ("the quick brown fox jumps over a lazy dog while seven small cats watch from the old wooden fence "
              "and one bird sings ") * 12


def write_calib(root, kind: str = "ids", vocab: int = 64, n_tokens: int = 256) -> str:
    """A calibration file: ``"ids"`` (JSONL pre-tokenized), ``"jsonl"`` (JSONL text) or ``"txt"``."""
    root = os.fspath(root)
    if kind == "ids":
        path = os.path.join(root, "calib_ids.jsonl")
        rng = np.random.default_rng(7)
        with open(path, "w") as f:
            for _ in range(4):
                f.write(json.dumps({"ids": rng.integers(3, vocab, n_tokens // 4).tolist()}) + "\n")
    elif kind == "jsonl":
        path = os.path.join(root, "calib_text.jsonl")
        with open(path, "w") as f:
            for _ in range(3):
                f.write(json.dumps({"text": CALIB_TEXT}) + "\n")
    else:
        path = os.path.join(root, "calib.txt")
        with open(path, "w") as f:
            f.write(CALIB_TEXT * 2)
    return path


def jax_cache_env(devices: int = 4) -> dict:
    """Environment for subprocess runs: CPU, ``devices`` simulated devices at XLA's default optimisation level,
    and the run's persistent compilation cache (``JAX_COMPILATION_CACHE_DIR``, which conftest always sets;
    shared with the in-process tests, whose programs differ by their flags)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               PYTHONWARNINGS="ignore")
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return env


def read_arrays(delta_dir) -> dict:
    """Every stored array of a delta checkpoint: ``{(step, key path): bytes}``."""
    from prinmix_jax.storage import STEPS_DIR, StepStore

    import jax

    store = StepStore(os.path.join(os.fspath(delta_dir), STEPS_DIR), read_only=True)
    out = {}
    for s in store.all_steps():
        arrays, _ = store.restore(s)
        for path, a in jax.tree_util.tree_flatten_with_path(arrays)[0]:
            a = np.asarray(a)
            out[(s, jax.tree_util.keystr(path))] = (a.dtype.name, a.shape, a.tobytes())
    store.close()
    return out
