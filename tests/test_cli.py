"""The `prinmix` CLI: help, exit codes, one-line errors, and every bad-input case of the issue (different
architectures / shapes, missing files, existing output, wrong base at apply, truncated / corrupted delta,
unwritable output, text calibration without a tokenizer) leaving nothing half-written."""
import json
import os
import shutil
import subprocess
import sys

import pytest
from click.testing import CliRunner

from cli_helpers import FAST, run
from cli_helpers import cli_error as _err
from pipeline_fixtures import jax_cache_env, make_finetuned, make_pair, write_calib

from prinmix_jax.cli import main



@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("cli")


@pytest.fixture(scope="module")
def pair(root):
    return make_pair(root, "llama")


@pytest.fixture(scope="module")
def delta(root, pair):
    out = os.path.join(root, "delta")
    res = CliRunner().invoke(main, ["compress", *pair, out, *FAST])
    assert res.exit_code == 0, res.output
    return out


def _leftovers(root, name):
    return sorted(n for n in os.listdir(root) if n.startswith(name))


def test_help_teaches():
    res = run("--help")
    assert res.exit_code == 0
    for word in ("compress", "apply", "inspect", "Exit status", "130"):
        assert word in res.output
    res = run("compress", "--help")
    assert res.exit_code == 0 and "--calib" in res.output and "resumes" in res.output.replace("\n", " ")
    assert run("compress").exit_code == 2  # usage error: missing arguments
    assert run("frobnicate").exit_code == 2


def test_calib_or_data_free_required(root, pair):
    res = run("compress", *pair, os.path.join(root, "x"))
    assert res.exit_code == 2 and "--calib" in res.stderr


def test_compress_inspect_apply_json(root, pair, delta):
    res = run("inspect", delta, "--json")
    assert res.exit_code == 0
    meta = json.loads(res.output)
    assert meta["method"] == "bitdelta" and meta["calibration"] is None
    res = run("inspect", delta)
    assert res.exit_code == 0 and "bits/param" in res.output
    merged = os.path.join(root, "merged")
    res = run("apply", pair[0], delta, merged)
    assert res.exit_code == 0, res.output
    assert os.path.isfile(os.path.join(merged, "model.safetensors"))
    assert os.path.isfile(os.path.join(merged, "tokenizer.json"))


def test_existing_output_needs_overwrite(root, pair, delta):
    before = os.path.getmtime(os.path.join(delta, "prinmix_delta.json"))
    msg = _err(run("compress", *pair, delta, *FAST))
    assert "already exists" in msg and "--overwrite" in msg
    assert os.path.getmtime(os.path.join(delta, "prinmix_delta.json")) == before
    res = run("compress", *pair, delta, *FAST, "--overwrite")
    assert res.exit_code == 0, res.output
    assert _leftovers(root, "delta") == ["delta"]


def test_different_architecture_or_shapes(root, pair):
    qwen3, _ = make_pair(root, "qwen3")
    msg = _err(run("compress", pair[0], qwen3, os.path.join(root, "bad1"), *FAST))
    assert "architecture" in msg or "Qwen3" in msg
    # same architecture, other sizes: a 3-block llama
    base3, _ = make_pair(root, "llama", layers=3)
    msg = _err(run("compress", pair[0], base3, os.path.join(root, "bad2"), *FAST))
    assert "different tensors" in msg or "shape" in msg
    assert not _leftovers(root, "bad")


def test_missing_files(root, pair):
    msg = _err(run("compress", os.path.join(root, "nope"), pair[1], os.path.join(root, "bad3"), *FAST))
    assert "does not exist" in msg
    empty = os.path.join(root, "empty")
    os.makedirs(empty, exist_ok=True)
    assert "config.json" in _err(run("compress", empty, pair[1], os.path.join(root, "bad3"), *FAST))
    msg = _err(run("compress", *pair, os.path.join(root, "bad3"), "--calib", os.path.join(root, "none.jsonl")))
    assert "none.jsonl" in msg
    assert not _leftovers(root, "bad3")


def test_text_calibration_without_tokenizer(root):
    base, ft = make_pair(root, "llama", tokenizer=False)
    msg = _err(run("compress", base, ft, os.path.join(root, "bad4"), "--calib", write_calib(root, "txt")))
    assert "tokenizer" in msg
    assert not _leftovers(root, "bad4")


def test_unwritable_output(root, pair, delta):
    afile = os.path.join(root, "a_file")
    open(afile, "w").close()
    msg = _err(run("compress", *pair, os.path.join(afile, "out"), *FAST))
    assert "does not exist" in msg or "not writable" in msg
    msg = _err(run("apply", pair[0], delta, os.path.join(afile, "out")))
    assert "does not exist" in msg or "not writable" in msg
    if os.geteuid() != 0:  # root ignores permission bits
        ro = os.path.join(root, "ro")
        os.makedirs(ro, exist_ok=True)
        os.chmod(ro, 0o500)
        try:
            assert "not writable" in _err(run("compress", *pair, os.path.join(ro, "out"), *FAST))
        finally:
            os.chmod(ro, 0o700)


