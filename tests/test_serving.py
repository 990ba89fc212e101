"""The delta bank (prinmix_jax.serving): mixed batches of three real compressed fine-tunes of one tiny base
against the merged models (apply_delta), generation, slots, the fingerprint check, ``prinmix generate``.

The three deltas are compressed once per test session (shared by the xdist workers through a file lock).
"""
import fcntl
import json
import os

import numpy as np
import pytest

from cli_helpers import run
from pipeline_fixtures import SMALL_CONFIG, make_finetuned, save_checkpoint, save_tiny_tokenizer, torch_model

# one worker runs the whole module (pytest --dist loadgroup): its module fixtures are built once
pytestmark = pytest.mark.xdist_group("serving")

NAMES = ("a", "b", "c")
METHODS = {"a": "prinmix", "b": "prinmix", "c": "uniform"}
#: Two candidate widths keep the jitted bank programs small (fewer width groups per linear).
CONFIG = dict(SMALL_CONFIG, bits=(0, 2, 4))


def _build(root: str) -> dict:
    from prinmix_jax import CompressionConfig, compress_model

    base = save_checkpoint(torch_model("llama", layers=1, seed=0), os.path.join(root, "base"))
    save_tiny_tokenizer(base)
    other = save_checkpoint(torch_model("llama", layers=1, seed=5), os.path.join(root, "other-base"))
    out = {"base": base, "other": other}
    for i, name in enumerate(NAMES):
        ft = make_finetuned(base, os.path.join(root, f"ft-{name}"), seed=10 + i)
        out[name] = os.path.join(root, f"delta-{name}")
        compress_model(base, ft, out[name], config=CompressionConfig(**CONFIG), method=METHODS[name])
    return out


