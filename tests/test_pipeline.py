"""compress_model end to end on tiny random HF pairs: compress -> inspect -> apply -> transformers loads the
merged checkpoint whose weights equal base + reconstructed delta; byte accounting; device-count invariance;
methods and parameter policies; apply onto params / NNX / factored path; wrong-base refusal."""
import json
import os

import jax
import numpy as np
import pytest
from click.testing import CliRunner
from jax.sharding import Mesh

from pipeline_fixtures import SMALL_CONFIG, make_pair, read_arrays, write_calib

from prinmix_jax import CompressionConfig
from prinmix_jax.apply import apply_delta, apply_delta_to_checkpoint, apply_delta_to_model, factored_linear
from prinmix_jax.cli import main
from prinmix_jax.models import LINEAR_NAMES, CheckpointError, load_hf_model, load_hf_params
from prinmix_jax.pipeline import ParamPolicy, compress_model
from prinmix_jax.storage import FingerprintMismatchError, load_delta

CFG = CompressionConfig(**SMALL_CONFIG)
STORE_GLOBALS = ParamPolicy(embeddings="store", lm_head="store")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("pipeline")


@pytest.fixture(scope="module")
def lowrank_delta(root):
    """A cheap delta (low-rank method, data-free) for the apply tests: apply is method-independent."""
    base, ft = make_pair(root, "llama")
    out = os.path.join(root, "llama-lowrank-apply")
    compress_model(base, ft, out, config=CFG, method="lowrank", policy=STORE_GLOBALS)
    return base, ft, out


def _st(path):
    from safetensors.numpy import load_file

    return load_file(os.path.join(path, "model.safetensors"))


