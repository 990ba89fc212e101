"""Byte-level tokenizer of the SFT pair: token id = UTF-8 byte value (0..255), then a few specials.

It is also saved as a Hugging Face ``PreTrainedTokenizerFast`` (a byte-level BPE with no merges, so every
byte is one token and ids equal byte values), so that ``AutoTokenizer`` / text calibration of the checkpoint
folders produce exactly the ids of :func:`encode`.
"""
from __future__ import annotations

import json
import os

import numpy as np

__all__ = ["BOS_ID", "EOS_ID", "PAD_ID", "VOCAB_SIZE", "encode", "decode", "save_hf_tokenizer"]

BOS_ID, EOS_ID, PAD_ID = 256, 257, 258
_SPECIALS = {"<s>": BOS_ID, "</s>": EOS_ID, "<pad>": PAD_ID}
#: vocabulary size of the model (rounded up to a multiple of 8).
VOCAB_SIZE = 264


def encode(text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
    """UTF-8 bytes of ``text`` as ids, optionally framed by BOS / EOS."""
    ids = list(text.encode("utf-8"))
    return ([BOS_ID] if bos else []) + ids + ([EOS_ID] if eos else [])


def decode(ids, *, stop_at_eos: bool = True) -> str:
    """Ids back to text: bytes < 256 are decoded (invalid UTF-8 replaced); stops at EOS; other specials dropped."""
    out = bytearray()
    for i in np.asarray(ids, np.int64).reshape(-1).tolist():
        if i == EOS_ID and stop_at_eos:
            break
        if 0 <= i < 256:
            out.append(i)
    return out.decode("utf-8", errors="replace")


def _bytes_to_unicode() -> dict[int, str]:
    # The GPT-2 byte <-> printable-character table used by the ByteLevel pre-tokenizer.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def save_hf_tokenizer(path: str | os.PathLike) -> None:
    """Write ``tokenizer.json`` + ``tokenizer_config.json`` + ``special_tokens_map.json`` into ``path``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    b2u = _bytes_to_unicode()
    vocab = {b2u[b]: b for b in range(256)}
    vocab.update(_SPECIALS)
    for i in range(PAD_ID + 1, VOCAB_SIZE):
        vocab[f"<unused{i - PAD_ID - 1}>"] = i
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(_SPECIALS))
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    tok.save(os.path.join(path, "tokenizer.json"))
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
           "pad_token": "<pad>", "add_bos_token": False, "add_eos_token": False, "clean_up_tokenization_spaces": False,
           "model_max_length": 1 << 20}
    with open(os.path.join(path, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=1)
    with open(os.path.join(path, "special_tokens_map.json"), "w", encoding="utf-8") as f:
        json.dump({"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}, f, indent=1)
