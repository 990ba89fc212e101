"""Checkpoint reading and writing: round trips through transformers, sharding, block streaming, bad input."""

import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import hf_fixtures as F
from prinmix_jax.models import (
    CheckpointError, CheckpointReader, CheckpointWriter, ModelConfig, UnsupportedArchitectureError,
    load_hf_model, load_hf_params, read_block, read_globals, save_hf_model)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("ckpt_io")


def _hf_load(path, dtype="float32"):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype),
                                                attn_implementation="eager").eval()


def _state(model):
    return {k: v.detach().float().numpy() for k, v in model.state_dict().items()}


def _assert_same_tensors(a, b):
    assert sorted(a) == sorted(b)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.mark.parametrize("family", ["llama3", "qwen2", "qwen3", "llama_tied"])
def test_round_trip_through_transformers(root, tmp_path, family):
    path, tmodel = F.cached_checkpoint(root, family)
    model = load_hf_model(path, dtype=jnp.float32)
    out = tmp_path / "saved"
    save_hf_model(model, out, config_from=path)
    assert sorted(os.listdir(out)) == ["config.json", "generation_config.json", "model.safetensors"]
    back = _hf_load(out)
    _assert_same_tensors(_state(back), _state(tmodel))
    ids = F.random_ids(160, (2, 16), seed=5)
    np.testing.assert_array_equal(F.torch_logits(back, ids), F.torch_logits(tmodel, ids))
    # config.json keeps the keys this package does not model and reads back to the same config.
    cfg_out = json.load(open(out / "config.json"))
    assert cfg_out["bos_token_id"] == 1 and cfg_out["eos_token_id"] == 2 and cfg_out["dtype"] == "float32"
    assert ModelConfig.from_pretrained_dir(out) == model.config


def test_bfloat16_round_trip_is_bit_exact(root, tmp_path):
    path, _ = F.cached_checkpoint(root, "qwen3", dtype="bfloat16")
    params = load_hf_params(path)
    assert params["layers"][1]["mlp"]["down_proj"]["weight"].dtype == jnp.bfloat16
    save_hf_model(params, tmp_path, config_from=path)
    assert json.load(open(tmp_path / "config.json"))["dtype"] == "bfloat16"
    for k, v in load_file(str(tmp_path / "model.safetensors")).items():
        ref = load_file(os.path.join(path, "model.safetensors"))[k]
        assert v.dtype == ref.dtype and np.array_equal(v.view(np.uint16), ref.view(np.uint16)), k
    # Casting on save: a float32 model written as bf16 equals transformers' own bf16 cast.
    f32 = load_hf_model(path, dtype=jnp.float32)
    save_hf_model(f32, tmp_path / "cast", dtype=jnp.bfloat16)
    back = _hf_load(tmp_path / "cast", "bfloat16")
    _assert_same_tensors(_state(back), _state(_hf_load(path, "bfloat16")))


def test_sharded_checkpoints_load_and_save(root, tmp_path):
    path, tmodel = F.cached_checkpoint(root, "mistral", max_shard_size="60KB")
    files = sorted(os.listdir(path))
    assert "model.safetensors.index.json" in files and sum(f.endswith(".safetensors") for f in files) > 2
    ids = F.random_ids(160, (2, 16), seed=6)
    model = load_hf_model(path, dtype=jnp.float32)
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(ids))), F.torch_logits(tmodel, ids), atol=1e-4, rtol=0)
    out = tmp_path / "sharded"
    save_hf_model(model, out, max_shard_size="50KB")
    index = json.load(open(out / "model.safetensors.index.json"))
    shards = sorted(f for f in os.listdir(out) if f.endswith(".safetensors"))
    assert len(shards) > 2 and set(index["weight_map"].values()) == set(shards)
    assert shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert all(os.path.getsize(out / f) < 50_000 + 70_000 for f in shards)  # one tensor may exceed the limit
    assert index["metadata"]["total_size"] == sum(v.nbytes for v in _state(tmodel).values())
    back = _hf_load(out)
    _assert_same_tensors(_state(back), _state(tmodel))
    np.testing.assert_array_equal(F.torch_logits(back, ids), F.torch_logits(tmodel, ids))
    # Re-saving unsharded into the same folder removes the stale shards and index.
    save_hf_model(model, out)
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
    _assert_same_tensors(_state(_hf_load(out)), _state(tmodel))


