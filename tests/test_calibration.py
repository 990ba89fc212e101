"""Calibration data and Hessians: a NumPy oracle from transformers' activations, chunk/device invariance,
sequential building blocks, tokenization and bad input."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hf_fixtures as F
from prinmix_jax.models import CheckpointReader, ModelConfig, load_hf_model, load_hf_params
from prinmix_jax.models.calibration import (
    HESSIAN_KEYS, block_forward, block_forward_with_hessians, collect_hessians, collect_hessians_sequential, embed,
    final_logits, tokenize_calibration)
from prinmix_jax.models.errors import CalibrationDataError

N_SEQ, SEQ = 5, 12


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("ckpt_calib")


@pytest.fixture(scope="module")
def qwen2(root):
    path, tmodel = F.cached_checkpoint(root, "qwen2")
    return path, tmodel, ModelConfig.from_pretrained_dir(path), load_hf_params(path, jnp.float32)


@pytest.fixture(scope="module")
def ids():
    return F.random_ids(160, (N_SEQ, SEQ), seed=7)


def _captured_hessians(tmodel, ids):
    """NumPy float64 ``X^T X / N`` from the inputs transformers' linears actually receive."""
    caps, hooks = {}, []

    def hook(key):
        def f(_mod, args):
            x = args[0].detach().double().numpy()
            caps.setdefault(key, []).append(x.reshape(-1, x.shape[-1]))
        return f

    for i, layer in enumerate(tmodel.model.layers):
        for mod, key in [(layer.self_attn.q_proj, "attn_in"), (layer.self_attn.o_proj, "o_in"),
                         (layer.mlp.gate_proj, "mlp_in"), (layer.mlp.down_proj, "down_in")]:
            hooks.append(mod.register_forward_pre_hook(hook((i, key))))
    F.torch_logits(tmodel, ids)
    for h in hooks:
        h.remove()
    out = {}
    for key, xs in caps.items():
        x = np.concatenate(xs)
        out[key] = x.T @ x / x.shape[0]
    return out


def _assert_hessians_close(a, b, rtol=1e-5):
    assert len(a) == len(b)
    for ha, hb in zip(a, b):
        assert ha.num_tokens == hb.num_tokens
        for k in HESSIAN_KEYS:
            ref = np.asarray(hb[k])
            np.testing.assert_allclose(np.asarray(ha[k]), ref, atol=rtol * np.abs(ref).max(), rtol=0, err_msg=k)


@pytest.mark.parametrize("family", ["qwen2", "llama_tied"])
def test_parallel_hessians_equal_numpy_oracle(root, family, ids):
    path, tmodel = F.cached_checkpoint(root, family)
    model = load_hf_model(path, dtype=jnp.float32)
    hess = collect_hessians(model, ids=ids, chunk_size=2)
    oracle = _captured_hessians(tmodel, ids)
    cfg = model.config
    sizes = {"attn_in": cfg.hidden_size, "o_in": cfg.q_dim, "mlp_in": cfg.hidden_size,
             "down_in": cfg.intermediate_size}
    assert len(hess) == cfg.num_layers
    for i, h in enumerate(hess):
        assert h.num_tokens == N_SEQ * SEQ
        for k in HESSIAN_KEYS:
            got = np.asarray(h[k])
            assert got.dtype == np.float32 and got.shape == (sizes[k], sizes[k])
            ref = oracle[(i, k)]
            np.testing.assert_allclose(got, ref, atol=1e-5 * np.abs(ref).max(), rtol=0, err_msg=f"block {i} {k}")
        assert h["q_proj"] is h.attn_in and h.for_linear("down_proj") is h.down_in and h["up_proj"] is h.mlp_in


def test_hessians_do_not_depend_on_chunking_or_devices(qwen2, ids):
    _, _, cfg, params = qwen2
    base = collect_hessians(params, cfg, ids, chunk_size=N_SEQ)
    for chunk in (1, 3):
        _assert_hessians_close(collect_hessians(params, cfg, ids, chunk_size=chunk), base)
    assert len(jax.devices()) == 8
    for ndev, chunk in ((8, 1), (2, 3), (4, 8)):
        mesh = jax.make_mesh((ndev,), ("data",), devices=jax.devices()[:ndev])
        _assert_hessians_close(collect_hessians(params, cfg, ids, chunk_size=chunk, mesh=mesh), base)
    # A 2-D mesh: batch over "data", replicated over "model".
    mesh2 = jax.make_mesh((4, 2), ("data", "model"))
    _assert_hessians_close(collect_hessians(params, cfg, ids, chunk_size=4, mesh=mesh2, data_axis="data"), base)


def test_sequential_building_blocks(qwen2, ids):
    path, tmodel, cfg, params = qwen2
    parallel = collect_hessians(params, cfg, ids)
    h = embed(params, cfg, ids)
    seq = []
    for i in range(cfg.num_layers):
        h_next, hess = block_forward_with_hessians(params["layers"][i], cfg, h, layer=i, chunk_size=2)
        np.testing.assert_allclose(np.asarray(block_forward(params["layers"][i], cfg, h, layer=i, chunk_size=4)),
                                   np.asarray(h_next), atol=1e-5, rtol=0)
        seq.append(hess)
        h = h_next
    _assert_hessians_close(seq, parallel)
    np.testing.assert_allclose(np.asarray(final_logits(params, cfg, h)), F.torch_logits(tmodel, ids), atol=1e-4,
                               rtol=0)
    # The same loop, streamed block by block from the checkpoint, on 4 simulated devices.
    mesh = jax.make_mesh((4,), ("data",), devices=jax.devices()[:4])
    with CheckpointReader(path) as reader:
        _assert_hessians_close(collect_hessians_sequential(reader, cfg, ids, dtype=jnp.float32, mesh=mesh), parallel)
    # update_block (e.g. compression) changes what later blocks see, not the block's own Hessians.
    calls = []

    def halve_down(i, block, hess):
        calls.append((i, hess.num_tokens))
        mlp = dict(block["mlp"], down_proj={"weight": block["mlp"]["down_proj"]["weight"] * 0.5})
        return dict(block, mlp=mlp)

    upd = collect_hessians_sequential(params, cfg, ids, update_block=halve_down)
    assert calls == [(0, N_SEQ * SEQ), (1, N_SEQ * SEQ)]
    _assert_hessians_close(upd[:1], parallel[:1])
    assert float(jnp.abs(upd[1].attn_in - parallel[1].attn_in).max()) > 1e-3


