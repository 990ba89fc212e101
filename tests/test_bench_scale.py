"""The synthetic 7B-shaped checkpoint writer of benchmarks/bench_scale.py, at a tiny scale: sharded bf16
safetensors with an index, a config transformers reads, tensors prinmix_jax.models reads back."""
from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import bench_scale  # noqa: E402


@pytest.mark.parametrize("key", ["llama3", "qwen25"])
def test_writer_tiny_pair_reads_back(tmp_path, key):
    spec = bench_scale.scaled_spec(key, 1 / 64, layers=1)        # hidden 64 / 56, heads kept, head_dim 2
    assert spec["hidden"] == spec["heads"] * spec["head_dim"]
    pair = bench_scale.write_pair(str(tmp_path), spec, shard_bytes=64 << 10)
    assert pair["num_shards"] > 1
    shapes = dict(bench_scale.tensor_shapes(spec))
    for kind in ("base", "ft"):
        folder = pair[kind]
        with open(os.path.join(folder, "model.safetensors.index.json")) as f:
            index = json.load(f)
        assert set(index["weight_map"]) == set(shapes)
        assert index["metadata"]["total_size"] == 2 * sum(int(np.prod(s)) for s in shapes.values())
        assert set(index["weight_map"].values()) == {f for f in os.listdir(folder) if f.endswith(".safetensors")}

        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(folder)
        assert (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size) == (spec["hidden"], spec["inter"], spec["vocab"])
        assert (cfg.num_attention_heads, cfg.num_key_value_heads) == (spec["heads"], spec["kv_heads"])

    from prinmix_jax.models import CheckpointReader, ModelConfig, load_hf_params

    mcfg = ModelConfig.from_pretrained_dir(pair["ft"])
    assert mcfg.qkv_bias == (key == "qwen25")
    reader = CheckpointReader(pair["ft"])
    assert sorted(reader.names()) == sorted(shapes)
    assert all(reader.tensor_header(n)[0] == tuple(s) for n, s in shapes.items())
    reader.close()
    base = load_hf_params(pair["base"], device_put=False)
    ft = load_hf_params(pair["ft"], device_put=False)
    d = np.asarray(ft["embed_tokens"]["weight"], np.float32)
    b = np.asarray(base["embed_tokens"]["weight"], np.float32)
    rel = np.linalg.norm(d - b) / np.linalg.norm(b)
    assert 2e-4 < rel < 3e-3          # ~1e-3 before bf16 rounding; some of it survives
    st = pair["delta_stats"]["q_proj"]
    assert st["planted_share_survived"] > 2 * st["planted_share_white"]   # still far from white


def test_parallel_writer_same_bytes(tmp_path):
    """Shards written by two processes at once are the bytes one process writes, and the stats agree."""
    spec = bench_scale.scaled_spec("llama2", 1 / 64, layers=2)
    one = bench_scale.write_pair(str(tmp_path / "one"), spec, shard_bytes=32 << 10)
    two = bench_scale.write_pair(str(tmp_path / "two"), spec, shard_bytes=32 << 10, jobs=2)
    assert one["num_shards"] == two["num_shards"] > 2
    assert one["delta_stats"] == two["delta_stats"] and one["delta_stats"]
    for kind in ("base", "ft"):
        files = sorted(os.listdir(one[kind]))
        assert files == sorted(os.listdir(two[kind]))
        for f in files:
            with open(os.path.join(one[kind], f), "rb") as a, open(os.path.join(two[kind], f), "rb") as b:
                assert a.read() == b.read(), f


def test_help_runs():
    with pytest.raises(SystemExit) as e:
        bench_scale.main(["--help"])
    assert e.value.code == 0


def test_device_bench_stacks_are_a_blocks_linears():
    """benchmarks/bench_svd_devices.py models a block's SVD stacks: together exactly the block's linears, and
    matrices of one shape and one input (q/k/v, gate/up) in one stack, as the pipeline stacks them."""
    import bench_svd_devices
    for key in bench_scale.MODELS:
        spec = bench_scale.scaled_spec(key)
        linears = sorted(s for name, s in bench_scale.tensor_shapes(spec)
                         if name.startswith("model.layers.0.") and name.endswith("proj.weight"))
        stacks = bench_svd_devices.block_stacks(spec)
        assert sorted(shape for _, b, shape in stacks for _ in range(b)) == linears
        inputs = {"q": "attn", "k": "attn", "v": "attn", "o": "o", "gate": "mlp", "up": "mlp", "down": "down"}
        keys = [(shape, inputs[names.split(",")[0]]) for names, _, shape in stacks]
        assert len(set(keys)) == len(keys)