def test_block_streaming_reader_and_writer(root, tmp_path):
    path, tmodel = F.cached_checkpoint(root, "qwen2", max_shard_size="60KB")
    params = load_hf_params(path, jnp.float32)
    with CheckpointReader(path) as reader:
        assert reader.config.num_layers == 2 and "model.norm.weight" in reader.names()
        assert reader.file_of("model.norm.weight").endswith(".safetensors")
        for i in range(2):
            blk = reader.read_block(i, device_put=False)
            assert isinstance(blk["self_attn"]["q_proj"]["bias"], np.ndarray)
            for k in ("q_proj", "k_proj"):
                np.testing.assert_array_equal(blk["self_attn"][k]["weight"], params["layers"][i]["self_attn"][k]["weight"])
        with pytest.raises(ValueError, match="block 2 out of range"):
            reader.read_block(2)
        # The pipeline pattern: globals, then one block at a time (maybe modified), into a writer.
        w = CheckpointWriter(tmp_path / "streamed", reader.config, max_shard_size="40KB")
        w.add_globals(reader.read_globals())
        for i in range(reader.config.num_layers):
            w.add_block(i, reader.read_block(i))
        w.close(copy_from=path)
    _assert_same_tensors(_state(_hf_load(tmp_path / "streamed")), _state(tmodel))
    g = read_globals(path)
    assert sorted(g) == ["embed_tokens", "lm_head", "norm"]
    np.testing.assert_array_equal(read_block(path, 1)["mlp"]["up_proj"]["weight"],
                                  params["layers"][1]["mlp"]["up_proj"]["weight"])


