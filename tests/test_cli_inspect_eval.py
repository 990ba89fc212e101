"""`prinmix inspect` / `eval` / `demo` on hostile inputs: plots of deltas with nothing to draw, --plot into a
missing folder, stdout closed early, eval on checkpoints without a tokenizer, --seq-len beyond the model's
context (eval and compress), and each command's help (one example, only its own exit statuses)."""
import json
import os
import shlex
import shutil
import subprocess
import sys

import pytest

from cli_helpers import cli_error as _err
from cli_helpers import run
from pipeline_fixtures import DIMS, jax_cache_env, make_pair, write_calib

from prinmix_jax.cli import epilog

FAST = ["--method", "bitdelta", "--embeddings", "skip", "--lm-head", "skip", "--no-progress"]
CONTEXT = DIMS["max_position_embeddings"]  # 64


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("cli_ie")


@pytest.fixture(scope="module")
def pair(root):
    return make_pair(root, "llama")


@pytest.fixture(scope="module")
def zero_delta(root, pair):
    """BASE against itself: every matrix delta is zero, 0 bytes stored."""
    out = os.path.join(root, "zero")
    res = run("compress", pair[0], pair[0], out, "--data-free", *FAST)
    assert res.exit_code in (0, 3), res.output  # 3: "degenerate result", the delta folder is still written
    return out


@pytest.fixture(scope="module")
def bitdelta(root, pair):
    out = os.path.join(root, "bitdelta")
    res = run("compress", *pair, out, "--data-free", *FAST)
    assert res.exit_code in (0, 3), res.output  # 3: over budget (bitdelta's scales on 32x32 matrices)
    return out


@pytest.fixture(scope="module")
def weightless(root, pair):
    """config.json of FINETUNED only (no weights, no tokenizer): an input check that ran after loading the
    weights would report the missing safetensors instead."""
    d = os.path.join(root, "ft-config-only")
    os.makedirs(d, exist_ok=True)
    shutil.copyfile(os.path.join(pair[1], "config.json"), os.path.join(d, "config.json"))
    return d


@pytest.fixture(scope="module")
def task(root):
    path = os.path.join(root, "task.jsonl")
    with open(path, "w") as f:
        for p, a in (("sort: cba =>", "abc"), ("sort: fed =>", "def")):
            f.write(json.dumps({"prompt": p, "answer": a}) + "\n")
    return path


def _is_png(path):
    with open(path, "rb") as f:
        return f.read(8) == b"\x89PNG\r\n\x1a\n"


# ----- inspect --plot ----------------------------------------------------------------------------
def test_plot_of_a_delta_without_widths(root, zero_delta, bitdelta):
    """Was: exit 1 "error: number sections must be larger than 0." (zero delta) and "error: Number of rows
    must be a positive integer, not 0" (bitdelta) from inside matplotlib."""
    for name, delta in (("zero", zero_delta), ("bitdelta", bitdelta)):
        png = os.path.join(root, f"{name}.png")
        res = run("inspect", delta, "--plot", png)
        assert res.exit_code == 0, (name, res.output)
        assert _is_png(png) and os.path.getsize(png) > 1000, name
        assert f"plot       {png}" in res.output
        assert not [n for n in os.listdir(root) if n.endswith(".tmp.png")]


def test_plot_into_a_missing_folder(root, zero_delta):
    """Was: exit 1 with "[Errno 2] No such file or directory: '.../p.png.tmp.png'" after loading the delta."""
    png = os.path.join(root, "no-such-folder", "p.png")
    msg = _err(run("inspect", zero_delta, "--plot", png))
    assert png in msg and "does not exist" in msg and ".tmp" not in msg, msg
    # checked before any work: the delta is not even opened
    msg = _err(run("inspect", os.path.join(root, "no-such-delta"), "--plot", png))
    assert "--plot" in msg and "does not exist" in msg, msg
    assert not os.path.exists(os.path.dirname(png))


# ----- stdout closed early -----------------------------------------------------------------------
def test_closed_stdout_ends_quietly(tmp_path_factory, zero_delta):
    """Was: exit 1 and "error: [Errno 32] Broken pipe" on stderr."""
    env = jax_cache_env(devices=1)
    cmd = [sys.executable, "-m", "prinmix_jax.cli", "inspect", zero_delta]
    # Deterministic: the reader is gone before the first write.
    r_fd, w_fd = os.pipe()
    os.close(r_fd)
    try:
        p = subprocess.run(cmd, stdout=w_fd, stderr=subprocess.PIPE, text=True, env=env, timeout=120)
    finally:
        os.close(w_fd)
    assert p.returncode in (0, 141), (p.returncode, p.stderr)
    assert "error" not in p.stderr.lower() and "Traceback" not in p.stderr, p.stderr
    # The reported shape: `| head -1` (the reader may leave before or after the rest is written).
    errf = os.path.join(tmp_path_factory.mktemp("pipe"), "stderr.txt")
    line = " ".join(shlex.quote(c) for c in cmd)
    p = subprocess.run(["bash", "-c", f"{line} 2>{shlex.quote(errf)} | head -1"], capture_output=True, text=True,
                       env=env, timeout=120)
    assert p.stdout.startswith("delta"), (p.stdout, p.stderr)
    with open(errf) as f:
        err = f.read()
    assert "error" not in err.lower() and "Traceback" not in err, err


