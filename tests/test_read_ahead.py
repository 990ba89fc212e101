"""Decoder blocks read ahead in a thread (sources.read_ahead) while the devices work on the blocks before: the
same bytes as reading each block when its turn comes, at most ``ahead`` blocks read ahead, errors raised at
the block that has them, and no thread left behind. (On accelerators by default; here turned on with
step_compress.READ_AHEAD_ON_CPU.)"""
import os
import threading
import time

import numpy as np
import pytest

from pipeline_fixtures import read_arrays

import prinmix_jax.pipeline as pipeline_mod
import prinmix_jax.run as run_mod
from prinmix_jax import CompressionConfig, step_compress
from prinmix_jax.pipeline import NonFiniteWeightsError, ParamPolicy, compress_model
from prinmix_jax.sources import read_ahead
from prinmix_jax.synthetic import write_llama_pair

CFG = CompressionConfig(ratio=1 / 16, group_size=16)
THREAD = "prinmix-read-ahead"


def _no_reader_threads():
    return not any(t.name.startswith(THREAD) for t in threading.enumerate())


@pytest.mark.parametrize("ahead", [0, 1, 3])
def test_read_ahead_yields_in_order_and_reads_at_most_ahead(ahead):
    calls, seen = [], []

    def fn(x):
        calls.append(x)
        time.sleep(0.01)
        return x * x
    for i, y in enumerate(read_ahead(fn, range(7), ahead)):
        time.sleep(0.03)                               # the reader has time to run ahead as far as it may
        seen.append(y)
        assert len(calls) <= i + 1 + ahead, (i, calls)
        if ahead and i < 7 - ahead:
            assert len(calls) == i + 1 + ahead         # ... and it does
    assert seen == [x * x for x in range(7)] and calls == list(range(7))
    assert _no_reader_threads()


def test_read_ahead_raises_at_the_failing_item_and_stops_on_close():
    calls = []

    def fn(x):
        calls.append(x)
        if x == 2:
            raise ValueError("bad item 2")
        return x
    got = []
    with pytest.raises(ValueError, match="bad item 2"):
        for y in read_ahead(fn, range(6), 2):
            got.append(y)
    assert got == [0, 1]                               # the items before the failing one arrive first
    assert _no_reader_threads()
    calls.clear()
    gen = read_ahead(lambda x: calls.append(x) or x, range(10), 1)
    assert next(gen) == 0
    gen.close()                                        # the caller stops early: the read in flight ends, no more
    n = len(calls)
    time.sleep(0.05)
    assert len(calls) == n <= 2 and _no_reader_threads()


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("read-ahead")
    base, ft = write_llama_pair(str(root), 3, 64, 128, 64)
    calib = np.random.default_rng(5).integers(3, 64, (4, 16)).astype(np.int32)
    return str(root), base, ft, calib


def _compress(pair, out, monkeypatch, read_ahead_on, window_on, messages=False, **kw):
    """compress_model with reading ahead and the window on or off; returns the threads that read blocks (or,
    with ``messages``, the log)."""
    root, base, ft, calib = pair
    log = []
    monkeypatch.setattr(step_compress, "READ_AHEAD_ON_CPU", read_ahead_on)
    monkeypatch.setattr(step_compress, "WINDOW_ON_CPU", window_on)
    threads = []
    for mod in (run_mod, pipeline_mod):          # a block's deltas (both models, one tensor at a time)
        real = mod.block_deltas

        def block_deltas(*a, real=real, **k):
            threads.append(threading.current_thread().name)
            return real(*a, **k)
        monkeypatch.setattr(mod, "block_deltas", block_deltas)
    compress_model(base, ft, os.path.join(root, out), config=CFG, seq_len=16, log=log.append,
                   policy=ParamPolicy(embeddings="store", lm_head="store"), **kw)
    return log if messages else threads


@pytest.mark.parametrize("scope,mode", [("global", "parallel"), ("matrix", "sequential"), ("matrix", None)])
def test_blocks_read_ahead_give_the_same_bytes(pair, monkeypatch, scope, mode):
    kw = dict(scope=scope) if mode is None else dict(scope=scope, calib=pair[3], calibration_mode=mode)
    name = f"{scope}-{mode}"
    plain = _compress(pair, f"plain-{name}", monkeypatch, False, False, **kw)
    assert not any(t.startswith(THREAD) for t in plain)
    for window in (False, True):
        ahead = _compress(pair, f"ahead-{name}-{window}", monkeypatch, True, window, **kw)
        # every block the passes compress is read in the thread (a calibrated run's replay/forward reads none
        # again: the forward takes the block read ahead)
        assert sum(t.startswith(THREAD) for t in ahead) >= 3, ahead
        assert read_arrays(os.path.join(pair[0], f"ahead-{name}-{window}")) == \
            read_arrays(os.path.join(pair[0], f"plain-{name}"))
    assert _no_reader_threads()