def test_stage_timers_keep_other_threads_apart():
    """Blocks read ahead (and U steps on other devices) run in threads: their wrapped calls are timed apart
    (``overlapped``), without touching the main thread's stage stack, so the stages still add up to the wall
    time."""
    import threading
    import time
    import types

    timers = bench_scale._Timers()
    ns = types.SimpleNamespace(read=lambda: time.sleep(0.05), outer=None)
    timers.wrap(ns, "read", "read")

    def outer():
        t = threading.Thread(target=ns.read)
        t.start()
        time.sleep(0.01)
        ns.read()                                  # the main thread's own read, nested in the outer stage
        t.join()
    ns.outer = outer
    timers.wrap(ns, "outer", "compress_other")
    ns.outer()
    assert timers.stack == []
    assert set(timers.overlapped) == {"read"} and 0.04 < timers.overlapped["read"] < 1.0
    assert timers.calls[("block", "read")] == 1      # only the main thread's read is a stage
    assert timers.calls[("block", "compress_other")] == 1


def test_sub_stages_roll_up_into_their_parent_column(capsys):
    """A sub-stage ("rtc_u.gptq") is timed on its own, counts in its parent's column of the stage table, is listed
    by :func:`bench_scale.stage_parts` beside the parent's own exclusive rest, and prints no ``[stage]`` line."""
    import time
    import types

    timers = bench_scale._Timers()
    ns = types.SimpleNamespace(a=lambda: time.sleep(0.05), b=lambda: time.sleep(0.03), step=None)
    timers.wrap(ns, "a", "rtc_u.gptq")
    timers.wrap(ns, "b", "rtc_u.target")

    def step():
        ns.a()
        ns.b()
        ns.a()
    ns.step = step
    timers.wrap(ns, "step", "rtc_u")
    ns.step()
    child = {"stages": [[sc, st, v, timers.calls[(sc, st)]] for (sc, st), v in timers.seconds.items()]}
    table = bench_scale._stage_table(child, wall=1.0, plain=False)
    parts = bench_scale.stage_parts(child, "rtc_u")
    assert set(parts) == {"gptq", "target", "rest"}
    assert parts["gptq"] >= 0.1 and parts["target"] >= 0.03 and parts["rest"] < 0.03
    assert table["rtc_u"] == sum(parts.values()) and table["rtc_u"] >= 0.13
    assert bench_scale.stage_parts(child, "svd") == {}
    printed = capsys.readouterr().err
    assert "[stage] block/rtc_u " in printed and "rtc_u.gptq" not in printed


#: Hub config.json files of two architectures the built-in shapes do not cover: Qwen3-4B (q/k norms, head_dim
#: 128 with hidden 2560, so q_proj is 4096×2560; tied embeddings; GQA 4) and Mistral-7B (GQA 8, sliding window).
QWEN3_4B = {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "vocab_size": 151936, "hidden_size": 2560,
            "intermediate_size": 9728, "num_hidden_layers": 36, "num_attention_heads": 32, "num_key_value_heads": 8,
            "head_dim": 128, "tie_word_embeddings": True, "rms_norm_eps": 1e-6, "rope_theta": 1000000,
            "max_position_embeddings": 40960, "hidden_act": "silu", "attention_bias": False, "sliding_window": None,
            "use_sliding_window": False, "max_window_layers": 36, "layer_types": ["full_attention"] * 36,
            "torch_dtype": "bfloat16"}
MISTRAL_7B = {"architectures": ["MistralForCausalLM"], "model_type": "mistral", "vocab_size": 32000,
              "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
              "num_key_value_heads": 8, "sliding_window": 4096, "rope_theta": 10000.0,
              "max_position_embeddings": 32768, "rms_norm_eps": 1e-5, "hidden_act": "silu",
              "tie_word_embeddings": False, "torch_dtype": "bfloat16"}


