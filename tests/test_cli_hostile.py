"""Hostile but fair input to `prinmix compress` / `apply` (issue 10): nothing lost, nothing mixed, no
useless result with exit 0, a clean machine interface, and bad settings refused before any work.

Each test names the issue's item it covers; each failed on the code before the fix."""
import hashlib
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from cli_helpers import FAST, run
from cli_helpers import cli_error as _err
from pipeline_fixtures import SMALL_CONFIG, make_pair, read_arrays

from prinmix_jax import CompressionConfig
from prinmix_jax.cli import EXIT_DEGENERATE, main
from prinmix_jax.pipeline import compress_model, result_problems
from prinmix_jax.storage import OUTPUT_MARKER, write_output_marker

LAYERS = 3


def _tree_digest(path) -> str:
    """Names and bytes of every file under ``path`` (or of the file itself)."""
    h = hashlib.sha256()
    if os.path.isfile(path):
        return hashlib.sha256(open(path, "rb").read()).hexdigest()
    for dirpath, dirs, files in sorted(os.walk(path)):
        dirs.sort()
        for f in sorted(files):
            p = os.path.join(dirpath, f)
            h.update(os.path.relpath(p, path).encode() + b"\0" + open(p, "rb").read())
    return h.hexdigest()


def _edit_checkpoint(src, dst, fn):
    """A copy of checkpoint ``src`` at ``dst`` whose tensors pass through ``fn(name, array) -> array``;
    the same names, shapes, dtypes and file size (a 'same-size retrain')."""
    from safetensors.numpy import load_file, save_file

    shutil.copytree(src, dst)
    f = os.path.join(dst, "model.safetensors")
    tensors = load_file(f)
    size = os.path.getsize(f)
    save_file({k: fn(k, v) for k, v in tensors.items()}, f, metadata={"format": "pt"})
    assert os.path.getsize(f) == size
    return dst


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("hostile")


@pytest.fixture(scope="module")
def pair(root):
    return make_pair(root, "llama", layers=LAYERS)


@pytest.fixture(scope="module")
def delta(root, pair):
    out = os.path.join(root, "delta")
    res = run("compress", *pair, out, *FAST)
    assert res.exit_code == 0, res.output
    return out


# ----- 1. resume checks content -------------------------------------------------------------------
@pytest.mark.parametrize("scope", ["matrix", "global"])
def test_resume_over_changed_weights_starts_over(root, pair, scope):
    """A kill after two steps, then the fine-tuned weights replaced by a same-size retrain: the rerun
    must not reuse the finished steps (matrix scope: block 0 changed; global scope: only block 2, which
    no finished step read, changed, but the global allocation depends on it)."""
    base, ft = pair
    cfg = CompressionConfig(**SMALL_CONFIG)
    rng = np.random.default_rng(5)
    changed = "layers.0." if scope == "matrix" else "layers.2."
    ft2 = _edit_checkpoint(ft, os.path.join(root, f"ft-retrained-{scope}"), lambda k, v: (
        v + (0.05 * rng.standard_normal(v.shape)).astype(v.dtype) if changed in k and v.ndim == 2 else v))
    out, ref = os.path.join(root, f"resumed-{scope}"), os.path.join(root, f"fresh-{scope}")
    kw = dict(config=cfg, method="prinmix", scope=scope)
    res = compress_model(base, ft, out, _stop_after_steps=2, **kw)
    assert res == {"stopped_after_steps": 2} and os.path.isdir(out + ".partial")
    said = []
    compress_model(base, ft2, out, log=said.append, **kw)
    assert any("discarding" in s and "starting over" in s for s in said), said
    if scope == "matrix":   # block 0 changed: found when the unfinished run is opened
        assert not any(s.startswith("resuming") for s in said), said
    compress_model(base, ft2, ref, **kw)
    assert read_arrays(out) == read_arrays(ref)


def test_resume_with_unchanged_weights_still_resumes(root, pair):
    base, ft = pair
    out = os.path.join(root, "resume-same")
    kw = dict(config=CompressionConfig(**SMALL_CONFIG), method="bitdelta", scope="matrix")
    compress_model(base, ft, out, _stop_after_steps=2, **kw)
    copy = os.path.join(root, "ft-copy")          # other files, same bytes: still a resume
    shutil.copytree(ft, copy)
    said = []
    compress_model(base, copy, out, log=said.append, **kw)
    assert any(s.startswith("resuming") for s in said) and not any("discarding" in s for s in said), said