@pytest.fixture(scope="session")
def fixture_paths(tmp_path_factory):
    """``{"base", "other", "a", "b", "c"}``: a 1-block base, a different base, three compressed deltas."""
    base = tmp_path_factory.getbasetemp()
    shared = base.parent if base.name.startswith("popen-gw") else base
    root = os.path.join(os.fspath(shared), "serving-fixture")
    os.makedirs(root, exist_ok=True)
    done = os.path.join(root, "paths.json")
    with open(os.path.join(root, ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not os.path.isfile(done):
            paths = _build(root)
            with open(done, "w") as f:
                json.dump(paths, f)
    with open(done) as f:
        return json.load(f)


@pytest.fixture(scope="session")
def reference(fixture_paths):
    """Base params, config and the merged params of every delta."""
    from prinmix_jax import apply_delta, load_hf_params
    from prinmix_jax.models import ModelConfig

    base = load_hf_params(fixture_paths["base"])
    merged = {n: apply_delta(base, fixture_paths[n]) for n in NAMES}
    return base, ModelConfig.from_pretrained_dir(fixture_paths["base"]), merged


def make_bank(paths, names=NAMES, **kw):
    from prinmix_jax.serving import DeltaBank

    return DeltaBank.from_deltas(paths["base"], {n: paths[n] for n in names}, **kw)


ROWS = ["a", "b", None, "c", "b", "a"]


def _ids(rows=len(ROWS), t=12, seed=0):
    return np.random.default_rng(seed).integers(3, 64, (rows, t)).astype(np.int32)


def _rel(a, b):
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def test_mixed_batch_logits_equal_merged_models(fixture_paths, reference):
    base_p, cfg, merged = reference
    from prinmix_jax.evaluation import _logits

    ids = _ids()
    base_ref = np.asarray(_logits(base_p, cfg, ids))
    want = {m: np.asarray(_logits(merged[m], cfg, ids)) for m in NAMES}
    for mode, strategy, tol in [("packed", "row", 1e-4), ("packed", "slot", 1e-4), ("factors", "row", 3e-2)]:
        bank = make_bank(fixture_paths, mode=mode, strategy=strategy)     # factors: bfloat16
        got = bank.logits(ids, ROWS)
        for j, m in enumerate(ROWS):
            ref = base_ref[j] if m is None else want[m][j]
            assert _rel(got[j], ref) <= (1e-6 if m is None else tol), (mode, strategy, j, m, _rel(got[j], ref))
            if m is not None:   # the delta matters: far more than the tolerance separates it from the base
                assert _rel(base_ref[j], ref) > 1e-2


def test_greedy_and_sampled_generation(fixture_paths, reference):
    base_p, cfg, merged = reference
    from prinmix_jax.evaluation import greedy_generate

    bank = make_bank(fixture_paths)
    ids = _ids(t=9, seed=1)
    prompts = [list(ids[j][:5 + j % 4]) for j in range(len(ROWS))]
    got = bank.generate(prompts, ROWS, 10)
    for j, m in enumerate(ROWS):
        want = greedy_generate(base_p if m is None else merged[m], cfg, [prompts[j]], 10)[0]
        assert got[j] == want, (j, m)
    assert len({tuple(g) for g in got[:3]}) == 3          # a, b and the base continue differently
    # sampling: a row depends only on its own seed, prompt and model (not on its batch neighbours);
    # top_p -> 0 keeps the argmax only (= greedy)
    s1 = bank.generate(prompts, ROWS, 10, temperature=1.0, seed=list(range(6)))
    s2 = bank.generate(prompts[::-1], ROWS[::-1], 10, temperature=1.0, seed=list(range(6))[::-1])
    assert s1 == s2[::-1]
    assert s1 != got
    assert bank.generate(prompts, ROWS, 10, temperature=0.7, top_p=1e-6, seed=3) == got


def test_add_remove_without_recompiling(fixture_paths, reference):
    base_p, cfg, merged = reference
    from prinmix_jax.evaluation import _logits
    from prinmix_jax.serving import bank_logits

    bank = make_bank(fixture_paths, max_deltas=3)        # slots sized for a, b, c; holding all three
    ids = _ids()
    bank.remove("a")
    bank.logits(ids, ["b", None, "c", "b", "b", None])
    compiled = bank_logits._cache_size()
    with pytest.raises(KeyError, match="no delta named 'a'"):
        bank.logits(ids, ROWS)
    bank.remove("c")
    assert {bank.add("c2", fixture_paths["c"]), bank.add("a", fixture_paths["a"])} == {1, 3}
    rows = ["c2", "a", None, "b", "c2", "a"]
    got = bank.logits(ids, rows)
    assert bank_logits._cache_size() == compiled
    for j, m in enumerate(rows):
        if m is not None:
            m = "c" if m == "c2" else m
            assert _rel(got[j], np.asarray(_logits(merged[m], cfg, ids[j:j + 1]))[0]) <= 1e-4
    from prinmix_jax.serving import SlotCapacityError

    with pytest.raises(SlotCapacityError, match="slots are all in use"):
        bank.add("d", fixture_paths["a"])
    with pytest.raises(ValueError, match="already in the bank"):
        bank.remove("b") or bank.add("a", fixture_paths["a"])


def test_capacity_and_base_checks(fixture_paths):
    from prinmix_jax.serving import DeltaBank, FingerprintMismatchError, SlotCapacityError
    from prinmix_jax.serving.forward import resolve_strategy
    from prinmix_jax.storage import load_delta

    # "auto": per-row factors for batches up to twice the delta slots (here 3 deltas + the base), else all slots
    assert [resolve_strategy("auto", b, 4) for b in (1, 6, 7, 32)] == ["row", "row", "slot", "slot"]
    assert resolve_strategy("slot", 1, 4) == "slot"
    # the default capacities fit the deltas exactly: another rank multiple only adds padding
    tight, padded = (DeltaBank.from_deltas(fixture_paths["base"], {"a": fixture_paths["a"]}, rank_multiple=k)
                     for k in (1, 8))
    assert 0 < tight.memory()["slots"] < padded.memory()["slots"]
    # "prepared": the float32 factors a call builds from every slot, as prepare's own shapes say (both modes)
    import jax

    from prinmix_jax.serving.forward import dequant_slots, slot_factors
    from prinmix_jax.serving.slots import linear_shapes

    for bank in (padded, DeltaBank.from_deltas(fixture_paths["base"], {"a": fixture_paths["a"]}, mode="factors",
                                               max_deltas=2)):
        def factors(state):
            rows = dequant_slots(state, linear_shapes(bank.config), bank.spec)
            return [slot_factors(g, key, rows) for key, g in state["linears"].items()]
        traced = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(jax.eval_shape(factors, bank.state)))
        assert bank.memory()["prepared"] == traced > bank.memory()["slots"]

    with pytest.raises(SlotCapacityError, match="groups of 16, the bank's slots hold groups of 128"):
        DeltaBank(fixture_paths["base"], {}, max_deltas=1).add("a", fixture_paths["a"])
    empty = DeltaBank(fixture_paths["base"], {}, max_deltas=1, group_size=16)
    with pytest.raises(SlotCapacityError, match=r"needs rank \d+ at \d+ bits but the bank's slots hold 0"):
        empty.add("a", fixture_paths["a"])
    with pytest.raises(FingerprintMismatchError) as e:
        DeltaBank.from_deltas(fixture_paths["other"], {"a": fixture_paths["a"]})
    other = DeltaBank(fixture_paths["other"], {}, max_deltas=1)
    msg = str(e.value)
    assert load_delta(fixture_paths["a"]).fingerprint == empty.fingerprint != other.fingerprint
    assert empty.fingerprint[:16] in msg and other.fingerprint[:16] in msg


def test_generate_command(fixture_paths, reference):
    base_p, cfg, _ = reference
    from prinmix_jax.evaluation import greedy_generate
    from prinmix_jax.serving.server import bank_tokenizer

    prompts = ["the quick brown fox", "a lazy dog"]
    res = run("generate", fixture_paths["base"], "--prompt", prompts[0], "--prompt", prompts[1],
              "--max-new-tokens", "6", "--json")
    assert res.exit_code == 0, res.output
    rows = [json.loads(line) for line in res.stdout.splitlines()]
    tok = bank_tokenizer(fixture_paths["base"])
    want = greedy_generate(base_p, cfg, [tok.encode(p) for p in prompts], 6, eos_id=tok.eos_id)
    assert [r["tokens"] for r in rows] == want and rows[1]["text"] == tok.decode(want[1])
    res = run("generate", fixture_paths["other"], "--delta", fixture_paths["b"], "--prompt", prompts[0])
    assert res.exit_code == 1 and "fingerprint" in res.stderr


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_bias_and_qk_norm_deltas_are_served_per_row(tmp_path, family):
    """Qwen2's q/k/v bias deltas and Qwen3's q_norm/k_norm deltas go through the bank's per-row dense weights:
    a mixed batch (delta, base) equals the merged model and the base, row by row."""
    from prinmix_jax import CompressionConfig, apply_delta, compress_model, load_hf_params
    from prinmix_jax.evaluation import _logits
    from prinmix_jax.models import ModelConfig

    base = save_checkpoint(torch_model(family, layers=1, seed=0), str(tmp_path / "base"))
    ft = make_finetuned(base, str(tmp_path / "ft"), seed=10)
    delta = str(tmp_path / "delta")
    compress_model(base, ft, delta, config=CompressionConfig(**CONFIG))
    dense = "self_attn/q_proj/bias" if family == "qwen2" else "self_attn/q_norm/weight"
    bank = make_bank({"base": base, "d": delta}, names=("d",))
    assert f"0/{dense}" in bank.state["dense"] and np.any(np.asarray(bank.state["dense"][f"0/{dense}"][1])), \
        list(bank.state["dense"])
    cfg, base_p = ModelConfig.from_pretrained_dir(base), load_hf_params(base)
    ids = _ids(rows=2)
    got = bank.logits(ids, ["d", None])
    want = np.asarray(_logits(apply_delta(base_p, delta), cfg, ids[:1]))[0]
    assert _rel(got[0], want) <= 1e-4 and _rel(got[1], np.asarray(_logits(base_p, cfg, ids[1:]))[0]) <= 1e-6