def test_a_bad_block_read_ahead_is_refused_and_leaves_nothing(pair, monkeypatch, tmp_path):
    """NaN in block 1 of the fine-tuned model: read ahead while block 0 is compressed, the error is raised when
    block 1's turn comes, naming it, and the run leaves no output or work folder."""
    import shutil

    from safetensors.numpy import load_file, save_file

    root, base, ft, _ = pair
    bad = str(tmp_path / "ft-nan")
    shutil.copytree(ft, bad)
    for f in os.listdir(bad):
        if f.endswith(".safetensors"):
            path = os.path.join(bad, f)
            t = load_file(path)
            key = "model.layers.1.mlp.up_proj.weight"
            if key in t:
                t[key] = np.where(np.arange(t[key].size).reshape(t[key].shape) == 5, np.nan, t[key]).astype(
                    t[key].dtype)
                save_file(t, path, metadata={"format": "pt"})
    monkeypatch.setattr(step_compress, "READ_AHEAD_ON_CPU", True)
    out = str(tmp_path / "out")
    for scope in ("global", "matrix"):
        with pytest.raises(NonFiniteWeightsError, match=r"model\.layers\.1\.mlp\.up_proj\.weight.*block 1"):
            compress_model(base, bad, out, config=CFG, scope=scope, log=lambda m: None,
                           policy=ParamPolicy(embeddings="store", lm_head="store"))
        assert not os.path.exists(out) and not os.path.exists(out + ".partial")
        assert _no_reader_threads()


def test_kept_svds_are_read_ahead_in_the_second_pass(pair, monkeypatch):
    """The global scope's second pass reads the SVDs the first pass kept in the reading thread, with the
    block (SVDStore.preload), and its stacks take them from memory: the same bytes, every SVD read back once."""
    from prinmix_jax import pipeline
    from prinmix_jax.svd_store import SVDStore

    monkeypatch.setattr(pipeline, "SVD_REUSE", "always")
    reads = []
    real = SVDStore._read

    def spy(self, path, names, kind="svd"):
        if kind == "svd" and not self.writing:
            reads.append(threading.current_thread().name)
        return real(self, path, names, kind)
    monkeypatch.setattr(SVDStore, "_read", spy)
    kw = dict(scope="global", calib=pair[3], calibration_mode="parallel")
    _compress(pair, "svd-plain", monkeypatch, False, False, **kw)
    plain_reads, reads[:] = list(reads), []
    messages = _compress(pair, "svd-ahead", monkeypatch, True, False, messages=True, **kw)
    root = pair[0]
    linears = 3 * 7
    assert len(plain_reads) == linears and not any(t.startswith(THREAD) for t in plain_reads)
    assert len(reads) == linears and all(t.startswith(THREAD) for t in reads), reads
    assert any(f"{linears} kept" in m and f"{linears} read back" in m and f"{linears} computed" in m
               for m in messages), messages
    assert read_arrays(os.path.join(root, "svd-ahead")) == read_arrays(os.path.join(root, "svd-plain"))


def test_blocks_before_a_bad_block_of_a_window_are_written(pair, monkeypatch, tmp_path):
    """A resumed run whose window (3 blocks here) holds an unreadable block (NaN in block 2) still compresses
    and writes the blocks before it, as a run one block at a time would, before it raises."""
    import shutil

    from safetensors.numpy import load_file, save_file

    from prinmix_jax.storage import STEPS_DIR, WORK_SUFFIX, StepStore

    root, base, ft, _ = pair
    bad = str(tmp_path / "ft-nan2")
    shutil.copytree(ft, bad)
    key = "model.layers.2.self_attn.o_proj.weight"
    for f in os.listdir(bad):
        if f.endswith(".safetensors"):
            t = load_file(os.path.join(bad, f))
            if key in t:
                t[key] = np.where(np.arange(t[key].size).reshape(t[key].shape) == 1, np.nan, t[key]).astype(
                    t[key].dtype)
                save_file(t, os.path.join(bad, f), metadata={"format": "pt"})
    monkeypatch.setattr(step_compress, "WINDOW_ON_CPU", True)
    monkeypatch.setattr(step_compress, "SVD_WINDOW_BLOCKS", 3)
    kw = dict(config=CFG, scope="matrix", log=lambda m: None, policy=ParamPolicy(embeddings="store", lm_head="store"))
    for ahead in (False, True):
        monkeypatch.setattr(step_compress, "READ_AHEAD_ON_CPU", ahead)
        out = str(tmp_path / f"out-{ahead}")
        assert compress_model(base, bad, out, _stop_after_steps=1, **kw) == {"stopped_after_steps": 1}
        with pytest.raises(NonFiniteWeightsError, match="block 2"):
            compress_model(base, bad, out, **kw)
        store = StepStore(os.path.join(out + WORK_SUFFIX, STEPS_DIR), read_only=True)
        assert store.latest_step() == 2                 # the globals, blocks 0 and 1
        store.close()
    assert _no_reader_threads()
