"""Issue 14 item 2: the global scope computes every block linear's SVD once. The first pass (error tables)
keeps the SVDs on disk (svd_store.SVDStore); the second pass reads them back instead of calling the SVD
again, with byte-identical results; nothing kept survives the run or is trusted by a later one."""
import os

import numpy as np
import pytest

from pipeline_fixtures import read_arrays

from prinmix_jax import CompressionConfig
from prinmix_jax import pipeline
from prinmix_jax.core.svd import svd_settings
from prinmix_jax.methods import shared, v_step
from prinmix_jax.pipeline import ParamPolicy, compress_model
from prinmix_jax.svd_store import SVD_DIR, SVDStore
from prinmix_jax.synthetic import write_llama_pair

CFG = CompressionConfig(ratio=1 / 16, group_size=16)
STORE_GLOBALS = ParamPolicy(embeddings="store", lm_head="store")
LAYERS = 2
LINEARS = 7 * LAYERS


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("svd-reuse")
    base, ft = write_llama_pair(str(root), LAYERS, 64, 128, 64)      # 64x64 (truncated SVD), 128x64, 64x128
    calib = np.random.default_rng(3).integers(3, 64, (4, 16)).astype(np.int32)
    return root, base, ft, calib


@pytest.fixture(scope="module")
def one_shape_pair(tmp_path_factory):
    """One block whose linears are all 64x64: stacks of 3 (q, k, v), 2 (gate, up) and 1, and one shape's programs
    to compile (the split test's cost is compiling for a 1-device mesh)."""
    root = tmp_path_factory.mktemp("svd-reuse-one-shape")
    base, ft = write_llama_pair(str(root), 1, 64, 64, 64)
    calib = np.random.default_rng(3).integers(3, 64, (4, 16)).astype(np.int32)
    return root, base, ft, calib


def _counting_svd(monkeypatch):
    """Counts the matrices that go through the SVD (``svd_sharded``) from now on."""
    seen = []
    real = shared.svd_sharded

    def svd(deltas, *a, **kw):
        seen.append(int(deltas.shape[0]))
        return real(deltas, *a, **kw)
    monkeypatch.setattr(shared, "svd_sharded", svd)
    return seen


def _counting_v_steps(monkeypatch):
    """Counts the matrices whose V step (GPTQ of V at given widths, ``fixed_width_rows``) runs a GPTQ pass."""
    seen = []
    real = v_step.stack_rows

    def rows(fn, fn_identity, mesh, rows, *a, **kw):
        seen.append(len(rows[0]))
        return real(fn, fn_identity, mesh, rows, *a, **kw)
    monkeypatch.setattr(v_step, "stack_rows", rows)
    return seen


def _run(pair, out, policy, monkeypatch, v_steps=None, **kw):
    root, base, ft, calib = pair
    monkeypatch.setattr(pipeline, "SVD_REUSE", policy)
    seen = _counting_svd(monkeypatch)
    passes = _counting_v_steps(monkeypatch)
    messages = []
    compress_model(base, ft, os.path.join(root, out), calib=calib, config=CFG, scope="global", seq_len=16,
                   policy=STORE_GLOBALS, log=messages.append, **kw)
    if v_steps is not None:
        v_steps.append(sum(passes))
    return sum(seen), messages


@pytest.mark.xdist_group("svd_reuse")   # one worker: the pair and the "never" run are shared
def test_second_pass_reads_the_svds_back_byte_identical(pair, monkeypatch):
    """... and the V step takes its rows from the error tables' GPTQ passes instead of running GPTQ again."""
    root = pair[0]
    v_steps = []
    n_never, _ = _run(pair, "never", "never", monkeypatch, v_steps)
    n_always, log = _run(pair, "always", "always", monkeypatch, v_steps)
    assert n_never == 2 * LINEARS                 # today: the table pass and the compress pass
    assert n_always == LINEARS                    # once: the compress pass calls no SVD
    assert v_steps == [LINEARS, 0]                # the block linears' V steps: GPTQ, then the kept passes
    assert any(f"{LINEARS} kept" in m and f"{LINEARS} read back" in m for m in log), log
    assert any(f"V passes: {LINEARS} kept" in m and m.count(f"{LINEARS} read back") == 2 for m in log), log
    assert read_arrays(os.path.join(root, "always")) == read_arrays(os.path.join(root, "never"))
    for out in ("always", "never"):              # the store is not published, nor left behind
        assert not os.path.exists(os.path.join(root, out, SVD_DIR))
        assert not os.path.exists(os.path.join(root, out + ".partial"))