def _check_merged(base, delta_dir, merged_dir):
    """transformers loads the merged folder; its weights equal base + reconstructed delta."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32)
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    base_t = _st(base)
    d = load_delta(delta_dir)
    for b in range(d.num_blocks):
        bd = d.block(b)
        for name in LINEAR_NAMES:
            parent = "self_attn" if name in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            key = f"model.layers.{b}.{parent}.{name}.weight"
            want = base_t[key] + np.asarray(bd.linears[name].reconstruct())
            np.testing.assert_array_equal(sd[key], want.astype(np.float32))
        key = f"model.layers.{b}.input_layernorm.weight"
        np.testing.assert_array_equal(sd[key], base_t[key] + bd.dense["input_layernorm/weight"].astype(np.float32))
    return model


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_end_to_end_two_families(root, family):
    """Also: identical outputs with 1 and 8 devices (llama)."""
    if family == "llama":
        base, ft = make_pair(root, "llama")
        out = os.path.join(root, "llama-delta")
        summary = compress_model(base, ft, out, calib=write_calib(root, "jsonl"), config=CFG, seq_len=16,
                                 policy=STORE_GLOBALS)
    else:  # qwen2: q/k/v biases; pre-tokenized ids; sequential calibration; globals stored in 16 bits
        base, ft = make_pair(root, "qwen2")
        out = os.path.join(root, "qwen2-delta")
        summary = compress_model(base, ft, out, calib=write_calib(root, "ids"), config=CFG, seq_len=16,
                                 calibration_mode="sequential", policy=STORE_GLOBALS)
        assert summary["calibration"]["mode"] == "sequential"
        assert any(k.endswith("bias") for k in load_delta(out).block(0).dense)
    assert not os.path.exists(out + ".partial")
    # bytes: within budget (default scope: one global budget for PrinMix with parallel calibration, per
    # matrix with sequential calibration); the total counts every stored array byte
    assert summary["within_budget"]
    assert summary["scope"] == ("global" if family == "llama" else "matrix")
    blocks = [r for r in summary["matrices"] if r["block"] is not None]
    for r in summary["matrices"]:
        if summary["scope"] == "matrix" or r["block"] is None:
            assert r["nbytes"] <= r["budget_bytes"]
    assert sum(r["nbytes"] for r in blocks) <= sum(r["budget_bytes"] for r in blocks)
    on_disk = sum(len(v[2]) for v in read_arrays(out).values())
    assert summary["bytes"]["total"] == on_disk
    assert summary["ratio"] == pytest.approx(on_disk / summary["bytes"]["dense_16bit_delta"])
    with open(os.path.join(out, "prinmix_delta.json")) as f:
        meta = json.load(f)
    assert meta["base"]["fingerprint"] == summary["base"]["fingerprint"]
    assert len(meta["matrices"]) == 2 * 7
    assert all(0 < r["rel_output_error"] < 1 for r in meta["matrices"])
    # inspect
    res = CliRunner().invoke(main, ["inspect", out, "--verify", "--plot", os.path.join(root, f"{family}.png")])
    assert res.exit_code == 0, res.output
    assert "q_proj" in res.output and "within budget: yes" in res.output and "verify     ok" in res.output
    assert os.path.getsize(os.path.join(root, f"{family}.png")) > 1000
    # apply -> merged HF checkpoint
    merged = os.path.join(root, f"{family}-merged")
    apply_delta_to_checkpoint(base, out, merged)
    model = _check_merged(base, out, merged)
    # the merged model is closer to the fine-tuned one than the base is
    import torch
    from transformers import AutoModelForCausalLM

    ids = torch.as_tensor(np.random.default_rng(0).integers(3, 64, (2, 12)))
    with torch.no_grad():
        lm = model(input_ids=ids).logits
        lf = AutoModelForCausalLM.from_pretrained(ft, dtype=torch.float32)(input_ids=ids).logits
        lb = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)(input_ids=ids).logits
    assert float((lm - lf).norm()) < 0.5 * float((lb - lf).norm())
    if family == "llama":  # same run on a 1-device mesh: byte-identical arrays (the reference used 8 devices)
        assert jax.device_count() == 8
        out1 = os.path.join(root, "llama-delta-1dev")
        compress_model(base, ft, out1, calib=write_calib(root, "jsonl"), config=CFG, seq_len=16,
                       policy=STORE_GLOBALS, mesh=Mesh(np.array(jax.devices()[:1]), ("batch",)))
        assert read_arrays(out1) == read_arrays(out)


def test_apply_params_nnx_factored_and_wrong_base(root, lowrank_delta):
    base, _, out = lowrank_delta
    params = load_hf_params(base, np.float32, device_put=False)
    merged = apply_delta(params, out)
    d = load_delta(out)
    cm = d.matrix(1, "down_proj")
    w0 = params["layers"][1]["mlp"]["down_proj"]["weight"]
    np.testing.assert_array_equal(np.asarray(merged["layers"][1]["mlp"]["down_proj"]["weight"]),
                                  w0 + np.asarray(cm.reconstruct()))
    # factored serving path == merged weight
    x = np.random.default_rng(1).standard_normal((3, 5, w0.shape[1])).astype(np.float32)
    y = factored_linear(x, w0, cm)
    np.testing.assert_allclose(np.asarray(y), x @ np.asarray(merged["layers"][1]["mlp"]["down_proj"]["weight"]).T,
                               rtol=1e-4, atol=1e-4)
    # onto an NNX model (nnx.update)
    model = load_hf_model(base, np.float32)
    apply_delta_to_model(model, d)
    np.testing.assert_array_equal(np.asarray(model.layers[0].self_attn.q_proj.weight[...]),
                                  np.asarray(merged["layers"][0]["self_attn"]["q_proj"]["weight"]))
    # a different base (one norm changed) is refused unless forced
    wrong = jax.tree.map(lambda a: a, params)
    wrong["layers"][1]["post_attention_layernorm"]["weight"] = \
        params["layers"][1]["post_attention_layernorm"]["weight"] + 1e-3
    with pytest.raises(FingerprintMismatchError, match="decoder block 1"):
        apply_delta(wrong, d)
    forced = apply_delta(wrong, d, force=True)
    np.testing.assert_array_equal(np.asarray(forced["layers"][0]["self_attn"]["q_proj"]["weight"]),
                                  np.asarray(merged["layers"][0]["self_attn"]["q_proj"]["weight"]))


def test_merge_block_in_place_equals_the_copy(lowrank_delta):
    """``merge_block(in_place=True)`` (what ``apply_delta_to_checkpoint`` uses, one float32 array per base
    tensor) gives the copy's values in the caller's own arrays, and refuses arrays it must not write."""
    from prinmix_jax.delta_tree import merge_block, param_groups
    from prinmix_jax.models import ModelConfig

    base, _, out = lowrank_delta
    d = load_delta(out)
    table = param_groups(ModelConfig.from_pretrained_dir(base))[0]
    params = load_hf_params(base, np.float32, device_put=False)
    block = jax.tree.map(lambda a: np.array(a, np.float32), params["layers"][1])
    kept = jax.tree.map(np.copy, block)
    ref = merge_block(block, d.block(1), table)
    assert jax.tree.all(jax.tree.map(np.array_equal, block, kept))       # the copy leaves the base alone
    got = merge_block(block, d.block(1), table, in_place=True)
    assert got is block
    assert jax.tree.all(jax.tree.map(np.array_equal, got, ref))
    assert not np.array_equal(got["mlp"]["down_proj"]["weight"], kept["mlp"]["down_proj"]["weight"])
    frozen = jax.tree.map(np.copy, kept)
    frozen["mlp"]["up_proj"]["weight"].flags.writeable = False
    with pytest.raises(ValueError, match="mlp/up_proj/weight"):
        merge_block(frozen, d.block(1), table, in_place=True)
    half = jax.tree.map(lambda a: a.astype(np.float16), kept)
    with pytest.raises(ValueError, match="writeable float32"):
        merge_block(half, d.block(1), table, in_place=True)


def test_apply_checkpoint_checks_the_globals_one_tensor_at_a_time(root, lowrank_delta):
    """apply_delta_to_checkpoint merges the globals one tensor at a time and checks their digest once all
    are read: a base whose final norm alone differs is refused (naming the globals) with nothing left
    behind; forced, every tensor is base + delta."""
    import shutil

    from safetensors.numpy import save_file

    base, _, out = lowrank_delta
    other = os.path.join(root, "base-other-norm")
    shutil.copytree(base, other)
    st = _st(base)
    st["model.norm.weight"] = st["model.norm.weight"] + np.float32(1e-2)
    save_file(st, os.path.join(other, "model.safetensors"), metadata={"format": "pt"})
    dest = os.path.join(root, "merged-other-norm")
    with pytest.raises(FingerprintMismatchError, match="embedding / final norm / output head"):
        apply_delta_to_checkpoint(other, out, dest)
    assert not os.path.exists(dest) and not [f for f in os.listdir(root) if "merged-other-norm" in f]
    apply_delta_to_checkpoint(other, out, dest, force=True)
    got, d = _st(dest), load_delta(out)
    g = d.globals()
    for key, path in (("model.norm.weight", "norm/weight"), ("lm_head.weight", "lm_head/weight"),
                      ("model.embed_tokens.weight", "embed_tokens/weight")):
        name = path.split("/")[0]
        delta = g.dense[path] if path in g.dense else np.asarray(g.linears[name].reconstruct())
        np.testing.assert_array_equal(got[key], st[key] + delta.astype(np.float32))


def test_apply_checkpoint_holds_about_one_block(tmp_path):
    """apply_delta_to_checkpoint streams each tensor by blocks of rows: NumPy allocations traced over a 3-block
    apply stay under three of the largest tensors, less than half a block (1.2 MB against a 2.6-MB block).
    Before, each block was held in its stored dtype, in float32 and merged, and the writer kept a shard's
    worth of output (here all of it): 14.3 MB; then about one block in float32: 3.3 MB."""
    import tracemalloc

    from prinmix_jax.synthetic import write_llama_pair

    base, ft = write_llama_pair(str(tmp_path), 3, 256, 512, 512)       # float32, one file
    out = str(tmp_path / "delta")
    compress_model(base, ft, out, config=CompressionConfig(ratio=0.25, group_size=16), method="lowrank",
                   policy=STORE_GLOBALS)
    st = _st(base)
    block = sum(v.nbytes for k, v in st.items() if k.startswith("model.layers.0."))
    largest = max(v.nbytes for v in st.values())
    assert sum(v.nbytes for v in st.values()) > 3 * block > 3 * 4 * largest
    apply_delta_to_checkpoint(base, out, str(tmp_path / "warm"))          # compiles
    tracemalloc.start()
    try:
        apply_delta_to_checkpoint(base, out, str(tmp_path / "merged"))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < min(3 * largest, block / 2), (peak, block, largest)
    got, cm = _st(str(tmp_path / "merged")), load_delta(out).matrix(2, "up_proj")
    np.testing.assert_array_equal(got["model.layers.2.mlp.up_proj.weight"],
                                  st["model.layers.2.mlp.up_proj.weight"] + np.asarray(cm.reconstruct()))


def test_apply_checkpoint_merges_a_vocab_tensor_by_rows(tmp_path, monkeypatch):
    """A vocab x hidden tensor (embedding, head) is read, hashed, merged, checked and written a block of rows at a
    time: neither it in float32 nor its stored copy, Û, reconstruction, non-finite mask or bfloat16 copy is
    ever whole (at 128256x4096: 2.1, 1.0, 1.2, 2.1, 0.5 and 1.0 GB). With 512-row blocks, NumPy allocations
    traced over an apply to bfloat16 stay under half a float32 embedding (0.95 MB against 2.1; before, 4.7).
    The written tensors are base + reconstruct() (whose blocks the merge adds), rounded to bfloat16."""
    import tracemalloc

    import ml_dtypes

    import prinmix_jax.formats as F
    import prinmix_jax.models.checkpoint_files as CF
    from prinmix_jax.synthetic import write_llama_pair

    base, ft = write_llama_pair(str(tmp_path), 1, 64, 128, 8192)            # float32, one file
    out = str(tmp_path / "delta")
    # Delta-CoMe stores PrinMix's format (several widths per matrix) and compresses this pair in 5.6 s against 13.3
    compress_model(base, ft, out, config=CompressionConfig(group_size=16), calib=None, method="deltacome")
    monkeypatch.setattr(F, "RECONSTRUCT_ROWS", 512)
    monkeypatch.setattr(CF, "READ_BLOCK_BYTES", 512 * 64 * 4)
    apply_delta_to_checkpoint(base, out, str(tmp_path / "warm"), dtype="bfloat16")     # compiles
    tracemalloc.start()
    try:
        apply_delta_to_checkpoint(base, out, str(tmp_path / "merged"), dtype="bfloat16")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    st, got, delta = _st(base), _st(str(tmp_path / "merged")), load_delta(out)
    emb = st["model.embed_tokens.weight"].nbytes
    assert peak < 0.5 * emb, (peak, emb)
    for name, key in (("embed_tokens", "model.embed_tokens.weight"), ("lm_head", "lm_head.weight")):
        cm = delta.globals().linears[name]
        assert cm is not None and cm.shape[0] > 512 and cm.rank > 0
        want = (st[key] + np.asarray(cm.reconstruct())).astype(ml_dtypes.bfloat16)
        np.testing.assert_array_equal(got[key], want)


def test_apply_checkpoint_refuses_a_stored_tied_head_that_differs(tmp_path):
    """With tied embeddings a base may also store lm_head.weight, which must equal the embedding. apply streams
    the embedding by rows and checks the stored head row by row: a head that differs (which the fingerprint,
    over the params the model uses, does not see) is refused and nothing is left behind; an identical one is
    accepted."""
    import shutil

    from safetensors.numpy import load_file, save_file

    import hf_fixtures
    from pipeline_fixtures import make_finetuned

    base = os.path.join(str(tmp_path), "base")
    shutil.copytree(hf_fixtures.cached_checkpoint(str(tmp_path), "llama_tied")[0], base)
    ft = make_finetuned(base, os.path.join(str(tmp_path), "ft"))
    out = str(tmp_path / "delta")
    compress_model(base, ft, out, config=CFG, calib=None, method="lowrank")     # any delta will do
    f = os.path.join(base, "model.safetensors")
    tensors = load_file(f)
    emb = tensors["model.embed_tokens.weight"]
    save_file({**tensors, "lm_head.weight": emb}, f, metadata={"format": "pt"})
    apply_delta_to_checkpoint(base, out, str(tmp_path / "same"))
    head = emb.copy()
    head[-1, 0] += 1.0
    save_file({**tensors, "lm_head.weight": head}, f, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="tie_word_embeddings is true but 'lm_head.weight' differs"):
        apply_delta_to_checkpoint(base, out, str(tmp_path / "merged"))
    assert sorted(os.listdir(tmp_path)) == ["base", "delta", "ft", "llama_tied-float32-single", "same"]


def test_baselines_data_free_and_skip_policy(root):
    """method= baselines; data-free; a policy that skips every dense parameter stores only matrices; the
    "compress" policy for embeddings / head compresses them like a linear."""
    base, ft = make_pair(root, "llama")
    out = os.path.join(root, "llama-lowrank-globals")
    s = compress_model(base, ft, out, config=CFG, method="lowrank")  # default policy: compress embeddings/head
    assert {r["name"] for r in s["matrices"] if r["block"] is None} == {"embed_tokens", "lm_head"}
    assert s["within_budget"] and s["bytes"]["globals"] > 0
    skip = ParamPolicy(norms="skip", biases="skip", embeddings="skip", lm_head="skip")
    for method in ("bitdelta", "lowrank"):
        out = os.path.join(root, f"llama-{method}")
        s = compress_model(base, ft, out, calib=None, config=CFG, method=method, policy=skip)
        assert s["method"] == method and s["calibration"] is None
        # BitDelta's one float32 scale per matrix sits on top of its 1 bit/param: 4 bytes over the budget,
        # which within_budget does not count against it (the bytes are reported exactly)
        assert s["within_budget"] and s["problems"] == []
        assert all(r["nbytes"] <= r["budget_bytes"] + (4 if method == "bitdelta" else 0) for r in s["matrices"])
        assert any(r["nbytes"] > r["budget_bytes"] for r in s["matrices"]) == (method == "bitdelta")
        assert s["bytes"]["dense"] == 0 and s["bytes"]["globals"] == 0
        assert {r["method"] for r in s["matrices"]} == {method}
    merged = os.path.join(root, "llama-bitdelta-merged")
    apply_delta_to_checkpoint(base, os.path.join(root, "llama-bitdelta"), merged)
    got, b = _st(merged), _st(base)
    for k in ("model.norm.weight", "model.embed_tokens.weight", "model.layers.0.input_layernorm.weight"):
        np.testing.assert_array_equal(got[k], b[k])  # skipped: base kept
    assert not np.array_equal(got["model.layers.0.mlp.up_proj.weight"], b["model.layers.0.mlp.up_proj.weight"])


def test_one_set_of_u_programs_per_shape_over_the_blocks(tmp_path):
    """The blocks' U steps are padded to each shape's largest kept rank over the model, so the programs
    compiled do not grow with the number of blocks (they were the growth of peak memory). Every linear is
    64 x 64 (one shape, 21 matrices in 3 blocks; at 0.55 their ranks, 48 to 52, fall in the buckets 48 and 56),
    so the test compiles one shape's programs; only RTC's cache is cleared (clearing every cache made the
    tests after it recompile)."""
    from prinmix_jax.compress import rank_bucket
    from prinmix_jax.core.rtc import rtc_target
    from prinmix_jax.synthetic import write_llama_pair

    base, ft = write_llama_pair(str(tmp_path), 3, 64, 64, 64)      # q, k, v, o, gate, up, down: 64x64
    rtc_target.clear_cache()
    s = compress_model(base, ft, str(tmp_path / "out"), config=CompressionConfig(ratio=0.55, group_size=16),
                       scope="global", policy=STORE_GLOBALS)
    rows = [r for r in s["matrices"] if r["block"] is not None]
    shapes = {tuple(r["shape"]) for r in rows}
    # ranks of one shape fall in several buckets (padding to each matrix's own bucket would compile more) ...
    assert any(len({rank_bucket(r["rank"]) for r in rows if tuple(r["shape"]) == sh}) > 1 for sh in shapes)
    assert rtc_target._cache_size() == len(shapes) == 1


def test_global_scope_shares_one_budget_across_blocks(root):
    """scope='global': one ILP over every block linear; the blocks together stay within their total budget."""
    base, ft = make_pair(root, "llama")
    s = compress_model(base, ft, os.path.join(root, "llama-global"), config=CFG, scope="global",
                       policy=STORE_GLOBALS)
    assert s["scope"] == "global" and s["within_budget"]
    rows = [r for r in s["matrices"] if r["block"] is not None]
    assert sum(r["nbytes"] for r in rows) <= sum(r["budget_bytes"] for r in rows)
    per = {(r["block"], r["name"]): r["nbytes"] / r["budget_bytes"] for r in rows}
    assert max(per.values()) > min(per.values()) + 0.05          # bits moved between matrices
    with pytest.raises(ValueError, match="sequential"):
        compress_model(base, ft, os.path.join(root, "x"), calib=np.zeros((2, 8), np.int32), config=CFG,
                       scope="global", calibration_mode="sequential")
    with pytest.raises(ValueError, match="does not apply to method 'lowrank'"):
        compress_model(base, ft, os.path.join(root, "x"), config=CFG, scope="global", method="lowrank")


def test_global_deltas_read_one_tensor_at_a_time(root):
    """The globals step reads both models' globals tensor by tensor: the same digests as over the whole
    globals (what resume and apply compare against), the same deltas, and no base tensor is still alive
    when the next tensor is read (a 7B embedding is 2.1 GB in float32)."""
    import weakref

    from prinmix_jax.delta_tree import global_deltas, param_groups, step_digest
    from prinmix_jax.models.llama.params import get_path
    from prinmix_jax.sources import ModelSource
    from prinmix_jax.storage import TensorDigest, tensor_digest

    base_dir, ft_dir = make_pair(root, "qwen2")          # untied: embedding, norm and head
    base_src, ft_src = (ModelSource(d, None, lbl) for d, lbl in ((base_dir, "base"), (ft_dir, "fine-tuned")))
    _, table = param_groups(base_src.config)
    assert len(table) == 3
    base_g, ft_g = base_src.globals(), ft_src.globals()
    live_base = []

    def watched(src, is_base):
        read = src.global_tensor

        def global_tensor(path):      # the base tensor of this path lives until its delta is taken
            earlier = live_base if is_base else live_base[:-1]
            assert all(r() is None for r in earlier), "a base tensor outlived its delta"
            a = read(path)
            if is_base:
                live_base.append(weakref.ref(a))
            return a
        src.global_tensor = global_tensor
    watched(base_src, True)
    watched(ft_src, False)
    digests, deltas = global_deltas(table, base_src, ft_src)
    assert digests == (step_digest(base_g, table), step_digest(ft_g, table))
    assert len(live_base) == 3
    assert sorted(deltas) == sorted(tuple(p) for p, _ in table)
    for path, _ in table:
        np.testing.assert_array_equal(deltas[tuple(path)], get_path(ft_g, path) - get_path(base_g, path))
    assert global_deltas(table, base_src, ft_src, keep=False) == (digests, {})
    # the streamed digest is tensor_digest's, and it refuses tensors out of name order
    named = [("/".join(p), get_path(base_g, p)) for p, _ in table]
    h = TensorDigest()
    for name, a in sorted(named):
        h.update(name, a)
    assert h.hexdigest() == tensor_digest(named) == digests[0]
    with pytest.raises(ValueError, match="name order"):
        h.update("a", named[0][1])