def test_writer_streams_each_tensor_to_disk(root, tmp_path):
    """CheckpointWriter writes each tensor as it is added; a shard's header goes last into room reserved at
    the front, padded with spaces (which the safetensors format allows). So what the writer holds stays at
    about one tensor, not a shard (a 5-GB shard of a 7B model used to wait in memory), and safetensors' own
    reader takes every tensor back, of any dtype, with the usual metadata and 8-byte aligned data."""
    import tracemalloc

    import ml_dtypes
    import torch
    from safetensors import safe_open

    from prinmix_jax.models.llama import params as P

    path, _ = F.cached_checkpoint(root, "qwen2")
    cfg = ModelConfig.from_pretrained_dir(path)
    rng = np.random.default_rng(0)
    tensors = {n: rng.standard_normal(s).astype(np.float32) for n, (_, s) in P.expected_tensors(cfg).items()}
    largest, total = max(v.nbytes for v in tensors.values()) // 2, sum(v.nbytes for v in tensors.values()) // 2
    assert total > 8 * largest
    w = CheckpointWriter(tmp_path / "one", cfg, dtype="bfloat16")    # one shard; every add casts (allocates)
    tracemalloc.start()
    try:
        for n, v in tensors.items():
            w.add(n, v)
        held = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    w.close()
    assert held < 2 * largest + 16_000, (held, largest, total)     # it held the whole shard: ~total
    f = tmp_path / "one" / "model.safetensors"
    with open(f, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        head = fh.read(n)
    assert n % 8 == 0 and head.startswith(b"{") and head.endswith(b" ")
    with safe_open(str(f), framework="pt") as sf:
        assert sf.metadata() == {"format": "pt"} and sorted(sf.keys()) == sorted(tensors)
        for k, v in tensors.items():
            got = sf.get_tensor(k)
            assert got.dtype == torch.bfloat16
            np.testing.assert_array_equal(got.float().numpy(), v.astype(ml_dtypes.bfloat16).astype(np.float32))
    # mixed dtypes kept as given (dtype=None), over several shards
    mixed = {k: v.astype([np.float32, np.float16, ml_dtypes.bfloat16][i % 3]) for i, (k, v) in enumerate(tensors.items())}
    w = CheckpointWriter(tmp_path / "mixed", cfg, max_shard_size="40KB")
    for k, v in mixed.items():
        w.add(k, v)
    w.close()
    shards = [x for x in os.listdir(tmp_path / "mixed") if x.endswith(".safetensors")]
    assert len(shards) > 2
    seen = {}
    for s in shards:
        with safe_open(str(tmp_path / "mixed" / s), framework="pt") as sf:
            seen.update({k: sf.get_tensor(k) for k in sf.keys()})
    assert sorted(seen) == sorted(mixed)
    for k, v in mixed.items():
        assert str(seen[k].dtype).endswith({"float32": "float32", "float16": "float16", "bfloat16": "bfloat16"}[v.dtype.name])
        np.testing.assert_array_equal(seen[k].float().numpy(), v.astype(np.float32))
    with pytest.raises(CheckpointError, match="safetensors cannot store"):
        CheckpointWriter(tmp_path / "c", cfg).add("model.norm.weight", np.zeros(cfg.hidden_size, np.complex128))


def test_tokenizer_files_are_copied(root, tmp_path):
    path, _ = F.cached_checkpoint(root, "llama3")
    src = tmp_path / "src"
    shutil.copytree(path, src)
    F.save_tiny_tokenizer(src)
    save_hf_model(load_hf_params(src), tmp_path / "out", config_from=src)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert tok("the quick fox")["input_ids"] == AutoTokenizer.from_pretrained(src)("the quick fox")["input_ids"]


# ----- bad input ---------------------------------------------------------------------------------
@pytest.fixture()
def ckpt(root, tmp_path):
    """A private, editable copy of a float32 qwen2 checkpoint."""
    path, _ = F.cached_checkpoint(root, "qwen2")
    dst = tmp_path / "ckpt"
    shutil.copytree(path, dst)
    return dst


def _rewrite(ckpt, fn):
    tensors = load_file(str(ckpt / "model.safetensors"))
    save_file(fn(dict(tensors)), str(ckpt / "model.safetensors"), metadata={"format": "pt"})


def test_missing_config_json(ckpt, tmp_path):
    (ckpt / "config.json").write_text("{broken")
    with pytest.raises(CheckpointError, match=r"config\.json: not valid JSON"):
        load_hf_model(ckpt)
    with pytest.raises(FileNotFoundError, match="is a file, not a folder"):
        load_hf_model(ckpt / "model.safetensors")
    os.remove(ckpt / "config.json")
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_hf_model(ckpt)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_hf_params(tmp_path / "nowhere")


def test_missing_tensor(ckpt):
    _rewrite(ckpt, lambda t: {k: v for k, v in t.items() if k != "model.layers.1.mlp.up_proj.weight"})
    with pytest.raises(CheckpointError, match=r"lacks 1 tensor.*model\.layers\.1\.mlp\.up_proj\.weight"):
        load_hf_model(ckpt)


def test_extra_tensor(ckpt):
    _rewrite(ckpt, lambda t: {**t, "model.layers.0.mlp.extra.weight": np.zeros((2, 2), np.float32)})
    with pytest.raises(CheckpointError, match=r"unexpected tensor.*model\.layers\.0\.mlp\.extra\.weight.*model\.safetensors"):
        load_hf_params(ckpt)


def test_ignorable_rotary_buffer_is_accepted(ckpt):
    _rewrite(ckpt, lambda t: {**t, "model.layers.0.self_attn.rotary_emb.inv_freq": np.zeros((4,), np.float32)})
    assert "rotary_emb" not in str(load_hf_params(ckpt)["layers"][0].keys())


def test_reader_reads_rows_and_converts_by_rows(root, tmp_path, monkeypatch):
    """read_rows reads any rows by plain file reads, in the stored dtype or converted (the values safetensors
    gives); read(name, dtype) is filled that way a block of rows at a time into a new writeable array, the
    same values as converting the whole; bad row ranges are refused and a tensor whose data is cut short is
    named."""
    import ml_dtypes

    import prinmix_jax.models.checkpoint_files as CF

    path, _ = F.cached_checkpoint(root, "qwen2")
    tensors = load_file(os.path.join(path, "model.safetensors"))
    kinds = [np.float32, np.float16, ml_dtypes.bfloat16]
    mixed = {k: v.astype(kinds[i % 3]) for i, (k, v) in enumerate(sorted(tensors.items()))}
    dst = tmp_path / "mixed"
    shutil.copytree(path, dst)
    save_file(mixed, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    monkeypatch.setattr(CF, "READ_BLOCK_BYTES", 300)                   # a few rows per block
    with CheckpointReader(dst) as reader:
        for k, v in mixed.items():
            assert reader.stored_dtype(k) == v.dtype
            got = reader.read(k, np.float32)
            assert got.dtype == np.float32 and got.flags.writeable
            np.testing.assert_array_equal(got, v.astype(np.float32), err_msg=k)
            if v.ndim:
                a, z = len(v) // 3, len(v) // 3 + max(1, len(v) // 4)
                np.testing.assert_array_equal(reader.read_rows(k, a, z).view(np.uint8), v[a:z].view(np.uint8))
        name = "model.embed_tokens.weight"
        for a, z in ((-1, 2), (3, 2), (0, len(mixed[name]) + 1)):
            with pytest.raises(ValueError, match="rows"):
                reader.read_rows(name, a, z)
    with CheckpointReader(dst) as reader:                                # the file shrinks once it is open
        last = max(mixed, key=lambda k: reader._entry(k)[2])
        data = (dst / "model.safetensors").read_bytes()
        (dst / "model.safetensors").write_bytes(data[:-64])
        with pytest.raises(CheckpointError, match=f"{last}' is cut short"):
            reader.read(last, np.float32)


def test_writer_takes_a_tensor_by_blocks_of_rows(root, tmp_path):
    """add_rows writes a tensor from blocks of its rows (apply never holds a vocab tensor whole): the same file
    bytes as add() of the whole; too few or too many rows, or a block of the wrong width, are refused."""
    path, _ = F.cached_checkpoint(root, "qwen2")
    cfg = ModelConfig.from_pretrained_dir(path)
    tensors = load_file(os.path.join(path, "model.safetensors"))
    outs = {}
    for how in ("whole", "rows"):
        w = CheckpointWriter(tmp_path / how, cfg, dtype="bfloat16")
        for k, v in sorted(tensors.items()):
            if how == "whole" or v.ndim == 1:
                w.add(k, v)
            else:
                w.add_rows(k, v.shape, (v[a:a + 5] for a in range(0, len(v), 5)))
        w.close()
        outs[how] = (tmp_path / how / "model.safetensors").read_bytes()
    assert outs["whole"] == outs["rows"]
    name = "model.embed_tokens.weight"
    v = tensors[name]
    for blocks, match in (([v[:-1]], "bytes of rows"), ([v, v[:1]], "bytes of rows"), ([v[:, :-1]], "a block of")):
        w = CheckpointWriter(tmp_path / f"bad{len(blocks)}{match[0]}", cfg)
        with pytest.raises(CheckpointError, match=match):
            w.add_rows(name, v.shape, iter(blocks), np.float32)
        w.abort()


def test_tensor_digest_by_rows_is_the_digest_of_the_whole():
    from prinmix_jax.storage import TensorDigest, tensor_digest

    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((7, 3)).astype(np.float32), rng.standard_normal(5).astype(np.float32)
    d = TensorDigest()
    d.begin("a", a.shape)
    for i in range(0, 7, 3):
        d.update_rows(a[i:i + 3])
    d.update("b", b)
    assert d.hexdigest() == tensor_digest([("b", b), ("a", a)])
    assert d.hexdigest() != tensor_digest([("b", b), ("a", a[::-1])])


def test_redundant_tied_head(root, tmp_path):
    path, _ = F.cached_checkpoint(root, "llama_tied")
    dst = tmp_path / "tied"
    shutil.copytree(path, dst)
    _rewrite(dst, lambda t: {**t, "lm_head.weight": t["model.embed_tokens.weight"]})
    assert "lm_head" not in load_hf_params(dst)  # an identical copy of the tied head is accepted
    _rewrite(dst, lambda t: {**t, "lm_head.weight": t["model.embed_tokens.weight"] + 1})
    with pytest.raises(CheckpointError, match="tie_word_embeddings is true but 'lm_head.weight' differs"):
        load_hf_params(dst)


def test_shape_disagrees_with_config(ckpt):
    cfg = json.load(open(ckpt / "config.json"))
    cfg["intermediate_size"] = 100
    json.dump(cfg, open(ckpt / "config.json", "w"))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor 'model\.layers\.0\.mlp\.\w+_proj\.weight' "
                                              r"has shape \(\d+, \d+\) but config\.json implies"):
        load_hf_model(ckpt)


def test_non_float_tensor(ckpt):
    _rewrite(ckpt, lambda t: {**t, "model.norm.weight": t["model.norm.weight"].astype(np.int32)})
    with pytest.raises(CheckpointError, match="'model.norm.weight' has dtype I32"):
        load_hf_params(ckpt)


def test_unsupported_architecture(ckpt):
    cfg = json.load(open(ckpt / "config.json"))
    cfg.update(architectures=["Gemma2ForCausalLM"], model_type="gemma2")
    json.dump(cfg, open(ckpt / "config.json", "w"))
    with pytest.raises(UnsupportedArchitectureError, match=r"Gemma2ForCausalLM.*supported architectures: "
                                                           r"LlamaForCausalLM, MistralForCausalLM"):
        load_hf_model(ckpt)


@pytest.mark.parametrize("damage", ["truncate", "garbage_header"])
def test_corrupt_safetensors(ckpt, damage):
    f = ckpt / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[:-100] if damage == "truncate" else b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}" + data[20:])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: not a valid safetensors file"):
        load_hf_model(ckpt)