@pytest.mark.xdist_group("svd_reuse")   # one worker: the pair and the "never" run are shared
def test_resume_does_not_trust_svds_of_an_earlier_run(pair, monkeypatch):
    """A run stopped after 2 steps leaves its work folder; poisoned SVDs planted there are not read: the
    resumed run starts its store empty and ends byte-identical to an uninterrupted run."""
    root = pair[0]
    _run(pair, "stopped", "always", monkeypatch, _stop_after_steps=2)
    work = os.path.join(root, "stopped.partial")
    assert os.path.isdir(work) and not os.path.exists(os.path.join(work, SVD_DIR))
    store = SVDStore(os.path.join(work, SVD_DIR, "p0"), "always")        # what a killed run would leave
    for name, (m, n) in (("q_proj", (64, 64)), ("gate_proj", (128, 64)), ("down_proj", (64, 128))):
        rank = shared.svd_rank(m, n, CFG, shared.max_kept_rank(m, n, CFG))
        kw = {} if rank is None else dict(rank=rank, oversample=shared.oversample_columns(rank, CFG),
                                          iters=CFG.svd_iters)
        k = min(m, n) if rank is None else rank
        poison = tuple(np.full((1, *s), 7.0, np.float32) for s in ((m, k), (k,), (k, n)))
        for b in range(LAYERS):
            store.stack_svd([f"{b}/{name}"], lambda: None, lambda d, p=poison: p, svd_settings(**kw))
    assert len(os.listdir(os.path.join(work, SVD_DIR, "p0"))) == 3 * LAYERS
    n, log = _run(pair, "stopped", "always", monkeypatch)
    assert any("resuming" in m for m in log) and n == LINEARS
    ref = os.path.join(root, "never")
    if not os.path.isdir(ref):
        _run(pair, "never", "never", monkeypatch)
    assert read_arrays(os.path.join(root, "stopped")) == read_arrays(ref)
    assert not os.path.exists(work)


def test_store_reads_back_the_same_bytes_and_computes_only_what_it_lacks(tmp_path):
    rng = np.random.default_rng(0)
    d = rng.standard_normal((3, 12, 10)).astype(np.float32)
    calls = []

    def svd(x):
        calls.append(x.shape[0])
        u, s, vt = np.linalg.svd(x, full_matrices=False)
        return u, s, vt

    store = SVDStore(str(tmp_path / "p0"), "always")
    first = store.stack_svd(["0/a", "0/b"], lambda: d[:2], svd, "full")
    store.freeze()
    again = store.stack_svd(["0/b", "0/c", "0/a"], lambda: d[[1, 2, 0]], svd, "full")
    assert calls == [2, 1]                        # only "0/c" computed the second time
    for f in range(3):
        assert np.array_equal(again[f][0], first[f][1]) and np.array_equal(again[f][2], first[f][0])
        assert np.array_equal(again[f][1], svd(d[2:3])[f][0])
    assert store.stack_svd(["0/a"], lambda: d[:1], svd, "r4-o2-i1-s0") is not None and calls[-1] == 1  # other SVD
    assert os.listdir(tmp_path / "p0") == []      # read back once in the second pass, then deleted
    assert SVDStore(str(tmp_path / "p0"), "never").stack_svd(["0/a"], lambda: d[:1], svd, "full")[1].shape == (1, 10)


def test_auto_keeps_an_svd_only_when_reading_it_back_is_cheaper(tmp_path):
    store = SVDStore(str(tmp_path / "p0"), "auto")
    store.bytes_per_s = 1e9
    assert store._worth(1.0, 100_000_000)         # 1 s of SVD against 0.2 s of writing and reading
    assert not store._worth(0.1, 100_000_000)     # recomputing is cheaper
    assert not SVDStore(str(tmp_path / "p1"), "never")._worth(1e9, 1)
    with pytest.raises(ValueError, match="policy"):
        SVDStore(str(tmp_path / "p2"), "sometimes")


def test_large_matrices_are_compressed_one_stack_per_device_with_the_same_bytes(one_shape_pair, monkeypatch):
    """Matrices above step_compress.STACK_SPLIT_BYTES (a 7B embedding and head) go to compress_stack one per
    device, which bounds the peak memory of the globals step; the stored arrays do not change."""
    import prinmix_jax.step_compress as sc

    pair = one_shape_pair
    root = pair[0]
    sizes = []
    real = sc.compress_stack

    def counting(deltas, *a, **kw):
        sizes.append(len(deltas))
        return real(deltas, *a, **kw)
    monkeypatch.setattr(sc, "compress_stack", counting)
    from prinmix_jax.core.mesh import single_device_mesh

    _run(pair, "stacked", "never", monkeypatch, mesh=single_device_mesh())
    stacked = list(sizes)
    sizes.clear()
    monkeypatch.setattr(sc, "STACK_SPLIT_BYTES", 0)
    _run(pair, "split", "never", monkeypatch, mesh=single_device_mesh())
    assert max(stacked) > 1 and set(sizes) == {1} and sum(sizes) == sum(stacked)
    assert read_arrays(os.path.join(root, "split")) == read_arrays(os.path.join(root, "stacked"))