@pytest.mark.parametrize("hub", [QWEN3_4B, MISTRAL_7B], ids=["qwen3-4b", "mistral-7b"])
def test_pair_from_a_users_config_json(tmp_path, hub):
    """``--models path/config.json``: the pair has that model's tensors (the library's key map: q/k norms, no
    head when tied, q_proj wider than hidden), scaled like the built-in shapes, and reads back as that model."""
    folder = tmp_path / "My-Model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(hub))
    full = bench_scale.scaled_spec(str(folder), 1.0, layers=2)
    assert full["title"] == "My-Model" and full["layers_full"] == hub["num_hidden_layers"]
    assert (full["hidden"], full["inter"], full["vocab"]) == (hub["hidden_size"], hub["intermediate_size"],
                                                               hub["vocab_size"])
    spec = bench_scale.scaled_spec(str(folder / "config.json"), 1 / 64, layers=2)
    assert spec["head_dim"] == 2 and spec["kv_heads"] == hub["num_key_value_heads"]
    square = hub["hidden_size"] == hub["num_attention_heads"] * hub.get("head_dim", 128)
    assert (spec["hidden"] == spec["heads"] * spec["head_dim"]) == square
    pair = bench_scale.write_pair(str(tmp_path / "pair"), spec, shard_bytes=64 << 10)
    shapes = dict(bench_scale.tensor_shapes(spec))
    tied = hub["tie_word_embeddings"]
    assert ("lm_head.weight" in shapes) == (not tied)
    assert ("model.layers.1.self_attn.q_norm.weight" in shapes) == (hub["model_type"] == "qwen3")
    assert shapes["model.layers.0.self_attn.q_proj.weight"] == (spec["heads"] * spec["head_dim"], spec["hidden"])

    from transformers import AutoConfig

    from prinmix_jax.models import CheckpointReader, ModelConfig, load_hf_params

    for kind in ("base", "ft"):
        cfg = ModelConfig.from_pretrained_dir(pair[kind])
        assert (cfg.model_type, cfg.num_layers, cfg.tie_word_embeddings) == (hub["model_type"], 2, tied)
        assert (cfg.q_dim, cfg.hidden_size) == (spec["heads"] * spec["head_dim"], spec["hidden"])
        hf = AutoConfig.from_pretrained(pair[kind])
        assert (hf.model_type, hf.num_hidden_layers, hf.hidden_size) == (hub["model_type"], 2, spec["hidden"])
    reader = CheckpointReader(pair["ft"])
    assert sorted(reader.names()) == sorted(shapes)
    reader.close()
    load_hf_params(pair["ft"], device_put=False)        # the library's own checks of a whole checkpoint

    # the memory bound counts what is written: a block's tensors, one embedding matrix per model when tied
    args = bench_scale.argparse.Namespace(calib_seqs=4, seq_len=8)
    bound = bench_scale.rss_bound(spec, args, calibrated=False)
    assert bound["blocks"] == 3 * 2 * 4 * sum(int(np.prod(s)) for n, s in shapes.items()
                                              if n.startswith("model.layers.0."))
    assert bound["embeddings"] == 2 * 4 * (1 if tied else 2) * spec["vocab"] * spec["hidden"]
    assert bound["runtime"] == bench_scale.RUNTIME_BYTES and bound["calibration"] == 0
    measured = bench_scale.rss_bound(spec, args, calibrated=True, runtime_bytes=5 * bench_scale.RUNTIME_BYTES)
    assert measured["runtime"] == 5 * bench_scale.RUNTIME_BYTES       # an accelerator's larger runtime counts
    assert measured["calibration"] > 0


def test_models_option_refuses_what_it_cannot_read(tmp_path, capsys):
    """Neither a built-in model nor a config.json, or a config of an architecture prinmix does not read: a usage
    error naming it, before anything is written."""
    with pytest.raises(SystemExit) as e:
        bench_scale.main(["--models", str(tmp_path / "nowhere"), "--workdir", str(tmp_path / "w")])
    assert e.value.code == 2 and "nowhere" in capsys.readouterr().err
    bad = tmp_path / "gpt2.json"
    bad.write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_embd": 64}))
    with pytest.raises(SystemExit) as e:
        bench_scale.main(["--models", str(bad), "--workdir", str(tmp_path / "w")])
    assert e.value.code == 2 and "gpt2" in capsys.readouterr().err
    assert not os.listdir(tmp_path / "w")


def test_runtime_rss_is_measured_once_at_the_first_wrapped_call():
    """The child records what the process holds before its first library call (the backend's runtime), once."""
    import types

    timers = bench_scale._Timers()
    calls = []
    ns = types.SimpleNamespace(read=lambda: calls.append(timers.runtime_rss))
    timers.wrap(ns, "read", "read")
    assert timers.runtime_rss is None
    ns.read()
    first = timers.runtime_rss
    assert calls == [first] and first > 10 << 20           # measured before the call ran, in bytes
    ns.read()
    assert timers.runtime_rss == first


def test_rss_breakdown_tells_arrays_from_mapped_checkpoints(tmp_path):
    """The memory breakdown the child records at its peak: a touched array lands in ``anonymous``, a mapped
    safetensors file's read pages in ``checkpoint files``; the kinds add up to the resident set."""
    before = bench_scale.rss_breakdown()
    assert before["libraries"] > 0
    arr = np.ones(48 << 20, np.float32)                              # 192 MiB, touched
    path = tmp_path / "model-00001-of-00001.safetensors"
    np.full(24 << 20, 3, np.float32).tofile(path)                    # 96 MiB on disk
    mapped = np.memmap(path, np.float32, mode="r")
    assert float(mapped.sum()) == 3.0 * (24 << 20)                   # every page read through the mapping
    after = bench_scale.rss_breakdown()
    assert after["anonymous"] - before["anonymous"] > 0.9 * arr.nbytes
    assert after["checkpoint files"] - before["checkpoint files"] > 0.9 * mapped.nbytes
    assert abs(sum(after.values()) - bench_scale._current_rss()) < 0.05 * sum(after.values())
    del mapped, arr


def test_device_array_bytes_counts_live_arrays():
    """The JAX part of the memory snapshot: live arrays by their bytes; on the CPU a NumPy conversion aliases
    the buffer, so no host copy is cached on the array (on an accelerator one would be, and is counted)."""
    import jax.numpy as jnp

    before = bench_scale.device_array_bytes()
    x = jnp.ones((512, 1024), jnp.float32) + 1.0
    np.asarray(x)
    after = bench_scale.device_array_bytes()
    assert after["live arrays"] - before["live arrays"] >= x.nbytes
    assert after["host copies of device arrays"] == before["host copies of device arrays"]
    del x