def test_bad_sharded_index(root, tmp_path):
    path, _ = F.cached_checkpoint(root, "mistral", max_shard_size="60KB")
    dst = tmp_path / "c"
    shutil.copytree(path, dst)
    index = json.load(open(dst / "model.safetensors.index.json"))
    victim = sorted(set(index["weight_map"].values()))[-1]
    os.remove(dst / victim)
    with pytest.raises(FileNotFoundError, match=victim):
        load_hf_params(dst)
    (dst / "model.safetensors.index.json").write_text("{oops")
    with pytest.raises(CheckpointError, match="index.json: not a valid safetensors index"):
        load_hf_params(dst)


def test_no_weights_and_pickle_weights_are_refused(ckpt):
    os.remove(ckpt / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        load_hf_params(ckpt)
    (ckpt / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(CheckpointError, match="only safetensors"):
        load_hf_params(ckpt)


def test_save_rejects_bad_params(root, tmp_path):
    path, _ = F.cached_checkpoint(root, "qwen2")
    params = load_hf_params(path)
    bad = {**params, "norm": {"weight": jnp.ones((3,))}}
    with pytest.raises(CheckpointError, match=r"norm/weight \(model\.norm\.weight\) has shape \(3,\)"):
        save_hf_model(bad, tmp_path / "x", config_from=path)
    with pytest.raises(ValueError, match="needs config_from"):
        save_hf_model(params, tmp_path / "y")
    w = CheckpointWriter(tmp_path / "z", ModelConfig.from_pretrained_dir(path))
    w.add_globals(params)
    with pytest.raises(CheckpointError, match=r"not written: 24 tensor.*model\.layers"):
        w.close()
    with pytest.raises(CheckpointError, match="not part of"):
        w.add("model.layers.9.mlp.up_proj.weight", np.zeros((1,)))