def test_wrong_base_at_apply(root, pair, delta):
    other = make_finetuned(pair[0], os.path.join(root, "other-base"), seed=9, frozen=("layers.1.",))
    out = os.path.join(root, "bad5")
    msg = _err(run("apply", other, delta, out))
    assert "wrong base" in msg and "--force" in msg
    assert not _leftovers(root, "bad5")
    res = run("apply", other, delta, out, "--force")
    assert res.exit_code == 0, res.output


def test_truncated_and_corrupted_delta(root, pair, delta):
    # truncated: a step directory removed
    trunc = os.path.join(root, "trunc")
    shutil.copytree(delta, trunc)
    shutil.rmtree(os.path.join(trunc, "steps", "2"))
    assert "truncated" in _err(run("inspect", trunc))
    assert "truncated" in _err(run("apply", "x", trunc, os.path.join(root, "bad6")))
    # corrupted metadata
    bad = os.path.join(root, "badmeta")
    shutil.copytree(delta, bad)
    with open(os.path.join(bad, "prinmix_delta.json"), "w") as f:
        f.write("{not json")
    assert "corrupted" in _err(run("inspect", bad))
    # corrupted array bytes: flip bytes in every data file of one step
    cor = os.path.join(root, "corrupt")
    shutil.copytree(delta, cor)
    flipped = 0
    for dirpath, _, files in os.walk(os.path.join(cor, "steps", "1", "arrays")):
        for fn in files:
            p = os.path.join(dirpath, fn)
            if os.sep + "d" + os.sep in p + os.sep and os.path.getsize(p) > 64:
                data = bytearray(open(p, "rb").read())
                data[len(data) // 2] ^= 0xFF
                open(p, "wb").write(bytes(data))
                flipped += 1
    assert flipped
    assert "corrupted" in _err(run("inspect", cor, "--verify"))
    assert "corrupted" in _err(run("apply", pair[0], cor, os.path.join(root, "bad6")))
    # a folder without the top-level metadata (what an interrupted run would publish) is not a delta
    nometa = os.path.join(root, "nometa")
    shutil.copytree(delta, nometa)
    os.remove(os.path.join(nometa, "prinmix_delta.json"))
    assert "no prinmix_delta.json" in _err(run("inspect", nometa))
    assert not _leftovers(root, "bad6")


def test_console_script_exit_code(root):
    """The real process: exit status 1, one line on stderr, no traceback."""
    env = jax_cache_env()
    r = subprocess.run([sys.executable, "-m", "prinmix_jax.cli", "inspect", os.path.join(root, "missing")],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1].startswith("error: ") and "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "prinmix_jax.cli", "--bogus"], capture_output=True, text=True,
                       env=env, timeout=120)
    assert r.returncode == 2


def test_gpu_autotune_is_off_by_default_only_where_cuda_is(monkeypatch):
    import prinmix_jax.cli.runtime as cli

    flag = "--xla_gpu_autotune_level=0"
    monkeypatch.setattr(cli, "CUDA_PLUGINS", ("json",))                # an importable module stands for the plugin
    env = {"XLA_FLAGS": "--xla_dump_to=/tmp/x"}
    assert cli.gpu_xla_flags(False, env) and env["XLA_FLAGS"] == f"--xla_dump_to=/tmp/x {flag}"
    env = {"XLA_FLAGS": "--xla_gpu_autotune_level=4"}                 # the user's own level wins
    assert not cli.gpu_xla_flags(False, env) and env["XLA_FLAGS"] == "--xla_gpu_autotune_level=4"
    env = {}
    assert not cli.gpu_xla_flags(True, env) and env == {}             # --gpu-autotune
    monkeypatch.setattr(cli, "CUDA_PLUGINS", ("no_such_plugin_xyz", "no_such_pkg_xyz.mod"))
    assert not cli.gpu_xla_flags(False, env) and env == {}            # no CUDA: other backends untouched
    # XLA knows the flag (an unknown one aborts the process), so setting it cannot break a run.
    out = subprocess.run([sys.executable, "-c", "import jax.numpy as jnp; print(float(jnp.ones(3).sum()))"],
                         env=dict(os.environ, XLA_FLAGS=flag, JAX_PLATFORMS="cpu"), capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "3.0", out.stderr[-500:]


def test_index_metadata_option_picks_the_stored_layout(root, pair):
    """``--index-metadata full`` writes format 2's layout (every leaf stored); the default is lean, and the
    same budget then keeps at least as many indices."""
    from prinmix_jax.storage import load_delta

    outs = {}
    for md in ("lean", "full"):
        outs[md] = os.path.join(root, f"delta-{md}")
        extra = [] if md == "lean" else ["--index-metadata", md]
        res = CliRunner().invoke(main, ["compress", *pair, outs[md], *FAST, "--method", "prinmix", *extra])
        assert res.exit_code == 0, res.output
    lean, full = load_delta(outs["lean"]), load_delta(outs["full"])
    assert lean.matrix(0, "q_proj").lean and not full.matrix(0, "q_proj").lean
    assert lean.meta["config"]["index_metadata"] == "lean" and full.meta["config"]["index_metadata"] == "full"
    names = ("q_proj", "up_proj", "down_proj")
    assert sum(lean.matrix(0, n).rank for n in names) >= sum(full.matrix(0, n).rank for n in names)
    assert run("compress", *pair, os.path.join(root, "x2"), "--index-metadata", "tiny").exit_code == 2
