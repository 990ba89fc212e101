"""The Flax NNX decoder against transformers: logits per family, configs, rope, bf16, param-tree access."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import hf_fixtures as F
from prinmix_jax.models import (
    LINEAR_NAMES, CausalLM, ModelConfig, UnsupportedArchitectureError, get_linear, hf_name, iter_block_linears,
    linear_path, load_hf_model, load_hf_params, model_from_params, params_from_model, set_linear)
from prinmix_jax.models.config import SUPPORTED_ARCHITECTURES
from prinmix_jax.models.errors import CheckpointError
from prinmix_jax.models.rope import rope_frequencies


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("ckpt")


@pytest.mark.parametrize("family", F.FAMILIES + F.EXTRA_ROPE_FAMILIES)
def test_float32_logits_match_transformers(root, family):
    path, tmodel = F.cached_checkpoint(root, family)
    ids = F.random_ids(160, (2, 20), seed=1)
    ref = F.torch_logits(tmodel, ids)
    model = load_hf_model(path, dtype=jnp.float32)
    got = np.asarray(model(jnp.asarray(ids)))
    assert got.dtype == np.float32 and got.shape == ref.shape
    assert np.abs(ref).max() > 1.0  # weights are O(1): the comparison is not trivially small
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)


def test_switches_change_the_output(root):
    """Negative control: the sliding window and llama3 scaling matter for the test sequences."""
    import dataclasses

    ids = jnp.asarray(F.random_ids(160, (1, 20), seed=2))
    for family, change in [("mistral", dict(sliding_window=None, layer_types=("full_attention",) * 2)),
                           ("llama3", dict(rope=dataclasses.replace(ModelConfig.from_pretrained_dir(
                               F.cached_checkpoint(root, "llama3")[0]).rope, rope_type="default")))]:
        path, _ = F.cached_checkpoint(root, family)
        params = load_hf_params(path, jnp.float32)
        cfg = ModelConfig.from_pretrained_dir(path)
        a = model_from_params(cfg, params)(ids)
        b = model_from_params(dataclasses.replace(cfg, **change), params)(ids)
        assert float(jnp.abs(a - b).max()) > 1e-2


def test_config_switches_agree_with_transformers(root):
    from transformers import AutoConfig

    for family in F.FAMILIES:
        path, _ = F.cached_checkpoint(root, family)
        cfg, hf = ModelConfig.from_pretrained_dir(path), AutoConfig.from_pretrained(path)
        assert cfg.architecture in SUPPORTED_ARCHITECTURES
        assert (cfg.num_layers, cfg.num_heads, cfg.num_kv_heads) == (2, 4, 2)
        assert cfg.head_dim == (getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads)
        assert cfg.tie_word_embeddings == hf.tie_word_embeddings
        assert cfg.rope.theta == hf.rope_parameters["rope_theta"]
        assert cfg.rope.rope_type == hf.rope_parameters["rope_type"]
    by = {f: ModelConfig.from_pretrained_dir(F.cached_checkpoint(root, f)[0]) for f in F.FAMILIES}
    assert by["qwen2"].qkv_bias and not by["qwen2"].o_bias
    assert by["qwen2"].layer_types == ("full_attention", "sliding_attention") and by["qwen2"].window(1) == 8
    assert by["mistral"].window(0) == 8
    assert by["qwen3"].qk_norm and by["qwen3"].head_dim == 24 and by["qwen3"].q_dim == 96
    assert by["llama_tied"].tie_word_embeddings and by["llama_tied"].o_bias and by["llama_tied"].mlp_bias
    assert by["llama3"].rope.original_max_position_embeddings == 16
    hash(by["llama3"])  # usable as a jit static argument


def test_config_4x_and_5x_layouts_agree():
    base = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=128, hidden_size=64,
                intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    v4 = dict(base, rope_theta=500000.0, torch_dtype="bfloat16",
              rope_scaling={"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                            "original_max_position_embeddings": 8192})
    v5 = dict(base, dtype="bfloat16", rope_parameters={
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
    a, b = ModelConfig.from_hf_config(v4), ModelConfig.from_hf_config(v5)
    assert a == b and a.dtype == "bfloat16" and a.rope.factor == 8.0
    # Writing keeps the source layout; both read back to the same config.
    assert "rope_scaling" in a.to_hf_dict() and "rope_parameters" not in a.to_hf_dict()
    assert "rope_parameters" in b.to_hf_dict()
    assert ModelConfig.from_hf_config(a.to_hf_dict()) == a == ModelConfig.from_hf_config(b.to_hf_dict())
    plain = ModelConfig.from_hf_config(dict(base, rope_theta=10000.0))
    assert plain.rope.rope_type == "default" and plain.head_dim == 16 and plain.num_kv_heads == 2


@pytest.mark.parametrize("rope", [
    {"rope_type": "default"},
    {"rope_type": "linear", "factor": 4.0},
    {"rope_type": "dynamic", "factor": 2.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 32},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "beta_fast": 16.0,
     "mscale": 1.0, "mscale_all_dim": 0.5},
])
def test_rope_frequencies_match_transformers(rope):
    import torch
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    hf = LlamaConfig(hidden_size=256, num_attention_heads=4, max_position_embeddings=64,
                     rope_parameters=dict(rope, rope_theta=50000.0))
    cfg = ModelConfig.from_hf_config(hf.to_dict())
    for seq_len in (None, 200):
        if rope["rope_type"] == "default":
            ref, scale = LlamaRotaryEmbedding.compute_default_rope_parameters(hf)
        else:
            ref, scale = ROPE_INIT_FUNCTIONS[rope["rope_type"]](hf, torch.device("cpu"), seq_len=seq_len)
        got, got_scale = rope_frequencies(cfg, seq_len)
        np.testing.assert_allclose(got, ref.numpy(), rtol=2e-6, atol=0)
        assert got_scale == pytest.approx(scale)


@pytest.mark.parametrize("family", ["llama3", "qwen3"])
def test_bfloat16_checkpoint(root, family):
    path, tmodel = F.cached_checkpoint(root, family, dtype="bfloat16")
    assert json.load(open(f"{path}/config.json"))["dtype"] == "bfloat16"
    ids = F.random_ids(160, (2, 16), seed=3)
    ref = F.torch_logits(tmodel, ids)  # float32 run of the bf16-rounded weights
    # Stored dtype kept by default; tensors are bit-identical to the checkpoint.
    model = load_hf_model(path)
    w = model.layers[0].self_attn.q_proj.weight[...]
    assert w.dtype == jnp.bfloat16
    want = tmodel.model.layers[0].self_attn.q_proj.weight.detach().numpy()
    np.testing.assert_array_equal(np.asarray(w, np.float32), want)
    got = np.asarray(model(jnp.asarray(ids)), np.float32)
    # bf16 compute: as close to the float32 result as transformers' own bf16 run, and close to that run.
    import torch
    from transformers import AutoModelForCausalLM

    tb = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, attn_implementation="eager").eval()
    ref_bf16 = F.torch_logits(tb, ids)
    assert np.abs(got - ref).max() <= 1.5 * np.abs(ref_bf16 - ref).max() + 0.02
    assert np.abs(got - ref_bf16).max() < 0.05 * np.abs(ref).max()
    # Upcast on load: float32 compute then matches to float32 tolerance.
    got32 = np.asarray(load_hf_model(path, dtype=jnp.float32)(jnp.asarray(ids)))
    np.testing.assert_allclose(got32, ref, atol=1e-4, rtol=0)


def test_param_tree_layout_and_block_linears(root):
    path, tmodel = F.cached_checkpoint(root, "qwen2")
    params = load_hf_params(path, jnp.float32)
    sd = {k: v.detach().numpy() for k, v in tmodel.state_dict().items()}
    assert sorted(params) == ["embed_tokens", "layers", "lm_head", "norm"] and sorted(params["layers"]) == [0, 1]
    seen = []
    for block, name, w in iter_block_linears(params):
        assert name in LINEAR_NAMES
        np.testing.assert_array_equal(np.asarray(w), sd[hf_name(block, name)])  # HF [out, in], untransposed
        seen.append((block, name))
    assert len(seen) == 14
    assert hf_name(1, "q_proj", "bias") in sd
    assert linear_path("down_proj") == ("mlp", "down_proj", "weight")
    # set_linear: functional, shape-checked, shares the untouched arrays.
    new_w = jnp.zeros_like(get_linear(params, 1, "o_proj"))
    new = set_linear(params, 1, "o_proj", new_w)
    assert float(jnp.abs(get_linear(params, 1, "o_proj")).sum()) > 0
    assert get_linear(new, 1, "o_proj") is new_w and get_linear(new, 0, "o_proj") is get_linear(params, 0, "o_proj")
    block0 = set_linear(params["layers"][0], None, "up_proj", jnp.ones((96, 64)))  # a block subtree
    assert float(get_linear(block0, None, "up_proj").sum()) == 96 * 64
    with pytest.raises(ValueError, match="o_proj.*shape"):
        set_linear(params, 1, "o_proj", jnp.zeros((3, 3)))
    with pytest.raises(ValueError, match="unknown linear"):
        get_linear(params, 0, "qkv_proj")
    # The NNX state of a model is the same tree.
    model = model_from_params(ModelConfig.from_pretrained_dir(path), params)
    assert jax.tree.structure(params_from_model(model)) == jax.tree.structure(params)
    with pytest.raises(CheckpointError, match="lack"):
        model_from_params(model.config, {k: v for k, v in params.items() if k != "norm"})


def test_nnx_model_api(root):
    path, tmodel = F.cached_checkpoint(root, "llama3")
    model = load_hf_model(path, dtype=jnp.float32)
    assert isinstance(model, CausalLM)
    ids = F.random_ids(160, (2, 12), seed=4)
    ref = F.torch_logits(tmodel, ids)
    got = nnx.jit(lambda m, x: m(x))(model, jnp.asarray(ids))
    np.testing.assert_allclose(np.asarray(got), ref, atol=1e-4, rtol=0)
    # Right padding: valid positions agree with transformers given the same attention mask.
    import torch

    mask = np.ones_like(ids)
    mask[1, 8:] = 0
    with torch.no_grad():
        ref_m = tmodel(input_ids=torch.as_tensor(ids, dtype=torch.long),
                       attention_mask=torch.as_tensor(mask)).logits.numpy()
    got_m = np.asarray(model(jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
    np.testing.assert_allclose(got_m[mask == 1], ref_m[mask == 1], atol=1e-4, rtol=0)
    # A freshly initialised model has the same state layout as a loaded one.
    fresh = CausalLM(model.config, rngs=nnx.Rngs(0))
    assert jax.tree.structure(params_from_model(fresh)) == jax.tree.structure(params_from_model(model))


def test_unsupported_architecture_is_refused(tmp_path):
    d = dict(architectures=["GPT2LMHeadModel"], model_type="gpt2", vocab_size=10)
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(UnsupportedArchitectureError, match="GPT2LMHeadModel.*LlamaForCausalLM.*Qwen3ForCausalLM"):
        load_hf_model(tmp_path)
    with pytest.raises(UnsupportedArchitectureError, match="Qwen3MoeForCausalLM"):
        ModelConfig.from_hf_config(dict(architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe"))
    with pytest.raises(CheckpointError, match="rope type 'longrope'"):
        ModelConfig.from_hf_config(dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=8,
                                        hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                                        num_attention_heads=2, rope_scaling={"rope_type": "longrope"}))
    with pytest.raises(CheckpointError, match="'hidden_size' is missing"):
        ModelConfig.from_hf_config(dict(architectures=["LlamaForCausalLM"], vocab_size=8))