# ----- eval: tokenizer and seq-len checks --------------------------------------------------------
def test_eval_without_tokenizer(root, task):
    """Was: exit 1 with transformers' advice to install sentencepiece or tiktoken (--task), after loading
    both checkpoints."""
    base, ft = make_pair(root, "llama", tokenizer=False)
    msg = _err(run("eval", base, ft, "--task", task))
    assert ft in msg and "no tokenizer files" in msg and "tokenizer.json" in msg and "FINETUNED" in msg, msg
    assert "sentencepiece" not in msg.lower()
    for kind in ("txt", "jsonl"):  # --text that needs tokenizing
        msg = _err(run("eval", base, ft, "--text", write_calib(root, kind), "--seq-len", "16"))
        assert ft in msg and "no tokenizer files" in msg and "tokenizer.json" in msg, msg


def test_eval_checks_tokenizer_before_loading_weights(pair, weightless, task, root):
    msg = _err(run("eval", pair[0], weightless, "--task", task))
    assert "no tokenizer files" in msg and weightless in msg, msg
    msg = _err(run("eval", pair[0], weightless, "--text", write_calib(root, "txt"), "--seq-len", "16"))
    assert "no tokenizer files" in msg and weightless in msg, msg


def test_eval_seq_len_beyond_context(pair, weightless, root):
    """Was: accepted silently (scored windows longer than the model's context)."""
    ids = write_calib(root, "ids")
    msg = _err(run("eval", pair[0], weightless, "--text", ids, "--seq-len", str(CONTEXT + 36)))
    assert "--seq-len" in msg and str(CONTEXT + 36) in msg and str(CONTEXT) in msg, msg


def test_compress_seq_len_beyond_context(root, pair):
    """Was: exit 0, calibration windows of 100 tokens on a 64-token model."""
    out = os.path.join(root, "long")
    msg = _err(run("compress", *pair, out, "--calib", write_calib(root, "ids"), "--seq-len", str(CONTEXT + 36),
                   *FAST))
    assert str(CONTEXT + 36) in msg and str(CONTEXT) in msg and "context" in msg, msg
    assert "--seq-len" in msg, msg          # the option the user set (was the library's "seq_len=100")
    assert not [n for n in os.listdir(root) if n.startswith("long")]


def test_eval_missing_input_file_names_the_option(pair, weightless, root):
    """Was: "error: [Errno 2] No such file or directory: '...'" after the tokenizer was loaded."""
    for opt in ("--task", "--text"):
        missing = os.path.join(root, f"no-such{opt}.jsonl")
        msg = _err(run("eval", pair[0], weightless, opt, missing))
        assert msg == f"error: {opt} {missing}: no such file", msg


def test_eval_text_ids_beyond_the_vocabulary(pair, weightless, root):
    """Was: exit 0 with scores (JAX clamps an out-of-range embedding index); compress already refused them.
    Checked before any weights are loaded (FINETUNED here has no weights)."""
    path = os.path.join(root, "ids-beyond-vocab.jsonl")
    vocab = DIMS["vocab_size"]
    with open(path, "w") as f:
        f.writelines(json.dumps({"ids": list(range(3, 20)) + [vocab + 7]}) + "\n" for _ in range(3))
    msg = _err(run("eval", pair[0], weightless, "--text", path, "--seq-len", "16"))
    assert "--text" in msg and str(vocab + 7) in msg and str(vocab) in msg and "vocabulary" in msg, msg


# ----- help --------------------------------------------------------------------------------------
@pytest.mark.parametrize("command", ["inspect", "eval", "demo", "serve", "generate"])
def test_help_has_an_example_and_only_its_own_exit_statuses(command):
    """Was: no example, and the shared epilog promised resuming compress runs."""
    res = run(command, "--help")
    assert res.exit_code == 0
    assert f"Example:\n    prinmix {command} " in res.output, res.output
    assert "resume" not in res.output.lower()
    assert "Exit status:" in res.output and "PRINMIX_DEBUG" in res.output


def test_epilog_helper():
    text = epilog("3    degenerate result\n     (nothing to store)")
    lines = text.splitlines()
    assert lines[0] == "\b" and lines[1] == "Exit status:" and lines[-1].startswith("Set PRINMIX_DEBUG=1")
    assert "  3    degenerate result" in lines and "       (nothing to store)" in lines
    assert [ln.split()[0] for ln in lines[2:-1] if ln[2:3].isdigit()] == ["0", "1", "2", "3", "141"]
