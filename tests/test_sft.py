"""SFT pair maker: byte tokenizer (and its saved HF twin), stdlib corpus, sorting task, deterministic training,
atomic cache with reuse, full fine-tune (every parameter changes)."""
import dataclasses
import json
import os

import numpy as np
import pytest

from prinmix_jax.sft import data as D
from prinmix_jax.sft import tokenizer as T
from prinmix_jax.sft.train import (QUICK, SFTSettings, init_params, make_sft_pair, model_config, text_batches,
                                   train_lm)

TINY = dataclasses.replace(QUICK, hidden=32, layers=1, heads=2, kv_heads=2, intermediate=64, pretrain_steps=3,
                           pretrain_batch=4, pretrain_seq=32, pretrain_bytes=20_000, finetune_steps=3,
                           finetune_batch=8, finetune_examples=100)


def test_byte_tokenizer_and_saved_hf_tokenizer_agree(tmp_path):
    text = "def f(x):\n    return x  # héllo ✓"
    ids = T.encode(text, bos=True, eos=True)
    assert ids[0] == T.BOS_ID and ids[-1] == T.EOS_ID and max(ids[1:-1]) < 256
    assert T.decode(ids[1:]) == text and T.decode([104, 105, T.EOS_ID, 104]) == "hi"
    T.save_hf_tokenizer(tmp_path)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tmp_path))
    assert tok(text)["input_ids"] == T.encode(text)
    assert tok.eos_token_id == T.EOS_ID and tok.bos_token_id == T.BOS_ID and tok.pad_token_id == T.PAD_ID
    assert tok.decode(T.encode(text)) == text


def test_corpus_split_is_deterministic_and_disjoint():
    files = D.stdlib_files()
    assert files == sorted(files) and len(files) > 20
    a = D.corpus_ids("train", max_bytes=5000)
    assert np.array_equal(a, D.corpus_ids("train", max_bytes=5000)) and a[0] == T.BOS_ID and len(a) == 5000
    h = D.corpus_ids("heldout", max_bytes=5000)
    assert not np.array_equal(a, h)
    w = D.text_windows(h, 100, 3)
    assert w.shape == (3, 100) and np.array_equal(w.reshape(-1), h[:300])
    with pytest.raises(ValueError):
        D.text_windows(h, 100, 1000)
    with pytest.raises(ValueError):
        D.corpus_ids("test", max_bytes=10)


def test_sorting_task_and_loss_mask(tmp_path):
    ex = D.make_task(50, seed=3, min_len=3, max_len=6)
    assert ex == D.make_task(50, seed=3, min_len=3, max_len=6)
    for e in ex:
        letters = e["prompt"][len("sort: "):-len(" =>")]
        assert 3 <= len(letters) <= 6 and len(set(letters)) == len(letters)
        assert e["answer"] == " " + "".join(sorted(letters))
    ids, mask = D.task_batch(ex[:2], 33)
    p = T.encode(ex[0]["prompt"], bos=True)
    a = T.encode(ex[0]["answer"], eos=True)
    assert ids[0, :len(p) + len(a)].tolist() == p + a and ids[0, -1] == T.PAD_ID
    # the mask marks positions whose next token is an answer token or the EOS
    assert mask[0].sum() == len(a) and ids[0, np.nonzero(mask[0])[0] + 1].tolist() == a
    path = str(tmp_path / "t.jsonl")
    D.write_task_jsonl(path, ex)
    assert D.read_task_jsonl(path) == ex
    with open(path, "a") as f:
        f.write('{"prompt": 1}\n')
    with pytest.raises(ValueError, match=":51:"):
        D.read_task_jsonl(path)


def test_training_is_deterministic_and_lowers_the_loss():
    cfg = model_config(TINY)
    text = D.corpus_ids("train", max_bytes=20_000)

    def run():
        return train_lm(init_params(cfg, 0), cfg, text_batches(text, 4, 32, 0), steps=12, lr=3e-3, progress=False)

    p1, l1 = run()
    p2, l2 = run()
    import jax

    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)))
    assert l1 == l2 and l1[-1] < l1[0]