# ----- 2. --overwrite destroys nothing it did not make --------------------------------------------
def test_overwrite_never_replaces_an_input(root, pair, delta):
    base, ft = pair
    before = _tree_digest(base)
    msg = _err(run("compress", base, base, base, *FAST, "--overwrite"))
    assert "is the input" in msg
    msg = _err(run("compress", base, ft, root, *FAST, "--overwrite"))     # OUT contains both inputs
    assert "contains the input" in msg
    inside_work = os.path.join(root, "scratch.partial")     # an input where compress would work: OUT.partial
    shutil.copytree(ft, inside_work)
    msg = _err(run("compress", base, inside_work, os.path.join(root, "scratch"), *FAST))
    assert "work folder" in msg and "is the input" in msg
    assert os.listdir(inside_work) == os.listdir(ft)
    msg = _err(run("apply", base, delta, base, "--overwrite"))
    assert "is the input" in msg
    msg = _err(run("apply", base, delta, delta, "--overwrite"))
    assert "is the input" in msg
    assert _tree_digest(base) == before and os.path.isfile(os.path.join(delta, "prinmix_delta.json"))


def test_overwrite_replaces_only_prinmix_outputs(root, pair, delta):
    base, ft = pair
    # the user's own OUT.old survives a replace
    out = os.path.join(root, "ow")
    assert run("compress", base, ft, out, *FAST).exit_code == 0
    os.makedirs(out + ".old")
    open(os.path.join(out + ".old", "mine.txt"), "w").write("keep me")
    assert run("compress", base, ft, out, *FAST, "--overwrite").exit_code == 0
    assert open(os.path.join(out + ".old", "mine.txt")).read() == "keep me"
    assert sorted(n for n in os.listdir(root) if n.startswith("ow")) == ["ow", "ow.old"]
    # OUT that is a file, or a folder prinmix did not write: refused, untouched, nothing renamed
    afile = os.path.join(root, "ow-file")
    open(afile, "w").write("data")
    assert "not a folder" in _err(run("compress", base, ft, afile, *FAST, "--overwrite"))
    assert open(afile).read() == "data"
    user = os.path.join(root, "ow-user")
    os.makedirs(user)
    open(os.path.join(user, "notes.txt"), "w").write("mine")
    for args in (("compress", base, ft, user, *FAST), ("apply", base, delta, user)):
        msg = _err(run(*args, "--overwrite"))
        assert "did not write" in msg, msg
    assert os.listdir(user) == ["notes.txt"]
    assert sorted(n for n in os.listdir(root) if n.startswith("ow-")) == ["ow-file", "ow-user"]
    # an apply output is a prinmix output: --overwrite replaces it
    merged = os.path.join(root, "ow-merged")
    assert run("apply", base, delta, merged).exit_code == 0
    assert os.path.isfile(os.path.join(merged, OUTPUT_MARKER))
    res = run("apply", base, delta, merged, "--overwrite")
    assert res.exit_code == 0, res.output


def test_user_folder_named_like_the_work_folder_is_kept(root, pair):
    base, ft = pair
    out = os.path.join(root, "pw")
    os.makedirs(out + ".partial")
    open(os.path.join(out + ".partial", "mine.txt"), "w").write("x")
    assert "not an unfinished prinmix run" in _err(run("compress", base, ft, out, *FAST))
    assert os.listdir(out + ".partial") == ["mine.txt"]


