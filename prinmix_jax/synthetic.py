"""Synthetic inputs for tests, benchmarks and experiments (numpy and safetensors only, no downloads).

- :func:`long_tailed_delta`: one long-tailed delta with a correlated calibration Hessian.
- :func:`write_llama_pair`: a random (base, fine-tuned) Llama pair written as safetensors checkpoints.
"""
from __future__ import annotations

import json
import os

import numpy as np


def long_tailed_delta(m: int, n: int, *, seed: int = 0, decay: float = 1.0, noise: float = 0.15,
                      tokens: int = 2048, return_x: bool = False):
    """A delta with singular values ``~ i^{-decay}`` plus dense noise, and a Hessian ``X Xᵀ / N``
    from inputs with a decaying spectrum and a non-zero mean (a correlated, non-identity H).

    ``noise`` is the energy of the dense Gaussian noise relative to that of the long-tailed part,
    so the spectrum keeps its shape at every size.

    Returns:
      ``(delta (m, n) float32, hessian (n, n) float32)`` and ``X`` (n, N) if ``return_x``.
    """
    rng = np.random.default_rng(seed)
    r = min(m, n)
    u, _ = np.linalg.qr(rng.standard_normal((m, r)))
    v, _ = np.linalg.qr(rng.standard_normal((n, r)))
    s = np.arange(1, r + 1, dtype=np.float64) ** -decay
    std = np.sqrt(noise * np.sum(s ** 2) / (m * n))
    delta = (u * s) @ v.T + std * rng.standard_normal((m, n))
    mix = rng.standard_normal((n, n)) * (np.arange(1, n + 1) ** -0.5)[None, :]
    x = mix @ rng.standard_normal((n, tokens)) + 0.3 * rng.standard_normal((n, 1))
    h = x @ x.T / tokens
    out = (delta.astype(np.float32), h.astype(np.float32))
    return out + (x,) if return_x else out


def write_llama_pair(root: str, blocks: int, hidden: int, inter: int, vocab: int, seed: int = 0) -> tuple[str, str]:
    """Write a random Llama ``(base, fine-tuned)`` pair under ``root`` (``base-<blocks>``, ``ft-<blocks>``).

    Float32 safetensors checkpoints with a HF ``config.json``; fine-tuned = base + a rank-8 delta + noise on
    every matrix, small noise on the norms. Returns the two directories.
    """
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    heads = max(2, hidden // 64)
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab,
           "hidden_size": hidden, "intermediate_size": inter, "num_hidden_layers": blocks,
           "num_attention_heads": heads, "num_key_value_heads": heads, "max_position_embeddings": 256,
           "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False, "torch_dtype": "float32"}
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,),
              "lm_head.weight": (vocab, hidden)}
    for b in range(blocks):
        p = f"model.layers.{b}."
        shapes.update({p + "input_layernorm.weight": (hidden,), p + "post_attention_layernorm.weight": (hidden,),
                       p + "self_attn.q_proj.weight": (hidden, hidden), p + "self_attn.k_proj.weight": (hidden, hidden),
                       p + "self_attn.v_proj.weight": (hidden, hidden), p + "self_attn.o_proj.weight": (hidden, hidden),
                       p + "mlp.gate_proj.weight": (inter, hidden), p + "mlp.up_proj.weight": (inter, hidden),
                       p + "mlp.down_proj.weight": (hidden, inter)})
    dirs = []
    for kind in ("base", "ft"):
        d = os.path.join(root, f"{kind}-{blocks}")
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, "config.json"), "w") as f:
            json.dump(cfg, f)
        dirs.append(d)
    base, ft = {}, {}
    for name, shape in shapes.items():
        w = (1.0 + 0.1 * rng.standard_normal(shape) if len(shape) == 1
             else rng.standard_normal(shape) / np.sqrt(shape[-1])).astype(np.float32)
        base[name] = w
        if len(shape) == 2:
            a, c = rng.standard_normal((shape[0], 8)), rng.standard_normal((8, shape[1]))
            ft[name] = (w + 0.02 * (a @ c) / np.sqrt(shape[1]) + 1e-3 * rng.standard_normal(shape)).astype(np.float32)
        else:
            ft[name] = (w + 0.01 * rng.standard_normal(shape)).astype(np.float32)
    save_file(base, os.path.join(dirs[0], "model.safetensors"), metadata={"format": "pt"})
    save_file(ft, os.path.join(dirs[1], "model.safetensors"), metadata={"format": "pt"})
    return dirs[0], dirs[1]
