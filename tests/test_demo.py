"""A reduced ``prinmix demo`` (tiny pair, few steps, small evaluation) end to end, and ``prinmix eval``.

The demo's numbers are computed in the run; this test asserts the ordering of relative layer-output errors
(PrinMix < Delta-CoMe < low-rank and BitDelta), the byte accounting, the written files, and that
``prinmix eval`` gives KL 0 for the fine-tuned model against itself and a KL that grows as the ratio shrinks.
"""
import json
import os

import pytest
from click.testing import CliRunner

from prinmix_jax.cli import main

# one worker runs the whole module (pytest --dist loadgroup): its module fixtures are built once
pytestmark = pytest.mark.xdist_group("demo")

METHODS = ("prinmix", "deltacome", "bitdelta", "lowrank")
#: The sweep's second PrinMix budget, below the main table's 1/16: it keeps fewer indices than a larger one
#: (1/4 did), so its compress and apply compile fewer programs; the eval test needs two PrinMix budgets.
LOW, LOW_TAG = 1 / 32, "1of32"


@pytest.fixture(scope="module")
def pair_cache(tmp_path_factory):
    """The SFT cache folder holding the quick pair (built once per module, ~10 s; the demo runs reuse it)."""
    from prinmix_jax.sft import QUICK, make_sft_pair

    cache = str(tmp_path_factory.mktemp("sft-cache"))
    make_sft_pair(QUICK, cache_dir=cache, progress=False)
    return cache


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory, pair_cache):
    root = tmp_path_factory.mktemp("demo")
    out = str(root / "out")
    res = CliRunner().invoke(main, ["demo", "--quick", "--out", out, "--cache-dir", pair_cache,
                                    "--methods", ",".join(METHODS), "--ratios", "1/16,1/32", "--sweep-methods", "prinmix",
                                    "--num-test", "16", "--no-progress"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return out, pair_cache, res.output


def test_demo_prints_and_writes_the_table(demo_run):
    out, _, printed = demo_run
    for name in ("demo_results.json", "demo_results.md", "demo_results.png"):
        assert os.path.getsize(os.path.join(out, name)) > 0
    res = json.load(open(os.path.join(out, "demo_results.json")))
    rows = {r["model"]: r for r in res["rows"]}
    assert list(rows) == ["base", "fine-tuned", *METHODS]
    for m in METHODS:
        r = rows[m]
        # BitDelta's one fp32 scale per matrix lies 4 bytes over a budget of exactly 1 bit/param; within_budget
        # does not count it against the method
        assert r["within_budget"] and r["bytes"] > 0 and r["seconds"] > 0
        assert 0 <= r["accuracy"] <= 1 and r["kl"] >= 0
        assert abs(r["bits_per_param"] - 16 * r["model_ratio"]) < 1e-9
        assert r["model_ratio"] < 1 / 16 * 1.1  # everything stored is counted: still about 1 bit/param
        assert f"{m:<10}" in printed
    assert rows["fine-tuned"]["kl"] == 0.0
    assert rows["prinmix"]["scope"] == "global" and {rows[m]["scope"] for m in METHODS[1:]} == {"matrix"}
    # one progress line per phase: pair, baselines' scoring, each (method, ratio) job, writing
    phases = [ln for ln in printed.splitlines() if ln.startswith("[")]
    n = 3 + len(METHODS) + 1
    assert [p.split("]")[0] for p in phases] == [f"[{k}/{n}" for k in range(1, n + 1)], phases
    assert "SFT pair" in phases[0] and "prinmix at 1/32" in phases[-2] and "writing" in phases[-1]
    md = open(os.path.join(out, "demo_results.md")).read()
    assert md.startswith("| model |") and md.count("\n") == 2 + 2 + len(METHODS)
    assert list(res["sweep"]) == ["prinmix"] and sorted(p["ratio"] for p in res["sweep"]["prinmix"]) == [LOW, 1 / 16]


def _errors(out):
    rows = {r["model"]: r for r in json.load(open(os.path.join(out, "demo_results.json")))["rows"]}
    return {m: rows[m]["layer_error"] for m in METHODS}


def test_layer_output_error_ordering(demo_run):
    err = _errors(demo_run[0])
    assert max(err["prinmix"], err["deltacome"]) < err["lowrank"] < err["bitdelta"], err


def test_prinmix_layer_error_below_deltacome_on_tiny_pair(demo_run):
    # Held only once the allocation also counted U's error (CompressionConfig.u_error): with the
    # V-only table PrinMix was above Delta-CoMe on this pair (0.12 vs 0.10).
    err = _errors(demo_run[0])
    assert err["prinmix"] < err["deltacome"], err


def test_eval_kl_is_zero_for_finetuned_and_grows_as_ratio_shrinks(demo_run, tmp_path):
    out, cache, _ = demo_run
    pair = [os.path.join(cache, d) for d in os.listdir(cache) if not d.startswith(("pretrained-", "."))]
    assert len(pair) == 1
    base, ft = os.path.join(pair[0], "base"), os.path.join(pair[0], "finetuned")
    from prinmix_jax.sft import data as D

    text = tmp_path / "held.txt"
    text.write_bytes(bytes(D.corpus_ids("heldout", max_bytes=4 * 64 + 200)[1:].astype("uint8")))
    task = tmp_path / "task.jsonl"
    D.write_task_jsonl(str(task), D.make_task(8, seed=5, min_len=3, max_len=6))
    deltas = [os.path.join(out, "deltas", f"prinmix-{r}") for r in ("1of16", LOW_TAG)]
    res = CliRunner().invoke(main, ["eval", base, ft, *deltas, "--text", str(text), "--task", str(task),
                                    "--seq-len", "64", "--num-sequences", "4", "--json"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    rows = json.loads(res.output)
    assert [r["model"] for r in rows] == ["finetuned", "base", "prinmix-1of16", f"prinmix-{LOW_TAG}"]
    assert abs(rows[0]["kl"]) < 1e-6 and rows[0]["top1"] == 1.0 and rows[0]["tokens"] == 4 * 64
    # ratio 1 (the fine-tuned model itself) > 1/16 > 1/32 > 0 (the base: the whole delta dropped)
    kls = [rows[0]["kl"], rows[2]["kl"], rows[3]["kl"], rows[1]["kl"]]
    assert kls == sorted(kls) and len(set(kls)) == 4, kls
    assert all(0 <= r["exact"] <= 1 and r["total"] == 8 for r in rows)
    assert rows[2]["method"] == "prinmix" and rows[2]["bytes"] > rows[3]["bytes"]
    table = CliRunner().invoke(main, ["eval", base, ft, deltas[0], "--text", str(text), "--seq-len", "64",
                                      "--num-sequences", "2", "--no-base"], catch_exceptions=False)
    assert table.exit_code == 0 and "prinmix-1of16" in table.output and "0.00000" in table.output


def test_cli_usage_errors(tmp_path):
    r = CliRunner().invoke(main, ["eval", str(tmp_path), str(tmp_path)])
    assert r.exit_code == 2 and "--text" in r.output
    r = CliRunner().invoke(main, ["demo", "--ratio", "zero"])
    assert r.exit_code == 2 and "ratio" in r.output
    r = CliRunner().invoke(main, ["demo", "--methods", "nope"])
    assert r.exit_code == 2 and "nope" in r.output
    assert "demo" in CliRunner().invoke(main, ["--help"]).output


def test_sweep_only_on_request(monkeypatch):
    """Every method at --ratio by default; the accuracy-vs-budget sweep with --sweep (default budgets) or with
    explicit --ratios."""
    import prinmix_jax.demo as demo_mod

    seen = []
    monkeypatch.setattr(demo_mod, "run_demo", lambda out, **kw: seen.append(kw["ratios"]))
    for args in ([], ["--sweep"], ["--ratios", "1/64,1/32"], ["--sweep", "--ratios", "none"]):
        r = CliRunner().invoke(main, ["demo", "--no-compile-cache", *args], catch_exceptions=False)
        assert r.exit_code == 0, r.output
    assert seen == [(), demo_mod.DEFAULT_RATIOS, (1 / 64, 1 / 32), ()]
    assert demo_mod._jobs(("a", "b"), 1 / 16, (), ("a",)) == [("a", 1 / 16), ("b", 1 / 16)]
    assert demo_mod._jobs(("a", "b"), 1 / 16, (1 / 32, 1 / 16), ("a",)) == [("a", 1 / 16), ("b", 1 / 16), ("a", 1 / 32)]


def test_demo_scope_matrix_reaches_prinmix(demo_run, tmp_path):
    """--scope matrix is PrinMix's per-matrix allocation (it used to be dropped, and the default scope, global
    with parallel calibration, ran instead)."""
    from prinmix_jax.demo import _compress_and_score
    from prinmix_jax.models import load_hf_params
    from prinmix_jax.sft import QUICK, make_sft_pair
    from prinmix_jax.sft import data as D

    pair = make_sft_pair(QUICK, cache_dir=demo_run[1], progress=False)
    (tmp_path / "deltas").mkdir()
    calib = D.text_windows(D.corpus_ids("heldout", max_bytes=4 * 64), 64, 4)
    row = _compress_and_score(pair, "prinmix", 1 / 16, str(tmp_path), calib, 64, lambda p: (0.0, {"kl": 0.0, "top1": 0.0}),
                              load_hf_params(pair.base), scope="matrix", calibration_mode="parallel", overrides={},
                              extra={})
    assert row["scope"] == "matrix" and row["within_budget"]


def test_demo_task_calibration_and_distill(pair_cache, tmp_path):
    """``calibration="task"`` calibrates on windows of task examples (the compressed delta records the digest
    of its calibration ids); ``distill_steps`` adds a ``prinmix + distill`` row of the same bytes whose delta
    folder loads and verifies, and whose accuracy and KL are those of that folder applied to the base and
    scored again here. Same quick settings as ``demo_run`` (16 prompts, 16 + 8 windows of 128): the compress
    and scoring programs are already compiled when the module runs in order; the distillation's are new."""
    import hashlib

    import numpy as np

    from prinmix_jax.apply import apply_delta
    from prinmix_jax.demo import run_demo
    from prinmix_jax.evaluation import byte_tokenizer, exact_match, token_metrics
    from prinmix_jax.models import ModelConfig, load_hf_params
    from prinmix_jax.sft import QUICK, decode, make_sft_pair
    from prinmix_jax.sft import data as D
    from prinmix_jax.storage import load_delta

    lines = []
    res = run_demo(str(tmp_path / "out"), quick=True, ratio=1 / 16, ratios=(1 / 16,), methods=("prinmix",),
                   sweep_methods=("prinmix",), cache_dir=pair_cache, num_test=16, calibration="task",
                   distill_steps=2, progress=False, log=lines.append)
    # the task windows: what the delta was calibrated on, and task text
    calib = D.task_windows(QUICK, 16, 128, QUICK.seed + 3000)
    text = decode(calib[0], stop_at_eos=False)
    assert "sort: " in text and " =>" in text, text
    assert not np.array_equal(calib, D.text_windows(D.corpus_ids("heldout", max_bytes=16 * 128), 128, 16))
    rows = {r["model"]: r for r in res["rows"]}
    assert list(rows) == ["base", "fine-tuned", "prinmix", "prinmix + distill"]
    plain, dist = rows["prinmix"], rows["prinmix + distill"]
    meta = load_delta(plain["delta"]).meta
    assert meta["calibration"]["ids_sha256"] == hashlib.sha256(calib.astype(np.int32).tobytes()).hexdigest()
    assert res["calibration"]["name"] == "task" and "task examples" in res["calibration"]["source"]
    # the distilled row: same bytes, its own folder (verified), the distillation's KLs kept
    assert dist["bytes"] == plain["bytes"] and dist["method"] == "prinmix" and dist["distilled"]
    assert dist["delta"] == plain["delta"] + "-distilled" and os.path.isdir(dist["delta"])
    dmeta = load_delta(dist["delta"])
    dmeta.verify()                       # every array present, checksums and byte counts as recorded
    assert dmeta.meta["bytes"]["total"] == plain["bytes"] and dmeta.meta["distillation"]["steps"] == 2
    assert dmeta.meta["distillation"]["windows"] == 16
    assert dist["kl_before"] == dmeta.meta["distillation"]["kl_before"] and dist["kl_after"] <= dist["kl_before"]
    assert dist["seconds"] > plain["seconds"] and dist["distill_steps"] == 2
    # independent scores of the distilled folder: exact match on the demo's test prompts, KL on its eval windows
    pair = make_sft_pair(QUICK, cache_dir=pair_cache, progress=False)
    cfg = ModelConfig.from_pretrained_dir(pair.finetuned)
    merged = apply_delta(load_hf_params(pair.base), dist["delta"])
    test = D.make_task(16, seed=QUICK.seed + 2000, min_len=QUICK.task_min_len, max_len=QUICK.task_max_len,
                       task=QUICK.task)
    assert res["task"]["example"] == test[0]
    assert dist["accuracy"] == exact_match(merged, cfg, test, byte_tokenizer())["accuracy"]
    held = D.text_windows(D.corpus_ids("heldout", max_bytes=24 * 128), 128, 24)[16:]
    tm = token_metrics(load_hf_params(pair.finetuned), merged, cfg, held)
    assert abs(dist["kl"] - tm["kl"]) <= 1e-6 * tm["kl"] and dist["top1"] == tm["top1"], (dist, tm)
    assert dist["kl"] != plain["kl"]     # the distilled delta, not the compressed one, was scored
    # the sweep's own series, the phase lines (one for the distillation) and the written table
    assert list(res["sweep"]) == ["prinmix", "prinmix+distill"]
    assert res["sweep"]["prinmix+distill"][0]["accuracy"] == dist["accuracy"]
    phases = [ln for ln in lines if ln.startswith("[")]
    assert [p.split("]")[0] for p in phases] == [f"[{k}/5" for k in range(1, 6)], phases
    assert "prinmix at 1/16: distil 2 steps" in phases[3] and "writing" in phases[4]
    assert "prinmix + distill" in (tmp_path / "out" / "demo_results.md").read_text()
    assert json.loads((tmp_path / "out" / "demo_results.json").read_text())["distill"]["methods"] == ["prinmix"]


def test_demo_calibration_and_distill_options(monkeypatch, tmp_path):
    import prinmix_jax.demo as demo_mod

    r = CliRunner().invoke(main, ["demo", "--calibration", "chat"])
    assert r.exit_code == 2 and "--calibration" in r.output and "'text', 'task'" in r.output, r.output
    r = CliRunner().invoke(main, ["demo", "--distill", "-1"])
    assert r.exit_code == 2 and "--distill" in r.output and "x>=0" in r.output, r.output
    seen = []
    monkeypatch.setattr(demo_mod, "run_demo", lambda out, **kw: seen.append((kw["calibration"], kw["distill_steps"])))
    for args in ([], ["--calibration", "task", "--distill", "200"]):
        r = CliRunner().invoke(main, ["demo", "--no-compile-cache", *args], catch_exceptions=False)
        assert r.exit_code == 0, r.output
    assert seen == [("text", 0), ("task", 200)]
    monkeypatch.undo()
    for kw, msg in (({"calibration": "chat"}, "unknown calibration 'chat'"),
                    ({"distill_steps": -1}, "distill_steps must be >= 0")):   # refused before any work
        with pytest.raises(ValueError, match=msg):
            demo_mod.run_demo(str(tmp_path / "x"), **kw)
    assert not os.path.exists(tmp_path / "x")