# ----- 3. a killed apply's temporary folder is removed by the next apply -------------------------------
def test_apply_removes_what_a_killed_apply_left(root, pair, delta):
    base, _ = pair
    out = os.path.join(root, "merged-after-kill")
    # three finished processes: their pids are dead (pid + 1, ... may belong to a live process of a parallel test)
    dead = [subprocess.Popen([sys.executable, "-c", "pass"]) for _ in range(3)]
    for p in dead:
        p.wait()
    stale = f"{out}.tmp-apply-{dead[0].pid}"         # as a SIGKILLed apply leaves it (marker, partial shards)
    os.makedirs(stale)
    write_output_marker(stale, "merged")
    open(os.path.join(stale, "model-00001-of-00002.safetensors"), "wb").write(b"\0" * 100)
    empty = f"{out}.tmp-apply-{dead[1].pid}"        # killed before even the marker was written
    os.makedirs(empty)
    halfway = f"{out}.tmp-apply-{dead[2].pid}"      # killed while the marker was being written
    os.makedirs(halfway)
    open(os.path.join(halfway, OUTPUT_MARKER + ".tmp"), "w").write('{"tool": "prin')
    foreign = f"{out}.tmp-apply-{max(p.pid for p in dead) + 1}"   # same pattern, not ours: kept
    os.makedirs(foreign)
    open(os.path.join(foreign, "notes.txt"), "w").write("mine")
    res = run("apply", base, delta, out)
    assert res.exit_code == 0, res.output
    assert not any(map(os.path.exists, (stale, empty, halfway))) and os.listdir(foreign) == ["notes.txt"]
    assert "interrupted apply" in res.stderr


# ----- 4, 5, 6. useless results do not exit 0 -------------------------------------------------------
def test_ratio_that_keeps_nothing_is_refused_before_work(root, pair):
    out = os.path.join(root, "tiny")
    msg = _err(run("compress", *pair, out, "--data-free", "--group-size", "16", "--ratio", "1e-6", "--no-progress"))
    assert "--ratio" in msg and "single singular vector" in msg
    assert not any(n.startswith("tiny") for n in os.listdir(root))


def test_base_equal_to_finetuned_exits_3(root, pair):
    out = os.path.join(root, "same")
    res = run("compress", pair[0], pair[0], out, *FAST)
    assert res.exit_code == EXIT_DEGENERATE, res.output
    assert "equals the base" in res.stderr and "Traceback" not in res.stderr
    assert os.path.isfile(os.path.join(out, "prinmix_delta.json"))        # the delta is still written


def test_result_problems_over_budget_and_degenerate(delta):
    """result_problems on a real summary: as written it is fine; a matrix over its own budget, or every
    matrix keeping nothing, is named."""
    meta = json.load(open(os.path.join(delta, "prinmix_delta.json")))
    assert result_problems(meta) == []
    over = json.loads(json.dumps(meta))
    row = next(r for r in over["matrices"] if r["kind"] == "matrix")
    row["nbytes"] = row["budget_bytes"] + 100
    over["within_budget"] = False
    (p,) = result_problems(over)
    assert p.startswith("over budget") and row["name"] in p
    nothing = json.loads(json.dumps(meta))
    for r in nothing["matrices"]:
        r["rel_output_error"] = 1.0
    assert any("no matrix keeps" in p for p in result_problems(nothing))


def test_over_budget_result_exits_3_through_the_cli(root, pair, monkeypatch):
    """No valid option makes a method go over its budget, so BitDelta's uncounted 4-byte scale is made to count
    8 bytes against it: the real command then prints "within budget: NO", names the matrix on stderr and exits 3
    (the delta is still written). Fails when compress exits 0 over budget."""
    from prinmix_jax import run_summary

    monkeypatch.setattr(run_summary, "_bitdelta_slack", lambda method: -8)
    out = os.path.join(root, "over")
    res = run("compress", *pair, out, *FAST)
    assert res.exit_code == EXIT_DEGENERATE, res.output
    assert "within budget: NO" in res.stdout and "result: over budget" in res.stderr and "q_proj" in res.stderr
    assert "Traceback" not in res.stderr and os.path.isfile(os.path.join(out, "prinmix_delta.json"))


# ----- 7, 11. NaN / Inf named when read --------------------------------------------------------------
def test_nan_in_norm_is_refused_naming_tensor_and_block(root, pair):
    base, ft = pair
    bad = _edit_checkpoint(ft, os.path.join(root, "ft-nan-norm"), lambda k, v: (
        np.where(np.arange(v.size) == 3, np.nan, v).astype(v.dtype) if k == "model.layers.1.input_layernorm.weight"
        else v))
    out = os.path.join(root, "nan-norm")
    msg = _err(run("compress", base, bad, out, *FAST))
    assert "model.layers.1.input_layernorm.weight" in msg and "block 1" in msg and "fine-tuned" in msg
    assert not any(n.startswith("nan-norm") for n in os.listdir(root))


