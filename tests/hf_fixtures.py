"""Tiny random Hugging Face checkpoints of every supported family, built with transformers (torch CPU).

Weights are re-drawn at a larger scale than transformers' init (std 0.02) so logits are O(1) and a
1e-4 comparison means something. No network, no pickle.
"""

from __future__ import annotations

import os

import numpy as np

FAMILIES = ("llama3", "mistral", "qwen2", "qwen3", "llama_tied")
EXTRA_ROPE_FAMILIES = ("llama_yarn", "llama_dynamic")

_COMMON = dict(vocab_size=160, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
               rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def hf_config(family: str):
    """A transformers config object for ``family`` (one of :data:`FAMILIES`)."""
    import transformers as tf

    if family == "llama3":
        return tf.LlamaConfig(**_COMMON, rope_parameters={
            "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 16})
    if family == "mistral":  # sliding window shorter than the test sequences
        return tf.MistralConfig(**_COMMON, sliding_window=8)
    if family == "qwen2":  # q/k/v biases; the second block uses a sliding window
        return tf.Qwen2Config(**_COMMON, use_sliding_window=True, sliding_window=8, max_window_layers=1)
    if family == "qwen3":  # q/k norm, head_dim != hidden / heads
        return tf.Qwen3Config(**_COMMON, head_dim=24)
    if family == "llama_tied":  # tied embeddings, attention and mlp biases, linear rope scaling
        return tf.LlamaConfig(**_COMMON, tie_word_embeddings=True, attention_bias=True, mlp_bias=True,
                              rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0})
    if family == "llama_yarn":
        return tf.LlamaConfig(**_COMMON, rope_parameters={
            "rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 16})
    if family == "llama_dynamic":  # test sequences are longer than max_position_embeddings
        kw = dict(_COMMON, max_position_embeddings=8)
        return tf.LlamaConfig(**kw, rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0})
    raise ValueError(family)


def torch_model(family: str, seed: int = 0):
    """A float32 transformers model of ``family`` with O(1)-scale random weights (eager attention)."""
    return random_torch_model(hf_config(family), seed)


def random_torch_model(cfg, seed: int = 0):
    """A float32 transformers model of config ``cfg`` with O(1)-scale random weights (eager attention):
    norms ~ 1 + 0.2 N(0,1), biases ~ 0.1 N(0,1), matrices ~ 1.5 N(0,1) / sqrt(fan_in)."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg._attn_implementation = "eager"
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager", dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            else:
                fan_in = p.shape[-1]
                p.copy_(torch.randn(p.shape, generator=gen) * (1.5 / np.sqrt(fan_in)))
    return model.eval()


def save_checkpoint(model, path, dtype: str = "float32", max_shard_size=None) -> str:
    """``save_pretrained`` the model (safetensors) into ``path``, optionally as bf16 or sharded."""
    import torch

    kw = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    if dtype == "bfloat16":  # a bf16 copy; the float32 model (and its float32 rope buffers) stays as it is
        import copy

        model = copy.deepcopy(model).to(torch.bfloat16)
    model.save_pretrained(path, safe_serialization=True, **kw)
    return os.fspath(path)


def torch_logits(model, ids: np.ndarray) -> np.ndarray:
    """float32 logits (B, T, V) of a transformers model on int ids (B, T)."""
    import torch

    with torch.no_grad():
        out = model(input_ids=torch.as_tensor(np.asarray(ids), dtype=torch.long)).logits
    return out.float().numpy()


def random_ids(vocab: int, shape=(2, 20), seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, size=shape, dtype=np.int32)


def save_tiny_tokenizer(path) -> None:
    """Train a word-level tokenizer on a few lines and save it (tokenizer.json etc.) into ``path``."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    words = ("the quick brown fox jumps over a lazy dog while seven small cats watch from the old "
             "wooden fence and one bird sings").split()
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(special_tokens=["<pad>", "<s>", "</s>", "<unk>"])
    tok.train_from_iterator([" ".join(words)] * 3, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>",
                                   bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(os.fspath(path))


_CACHE: dict = {}


def cached_checkpoint(root, family: str, dtype: str = "float32", max_shard_size=None):
    """``(path, float32 torch model)`` for ``family``, built once per process under ``root``.

    For bf16 checkpoints the returned torch model holds the bf16-rounded weights in float32.
    """
    key = (os.fspath(root), family, dtype, max_shard_size)
    if key not in _CACHE:
        import torch

        from transformers import AutoModelForCausalLM

        model = torch_model(family)
        name = f"{family}-{dtype}-{max_shard_size or 'single'}"
        path = save_checkpoint(model, os.path.join(os.fspath(root), name), dtype, max_shard_size)
        if dtype == "bfloat16":  # reference: the saved bf16 weights, run in float32
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
            model.eval()
        _CACHE[key] = (path, model)
    return _CACHE[key]
