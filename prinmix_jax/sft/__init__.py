"""A real fine-tuning delta without downloads: a small Llama pretrained on the standard library's sources and
fully fine-tuned on an exact-match task (sorting letters). See :func:`make_sft_pair`."""
from prinmix_jax.sft.data import (TASKS, corpus_ids, make_task, read_task_jsonl, stdlib_files, task_batch, text_windows,
                                  write_task_jsonl)
from prinmix_jax.sft.tokenizer import BOS_ID, EOS_ID, PAD_ID, VOCAB_SIZE, decode, encode, save_hf_tokenizer
from prinmix_jax.sft.train import (FULL, QUICK, SFTFamily, SFTPair, SFTSettings, default_cache_dir, make_sft_family,
                                   make_sft_pair, model_config)

__all__ = ["TASKS", "SFTFamily", "make_sft_family", "corpus_ids", "make_task", "read_task_jsonl", "stdlib_files", "task_batch", "text_windows",
           "write_task_jsonl", "BOS_ID", "EOS_ID", "PAD_ID", "VOCAB_SIZE", "decode", "encode", "save_hf_tokenizer",
           "FULL", "QUICK", "SFTPair", "SFTSettings", "default_cache_dir", "make_sft_pair", "model_config"]