def test_tokenize_text_jsonl_and_ids(root, tmp_path):
    path, _ = F.cached_checkpoint(root, "llama3")
    tokdir = tmp_path / "tok"
    F.save_tiny_tokenizer(tokdir)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokdir)
    text = " ".join(["the quick brown fox jumps over a lazy dog"] * 6)
    (tmp_path / "calib.txt").write_text(text)
    out = tokenize_calibration(tmp_path / "calib.txt", tokdir, seq_len=8, num_sequences=3)
    assert out.dtype == np.int32 and out.shape == (3, 8)
    np.testing.assert_array_equal(out.reshape(-1), tok(text)["input_ids"][:24])
    assert tokenize_calibration(str(tmp_path / "calib.txt"), tokdir, seq_len=8).shape[0] == len(tok(text)["input_ids"]) // 8
    lines = [{"text": "the quick brown fox"}, {"ids": [5, 6, 7, 8, 9]}, {"input_ids": [1, 2, 3]}]
    (tmp_path / "calib.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + "\n\n")
    got = tokenize_calibration(tmp_path / "calib.jsonl", tokdir, seq_len=4)
    stream = tok("the quick brown fox")["input_ids"] + [5, 6, 7, 8, 9, 1, 2, 3]
    np.testing.assert_array_equal(got.reshape(-1), stream[: got.size])
    # Pre-tokenized: arrays, id lists, .npy; 2-D arrays of the right width pass through.
    arr = np.arange(40, dtype=np.int64).reshape(4, 10)
    np.testing.assert_array_equal(tokenize_calibration(arr, seq_len=10), arr)
    np.testing.assert_array_equal(tokenize_calibration(arr, seq_len=20, num_sequences=2), arr.reshape(2, 20))
    np.testing.assert_array_equal(tokenize_calibration([[1, 2, 3], [4, 5]], seq_len=5), [[1, 2, 3, 4, 5]])
    np.save(tmp_path / "ids.npy", arr)
    np.testing.assert_array_equal(tokenize_calibration(tmp_path / "ids.npy", seq_len=10, num_sequences=1), arr[:1])
    # Ids from the checkpoint's tokenizer feed collect_hessians directly.
    small = tokenize_calibration(tmp_path / "calib.txt", tokdir, seq_len=8, num_sequences=2)
    hess = collect_hessians(load_hf_params(path, jnp.float32), ModelConfig.from_pretrained_dir(path), small)
    assert hess[0].num_tokens == 16


def test_calibration_bad_input(root, tmp_path):
    tokdir = tmp_path / "tok"
    F.save_tiny_tokenizer(tokdir)
    (tmp_path / "short.txt").write_text("the quick brown fox")
    with pytest.raises(CalibrationDataError, match=r"short\.txt: calibration data has 4 tokens, shorter than one "
                                                   r"sequence of seq_len=16"):
        tokenize_calibration(tmp_path / "short.txt", tokdir, seq_len=16)
    with pytest.raises(CalibrationDataError, match=r"3 sequences of 2 tokens requested but the data holds 4 tokens"):
        tokenize_calibration(tmp_path / "short.txt", tokdir, seq_len=2, num_sequences=3)
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        tokenize_calibration(tmp_path / "missing.txt", tokdir, seq_len=4)
    with pytest.raises(CalibrationDataError, match="needs a tokenizer"):
        tokenize_calibration(tmp_path / "short.txt", seq_len=2)
    path, _ = F.cached_checkpoint(root, "qwen3")  # a checkpoint folder without tokenizer files
    with pytest.raises(CalibrationDataError, match="no tokenizer files"):
        tokenize_calibration(tmp_path / "short.txt", path, seq_len=2)
    (tmp_path / "bad.jsonl").write_text('{"text": "the fox"}\n{"txt": "no"}\n')
    with pytest.raises(CalibrationDataError, match=r"bad\.jsonl:2: expected an object with a 'text'"):
        tokenize_calibration(tmp_path / "bad.jsonl", tokdir, seq_len=2)
    (tmp_path / "bad2.jsonl").write_text('{"text": "the fox"\n')
    with pytest.raises(CalibrationDataError, match=r"bad2\.jsonl:1: not valid JSON"):
        tokenize_calibration(tmp_path / "bad2.jsonl", tokdir, seq_len=2)
    with pytest.raises(CalibrationDataError, match="shorter than one sequence"):
        tokenize_calibration(np.arange(3), seq_len=4)
    cfg = ModelConfig.from_pretrained_dir(path)
    params = load_hf_params(path, jnp.float32)
    with pytest.raises(CalibrationDataError, match="vocab_size is 160"):
        collect_hessians(params, cfg, np.full((1, 4), 500, np.int32))
    with pytest.raises(CalibrationDataError, match=r"\(num_sequences, seq_len\)"):
        collect_hessians(params, cfg, np.zeros((8,), np.int32))