def test_inf_in_linear_names_it_in_every_mode(root, pair):
    base, ft = pair
    bad = _edit_checkpoint(ft, os.path.join(root, "ft-inf"), lambda k, v: (
        np.where(np.arange(v.size).reshape(v.shape) == 0, np.inf, v).astype(v.dtype)
        if k == "model.layers.2.self_attn.q_proj.weight" else v))
    msg = _err(run("compress", base, bad, os.path.join(root, "inf"), "--data-free", "--group-size", "16",
                   "--no-progress"))
    assert "model.layers.2.self_attn.q_proj.weight" in msg and "block 2" in msg


def test_apply_refuses_to_write_nan(root, pair, delta):
    base, _ = pair
    bad = _edit_checkpoint(base, os.path.join(root, "base-nan"), lambda k, v: (
        np.full_like(v, np.nan) if k == "model.norm.weight" else v))
    out = os.path.join(root, "merged-nan")
    msg = _err(run("apply", bad, delta, out, "--force"))
    assert "model.norm.weight" in msg and "NaN" in msg
    assert not any(n.startswith("merged-nan") for n in os.listdir(root))


# ----- 8. --json: stdout holds the JSON only -----------------------------------------------------------
def test_json_stdout_is_only_json(root, pair, capfd, monkeypatch):
    """In-process, with ``sys.stdout`` on file descriptor 1 as in a shell pipe (pytest's capture holds fd 1 and
    2): what a C library writes on fd 1 while the command runs (HiGHS prints its banner there, once per
    process: here a write(2) on fd 1 from inside the run stands for it) must reach stderr and leave stdout one
    JSON document."""
    import prinmix_jax.pipeline as pipeline

    real = pipeline.compress_model

    def compress_model(*a, **k):
        os.write(1, b"Running HiGHS (a C library's banner on fd 1)\n")
        return real(*a, **k)

    monkeypatch.setattr(pipeline, "compress_model", compress_model)
    out = os.path.join(root, "json-out")
    monkeypatch.setattr(sys, "stdout", open(1, "w", closefd=False))  # noqa: SIM115 -- fd 1 stays open
    with pytest.raises(SystemExit) as done:
        main.main(["compress", *pair, out, *FAST, "--json"], prog_name="prinmix")
    sys.stdout.flush()
    captured = capfd.readouterr()
    assert done.value.code in (0, None), captured.err[-2000:]
    summary = json.loads(captured.out)       # the banner went to stderr, not stdout
    assert summary["method"] == "bitdelta" and summary["problems"] == []
    assert "a C library's banner on fd 1" in captured.err