def test_make_pair_caches_atomically_and_fine_tunes_every_parameter(tmp_path):
    from prinmix_jax.models import ModelConfig, load_hf_params

    logs = []
    pair = make_sft_pair(TINY, cache_dir=str(tmp_path), progress=False, log=logs.append)
    assert os.path.basename(pair.root) == TINY.key()
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".tmp")]
    cfg = ModelConfig.from_pretrained_dir(pair.finetuned)
    assert cfg.architecture == "LlamaForCausalLM" and cfg.vocab_size == T.VOCAB_SIZE
    assert os.path.isfile(os.path.join(pair.base, "tokenizer.json"))
    b, f = load_hf_params(pair.base), load_hf_params(pair.finetuned)
    import jax

    for x, y in zip(jax.tree.leaves(b), jax.tree.leaves(f)):
        assert not np.allclose(np.asarray(x), np.asarray(y)), "full fine-tune: every tensor changes"
    info = json.load(open(os.path.join(pair.root, "info.json")))
    assert info["settings"]["finetune_steps"] == 3
    # reused from the cache: no training, same files
    mtime = os.path.getmtime(os.path.join(pair.finetuned, "config.json"))
    again = make_sft_pair(TINY, cache_dir=str(tmp_path), progress=False, log=logs.append)
    assert again.root == pair.root and os.path.getmtime(os.path.join(again.finetuned, "config.json")) == mtime
    assert any("reusing the SFT pair" in s for s in logs)
    # another fine-tune of the same pretraining reuses the pretrained base
    other = make_sft_pair(dataclasses.replace(TINY, finetune_lr=1e-3), cache_dir=str(tmp_path), progress=False,
                          log=logs.append)
    assert other.root != pair.root and any("reusing the pretrained base" in s for s in logs)
    b2 = load_hf_params(other.base)
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(jax.tree.leaves(b), jax.tree.leaves(b2)))


def test_settings_key_depends_on_every_field():
    keys = {SFTSettings().key()}
    for f in dataclasses.fields(SFTSettings):
        v = getattr(SFTSettings(), f.name)
        keys.add(dataclasses.replace(SFTSettings(), **{f.name: v * 2 if v else 1}).key())
    assert len(keys) == len(dataclasses.fields(SFTSettings)) + 1


def test_every_task_answers_its_own_transformation_of_shared_words():
    words = None
    oracle = {"sort": lambda w: "".join(sorted(w)), "reverse": lambda w: "".join(reversed(w)),
              "sortdesc": lambda w: "".join(sorted(w))[::-1], "upper": lambda w: w.upper()}
    assert set(D.TASKS) == set(oracle)
    for task, fn in oracle.items():
        ex = D.make_task(40, seed=7, min_len=3, max_len=6, task=task)
        head = D.prompt_format(task).split("{}")[0]
        w = [e["prompt"][len(head):-len(" =>")] for e in ex]
        assert all(e["answer"] == " " + fn(x) for e, x in zip(ex, w))
        assert words is None or w == words     # one seed, one list of words for every task
        words = w
        s = dataclasses.replace(TINY, task=task, task_max_len=6)
        ids, _ = D.task_batch(ex, s.task_seq)   # the longest example fits the task's sequence
        assert ids.shape == (40, s.task_seq)
    with pytest.raises(ValueError, match="unknown SFT task 'shout'.*sort"):
        D.make_task(2, seed=0, task="shout")


def test_family_shares_one_pretrained_base_across_task_fine_tunes(tmp_path):
    import jax

    from prinmix_jax.models import load_hf_params
    from prinmix_jax.sft import make_sft_family

    logs = []
    fam = make_sft_family(TINY, ("sort", "reverse", "upper"), cache_dir=str(tmp_path), progress=False,
                          log=logs.append)
    assert list(fam.finetuned) == ["sort", "reverse", "upper"]
    assert sum("pretraining" in s for s in logs) == 1     # one pretraining for the three fine-tunes
    base = jax.tree.leaves(load_hf_params(fam.base))
    fts = {t: jax.tree.leaves(load_hf_params(p)) for t, p in fam.finetuned.items()}
    for t, pair in fam.pairs.items():
        assert json.load(open(os.path.join(pair.root, "info.json")))["task"] == t
        same_base = jax.tree.leaves(load_hf_params(pair.base))
        assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(base, same_base))
    a, b = fts["sort"], fts["reverse"]
    assert not all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a, b))
    # the sort fine-tune is the plain pair of the same settings (one cache for both makers)
    assert make_sft_pair(TINY, cache_dir=str(tmp_path), progress=False).root == fam.pairs["sort"].root
    with pytest.raises(ValueError, match="repeat"):
        make_sft_family(TINY, ("sort", "sort"), cache_dir=str(tmp_path), progress=False)
