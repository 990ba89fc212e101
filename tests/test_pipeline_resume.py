"""Resume: a `prinmix compress` killed with SIGKILL after some blocks are finished, started again, ends
with arrays byte-identical to an uninterrupted run (sequential calibration, so the replay of compressed
blocks through the calibration state is exercised too). BitDelta keeps the subprocesses' compile time
small; resume is method-independent (the PrinMix path is the same code after compress_stack)."""
import os
import signal
import subprocess
import sys
import time

import pytest

from pipeline_fixtures import jax_cache_env, make_pair, read_arrays, write_calib

from prinmix_jax.storage import STEPS_DIR, StepStore

LAYERS = 4


def _cmd(base, ft, calib, out):
    return [sys.executable, "-m", "prinmix_jax.cli", "compress", base, ft, out, "--calib", calib, "--seq-len", "16",
            "--group-size", "16", "--method", "bitdelta", "--calibration-mode", "sequential", "--embeddings", "store", "--lm-head",
            "store", "--no-progress"]


def _finished_steps(work):
    steps = os.path.join(work, STEPS_DIR)
    if not os.path.isdir(steps):
        return []
    return sorted(int(n) for n in os.listdir(steps)
                  if n.isdigit() and os.path.isfile(os.path.join(steps, n, "commit_success.txt")))


@pytest.mark.slow
def test_sigkill_then_resume_is_byte_identical(tmp_path):
    base, ft = make_pair(tmp_path, "llama", layers=LAYERS)
    calib = write_calib(tmp_path, "ids")
    env = jax_cache_env()

    out = os.path.join(tmp_path, "out")
    work = out + ".partial"
    proc = subprocess.Popen(_cmd(base, ft, calib, out), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    t0 = time.time()
    killed_at = None
    while proc.poll() is None and time.time() - t0 < 300:
        done = _finished_steps(work)
        if len(done) >= 2:  # globals and at least one block finished, more to go
            proc.send_signal(signal.SIGKILL)
            killed_at = done
            break
        time.sleep(0.005)
    proc.wait(timeout=60)
    assert killed_at is not None, "the run finished before it could be killed"
    assert proc.returncode == -signal.SIGKILL
    assert not os.path.exists(out)
    store = StepStore(os.path.join(work, STEPS_DIR), read_only=True)
    latest = store.latest_step()
    store.close()
    assert latest is not None and latest < LAYERS, "the kill came after the last block"

    r = subprocess.run(_cmd(base, ft, calib, out), env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming" in r.stderr
    assert not os.path.exists(work)
    # reference: the uninterrupted run, with the same command and environment (4 devices at XLA's default
    # optimisation level; this process compiles at level 0, whose products round differently on some CPUs)
    ref = os.path.join(tmp_path, "ref")
    r = subprocess.run(_cmd(base, ft, calib, ref), env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming" not in r.stderr
    assert read_arrays(out) == read_arrays(ref)