# ----- 9, 10. option values and combinations, checked before any work ---------------------------------
def test_ratio_accepts_fractions(root, pair):
    out = os.path.join(root, "frac")
    res = run("compress", *pair, out, *FAST, "--ratio", "1/16", "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["config"]["ratio"] == 1 / 16
    for bad in ("1/0", "-1/16", "abc", "0"):
        res = run("compress", *pair, os.path.join(root, "frac2"), *FAST, "--ratio", bad)
        assert res.exit_code == 2 and "--ratio" in res.stderr, (bad, res.output)


def test_bad_option_combinations_fail_before_any_work(root, pair, monkeypatch):
    import prinmix_jax.compress as core
    import prinmix_jax.pipeline as pipeline
    import prinmix_jax.step_compress as step_compress

    def never(*a, **k):
        raise AssertionError("compression work started")

    monkeypatch.setattr(pipeline, "error_tables", never)
    monkeypatch.setattr(step_compress, "compress_stack", never)
    monkeypatch.setattr(core, "compress_stack", never)
    out = os.path.join(root, "combo")
    msg = _err(run("compress", *pair, out, "--data-free", "--bits", "2,4", "--no-progress"))
    assert "--bits" in msg and "add 0" in msg
    msg = _err(run("compress", *pair, out, "--data-free", "--bits", "2,4", "--scope", "matrix", "--no-progress"))
    assert "--bits" in msg and "--ratio" in msg
    msg = _err(run("compress", *pair, out, "--data-free", "--method", "bitdelta", "--ratio", "1/32"))
    assert "bitdelta" in msg and "--ratio" in msg
    for extra in (["--calibration-mode", "sequential"], ["--seq-len", "64"], ["--num-sequences", "4"]):
        res = run("compress", *pair, out, "--data-free", *extra)
        assert res.exit_code == 2 and extra[0] in res.stderr and "--data-free" in res.stderr, res.output
    res = run("compress", *pair, out, "--data-free", "--method", "lowrank", "--scope", "global")
    assert res.exit_code == 2 and "--scope global" in res.stderr
    assert not any(n.startswith("combo") for n in os.listdir(root))


def test_bad_option_values_are_usage_errors_naming_the_option(root, pair, delta):
    """Widths outside 0..8, widths without a nonzero one, a group size below 1 and an unparsable shard size are
    usage errors (status 2) naming the option, before JAX starts; they were status 1 in the library's words
    ("bit widths must be in 0..8, got (9,)", "group_size must be a positive integer or None, got 0") after
    the checkpoints were opened."""
    out = os.path.join(root, "badval")
    cases = [(["--bits", "9"], "--bits"), (["--bits", "0,2,12"], "--bits"), (["--bits", "0"], "--bits"),
             (["--bits", "0,-2"], "--bits"), (["--group-size", "0"], "--group-size"),
             (["--group-size=-16"], "--group-size")]
    for extra, opt in cases:
        res = run("compress", *pair, out, "--data-free", "--no-progress", *extra)
        assert res.exit_code == 2 and f"Invalid value for '{opt}'" in res.stderr, (extra, res.output)
    for size in ("banana", "0GB"):
        res = run("apply", pair[0], delta, out, "--max-shard-size", size)
        assert res.exit_code == 2 and "Invalid value for '--max-shard-size'" in res.stderr, (size, res.output)
    assert not any(n.startswith("badval") for n in os.listdir(root))


def test_interrupt_message_promises_only_what_the_command_does(root, pair, delta, monkeypatch):
    """Ctrl-C during apply: status 130 and no word about resuming a compress run (which apply cannot do)."""
    import prinmix_jax.apply

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(prinmix_jax.apply, "apply_delta_to_checkpoint", interrupted)
    res = run("apply", pair[0], delta, os.path.join(root, "int-merged"))
    assert res.exit_code == 130, res.output
    assert res.stderr.strip() == "error: interrupted (nothing was written; rerun to start again)", res.stderr


# ----- 16. help: an example each, and a calibration line -------------------------------------------------
def test_compress_and_apply_help_teach():
    res = run("compress", "--help")
    text = " ".join(res.output.split())
    assert res.exit_code == 0 and "Example:" in text and '{"text":' in text and "3 finished" in text
    res = run("apply", "--help")
    text = " ".join(res.output.split())
    assert res.exit_code == 0 and "Example:" in text and "resume" not in text and " 3 " not in text


# ----- 13 (top level). the summary and hf/ files are checked too; an unfinished OUT is pointed to ---------
def test_top_level_metadata_and_hf_files_are_checked(root, delta):
    meta_path = os.path.join("prinmix_delta.json")
    edited = os.path.join(root, "edited-meta")
    shutil.copytree(delta, edited)
    meta = json.load(open(os.path.join(edited, meta_path)))
    assert set(meta["files_sha256"]) >= {"hf/config.json"}
    meta["config"]["ratio"] = 0.125                     # still valid JSON, a different claim
    json.dump(meta, open(os.path.join(edited, meta_path), "w"))
    assert "corrupted metadata" in _err(run("inspect", edited))
    hf = os.path.join(root, "edited-hf")
    shutil.copytree(delta, hf)
    cfg = os.path.join(hf, "hf", "config.json")
    text = open(cfg).read()
    open(cfg, "w").write(text.replace('"rms_norm_eps": 1e-05', '"rms_norm_eps": 1e-06'))
    assert open(cfg).read() != text
    assert run("inspect", hf).exit_code == 0           # opening does not hash files; --verify does
    assert "hf/config.json is corrupted" in _err(run("inspect", hf, "--verify"))


def test_inspect_of_an_unfinished_run_points_to_it(root, pair):
    out = os.path.join(root, "unfinished")
    compress_model(*pair, out, config=CompressionConfig(**SMALL_CONFIG), method="bitdelta", _stop_after_steps=1)
    msg = _err(run("inspect", out))
    assert "unfinished run" in msg and "rerun the same compress command" in msg
