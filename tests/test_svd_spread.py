"""Issue 14 item 3 for the SVDs: on a mesh of several devices no device computes a padding copy of a matrix,
and a block's stacks (q,k,v · o · gate,up · down: 1–3 matrices each) start their SVDs together, each stack on
devices of its own, with the same bytes as one stack at a time. (The suite runs on 8 simulated CPU devices.)"""
import os

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from pipeline_fixtures import read_arrays

from prinmix_jax import CompressionConfig, step_compress
from prinmix_jax.core import svd as svd_mod
from prinmix_jax.core.mesh import _compiled, default_mesh, run_sharded
from prinmix_jax.core.svd import plan_devices, svd_cost, svd_fn
from prinmix_jax.methods.shared import max_kept_rank, svd_rank
from prinmix_jax.pipeline import ParamPolicy, compress_model
from prinmix_jax.synthetic import write_llama_pair

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices")

CFG = CompressionConfig(ratio=1 / 16, group_size=16)


def _counted(fn, seen):
    """``fn`` that records each batch item it computes (a callback per item under ``vmap``)."""
    def run(x):
        jax.debug.callback(lambda a: seen.append(float(a)), x[0, 0])
        return fn(x)
    return run


@pytest.mark.parametrize("b", [1, 3, 8, 11])
def test_run_sharded_computes_no_padding_copies(b):
    """A stack of 3 on 8 devices used to be padded with 5 copies of its first matrix; now each device that
    works computes a matrix of its own, and the results are the bytes the padded program gives (each device
    takes its matrices one at a time, so 11 matrices, 2 on some devices, give the same bytes as 16)."""
    mesh = default_mesh()
    d = np.random.default_rng(b).standard_normal((b, 96, 64)).astype(np.float32)
    seen = []
    out = run_sharded(_counted(svd_fn(24, "gram"), seen), mesh, d)
    jax.effects_barrier()
    assert len(seen) == b and sorted(seen) == sorted(d[:, 0, 0].tolist())
    pad = (-b) % mesh.size            # the old path, reproduced: pad with copies, one program over the mesh
    padded = np.concatenate([d, np.repeat(d[:1], pad, axis=0)])
    ref = _compiled(svd_fn(24, "gram"), mesh, 1, False, "batch")(
        jax.device_put(padded, NamedSharding(mesh, P("batch"))))
    for got, want in zip(out, ref):
        assert np.array_equal(np.asarray(got), np.asarray(want)[:b])


def _llama_block_stacks(hidden=4096, inter=11008, cfg=CFG):
    """(sizes, costs) of a Llama block's SVD stacks at the pipeline's ranks: q,k,v · o · gate,up · down."""
    shapes = [(3, (hidden, hidden)), (1, (hidden, hidden)), (2, (inter, hidden)), (1, (hidden, inter))]
    costs = [svd_cost(m, n, svd_rank(m, n, cfg, max_kept_rank(m, n, cfg))) for _, (m, n) in shapes]
    return [s for s, _ in shapes], costs


def test_a_llama_block_starts_its_svds_on_seven_devices_at_once():
    sizes, costs = _llama_block_stacks()
    place = plan_devices(sizes, costs, 8)
    used = [d for p in place for d in p]
    assert [len(p) for p in place] == sizes and len(set(used)) == 7       # one matrix per device, no copies
    # wall time in units of the work: one stack after another (every device waits for the stack's slowest
    # matrix, or computes its copy) against all at once (the slowest device's load)
    work = sum(s * c for s, c in zip(sizes, costs))
    before, now = sum(costs), max(sum(c for p, c in zip(place, costs) if d in p) for d in range(8))
    assert now == max(costs) and before / now > 2.5
    assert work / (8 * now) > 2.5 * work / (8 * before)


@pytest.mark.parametrize("seed", range(20))
def test_plan_devices_balances_the_load(seed):
    """Greedy longest-first placement: each stack on distinct devices, none left out that fits, and the
    largest load within (4/3)·OPT + the largest stack cost, where OPT ≥ max(total / devices, largest cost)."""
    rng = np.random.default_rng(seed)
    devices = int(rng.integers(2, 9))
    sizes = rng.integers(1, devices + 3, int(rng.integers(1, 9))).tolist()
    costs = rng.uniform(0.1, 5.0, len(sizes)).tolist()
    place = plan_devices(sizes, costs, devices)
    load = np.zeros(devices)
    for s, c, p in zip(sizes, costs, place):
        if s > devices:
            assert p == []
            continue
        assert len(p) == s and len(set(p)) == s and all(0 <= d < devices for d in p)
        load[p] += c
    fit = [(s, c) for s, c in zip(sizes, costs) if s <= devices]
    if fit:
        bound = max(sum(s * c for s, c in fit) / devices, max(c for _, c in fit))
        assert load.max() <= 4 / 3 * bound + max(c for _, c in fit) + 1e-9


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("svd-spread")
    base, ft = write_llama_pair(str(root), 2, 64, 128, 64)      # 64x64 (Gram SVD), 128x64, 64x128
    calib = np.random.default_rng(3).integers(3, 64, (4, 16)).astype(np.int32)
    return root, base, ft, calib


def _run(pair, out, spread, monkeypatch, window=True, **kw):
    """compress_model with the block SVDs started together or not; returns the matrices each SVD program
    computed (by the stacks' own calls and by the prefetch) and what the prefetch left untaken."""
    root, base, ft, calib = pair
    monkeypatch.setattr(step_compress, "SPREAD_SVDS", spread)
    monkeypatch.setattr(step_compress, "WINDOW_ON_CPU", window)
    started, left = [], []
    real_prefetch, real_using = svd_mod.prefetch_svds, svd_mod.using_prefetched_svds

    def prefetch(requests, mesh=None, axis="batch"):
        started.append(sum(len(t) for t, _, _ in requests))
        return real_prefetch(requests, mesh, axis)

    def using(pre):
        cm = real_using(pre)
        left.append(pre)                    # checked after the run: every started SVD was taken
        return cm
    monkeypatch.setattr(step_compress, "prefetch_svds", prefetch)
    monkeypatch.setattr(step_compress, "using_prefetched_svds", using)    # every pass's, the windows' too
    compress_model(base, ft, os.path.join(root, out), config=CFG, seq_len=16,
                   policy=ParamPolicy(embeddings="store", lm_head="store"), log=lambda m: None, **kw)
    return started, left


@pytest.mark.parametrize("scope,calib_mode,expected", [
    ("matrix", None, [14]),                 # both blocks' 7 linears (4 stacks each) start together
    ("matrix", "parallel", [14]),           # the blocks' Hessians come from one forward, before any compression
    ("matrix", "sequential", [7, 7]),       # a block's Hessians need the blocks before it compressed
    ("global", "parallel", [14, 14]),       # first pass, then the second (nothing kept here)
])
def test_block_svds_start_together_with_the_same_bytes(pair, monkeypatch, scope, calib_mode, expected):
    from prinmix_jax import pipeline
    monkeypatch.setattr(pipeline, "SVD_REUSE", "never")   # (a kept SVD is read back, not started again)
    kw = {} if calib_mode is None else dict(calib=pair[3], calibration_mode=calib_mode)
    name = f"{scope}-{calib_mode}"
    started_off, _ = _run(pair, f"off-{name}", False, monkeypatch, scope=scope, **kw)
    started, left = _run(pair, f"on-{name}", True, monkeypatch, scope=scope, **kw)
    assert started_off == []
    # the SVDs of SVD_WINDOW_BLOCKS blocks (here both) start in one go
    assert started == expected
    assert all(not pre for pre in left), "a started SVD was not taken"
    assert read_arrays(os.path.join(pair[0], f"on-{name}")) == read_arrays(os.path.join(pair[0], f"off-{name}"))


@pytest.mark.parametrize("scope,calib_mode,method,reuse,expected", [
    ("matrix", "parallel", "prinmix", "never", [8]),         # both blocks' 4 distinct Hessians, in one go
    ("matrix", "sequential", "prinmix", "never", [4, 4]),    # a window of one block
    ("global", "parallel", "prinmix", "never", [8, 8]),      # both passes (the second's V step at given widths)
    ("global", "parallel", "prinmix", "always", [8]),        # the second pass takes the first's kept V passes
    ("matrix", "parallel", "deltacome", "never", [8]),       # its V step at fixed widths under the Hessians
])
def test_block_gptq_set_ups_start_together_with_the_same_bytes(pair, monkeypatch, scope, calib_mode, method,
                                                                reuse, expected):
    """With several devices the GPTQ set-ups of a window's distinct Hessians start together, one per device
    (step_compress.spread_factors), and every stack takes them; off, each stack of each block factors its own
    (one per stack: q,k,v · o · gate,up · down), with the same bytes. Where the global scope's first pass kept a
    stack's V passes, its second pass starts no set-up for it."""
    from prinmix_jax import pipeline
    from prinmix_jax.core import factors
    monkeypatch.setattr(pipeline, "SVD_REUSE", reuse)
    kw = dict(calib=pair[3], calibration_mode=calib_mode, scope=scope, method=method)
    name = f"{scope}-{calib_mode}-{method}-{reuse}"
    runs, real = {}, factors.start_factors
    for spread in (False, True):
        monkeypatch.setattr(step_compress, "SPREAD_FACTORS", spread)
        runs[spread] = started = []                     # set-ups started per call of start_factors

        def counted(hessians, *a, started=started, **kw):
            started.append(len(hessians))
            return real(hessians, *a, **kw)
        monkeypatch.setattr(factors, "start_factors", counted)
        _run(pair, f"factors-{spread}-{name}", True, monkeypatch, **kw)
    assert runs[True] == expected
    assert runs[False] == [1] * sum(expected)               # here every stack has a Hessian of its own
    assert (read_arrays(os.path.join(pair[0], f"factors-True-{name}"))
            == read_arrays(os.path.join(pair[0], f"factors-False-{name}")))


def test_cpu_devices_start_one_block_at_a_time_by_default(pair, monkeypatch):
    """Simulated CPU devices share the host's cores: without step_compress.WINDOW_ON_CPU the window holds one
    block (no more host memory than one block's deltas), while a block's stacks still start together."""
    from prinmix_jax import pipeline
    monkeypatch.setattr(pipeline, "SVD_REUSE", "never")
    started, left = _run(pair, "cpu-default", True, monkeypatch, window=False, scope="global", calib=pair[3])
    assert started == [7, 7, 7, 7]
    assert all(not pre for pre in left)


def test_a_stopped_windowed_run_resumes_to_the_same_bytes(pair, monkeypatch):
    """A run stopped inside a window of blocks (after the globals and block 0 of a 3-block window) resumes
    from the next block, and the result equals a run in one go with the same bytes."""
    root, base, ft, calib = pair
    monkeypatch.setattr(step_compress, "SVD_WINDOW_BLOCKS", 3)
    monkeypatch.setattr(step_compress, "WINDOW_ON_CPU", True)
    kw = dict(config=CFG, seq_len=16, calib=calib, scope="matrix", log=lambda m: None,
              policy=ParamPolicy(embeddings="store", lm_head="store"))
    whole = os.path.join(root, "window-whole")
    compress_model(base, ft, whole, **kw)
    parts = os.path.join(root, "window-parts")
    assert compress_model(base, ft, parts, _stop_after_steps=2, **kw) == {"stopped_after_steps": 2}
    steps = sorted(os.listdir(os.path.join(parts + ".partial", "steps")))
    compress_model(base, ft, parts, **kw)
    assert read_arrays(parts) == read_arrays(whole)
    assert len([s for s in steps if s.isdigit()]) == 2, steps


def _device_spy(monkeypatch):
    """Records the device each U step (``svd_quant``) ran on."""
    from prinmix_jax.methods import shared
    seen = []
    real = shared.svd_quant

    def spy(delta, *a, **kw):
        seen.append(next(iter(delta.devices())).id)
        return real(delta, *a, **kw)
    monkeypatch.setattr(shared, "svd_quant", spy)
    return seen


@pytest.mark.parametrize("scope,calibrated", [("matrix", False), ("global", True)])
def test_u_steps_run_side_by_side_with_the_same_bytes(pair, monkeypatch, scope, calibrated):
    """A stack's U steps, each in a thread on a device of its own (shared.U_STEPS_ON_CPU turns it on for these
    simulated devices), give the checkpoint of the plain loop on the first device, byte for byte."""
    from prinmix_jax import pipeline
    from prinmix_jax.methods import shared
    monkeypatch.setattr(pipeline, "SVD_REUSE", "never")
    calib = pair[3] if calibrated else None
    loop = _device_spy(monkeypatch)
    _run(pair, f"u-loop-{scope}", True, monkeypatch, scope=scope, calib=calib)
    monkeypatch.setattr(shared, "U_STEPS_ON_CPU", True)
    threads = _device_spy(monkeypatch)             # (wraps the first spy: each call is recorded in both)
    _run(pair, f"u-threads-{scope}", True, monkeypatch, scope=scope, calib=calib)
    n = len(loop) // 2                               # the first run's calls, before the second spy
    assert n and set(loop[:n]) == {0}
    assert set(threads) == {0, 1, 2}                      # q,k,v on three devices, gate/up on two
    assert read_arrays(os.path.join(pair[0], f"u-threads-{scope}")) == \
        read_arrays(os.path.join(pair[0], f"u-loop-{scope}"))


def test_deltacome_u_steps_side_by_side_same_bytes(monkeypatch):
    """Delta-CoMe's U step quantises the SVD's U (no RTC): the same bytes in threads as in the loop."""
    from prinmix_jax import compress_stack
    from prinmix_jax.methods import shared
    rng = np.random.default_rng(5)
    deltas = [rng.standard_normal((96, 64)).astype(np.float32) for _ in range(3)]
    cfg = CompressionConfig(ratio=1 / 8, group_size=16)
    loop = compress_stack(deltas, None, cfg, "deltacome", mesh=default_mesh())
    monkeypatch.setattr(shared, "U_STEPS_ON_CPU", True)
    seen = _device_spy(monkeypatch)
    threads = compress_stack(deltas, None, cfg, "deltacome", mesh=default_mesh())
    assert sorted(seen) == [0, 1, 2]
    for a, b in zip(loop, threads):
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
            assert np.array_equal(np.asarray(x), np.asarray(y))


def test_embedding_sized_stacks_are_not_read_ahead(monkeypatch):
    """Matrices of STACK_SPLIT_BYTES or more keep their one-stack-at-a-time host memory: not read up front,
    not started early; the others are, together."""
    rng = np.random.default_rng(1)
    small = [rng.standard_normal((64, 48)).astype(np.float32) for _ in range(2)]
    big = [rng.standard_normal((96, 64)).astype(np.float32) for _ in range(2)]
    monkeypatch.setattr(step_compress, "STACK_SPLIT_BYTES", 4 * 96 * 64)
    stacks = [(["0/a", "0/b"], small, None, None), (["0/c"], small[:1], None, None), (["g/e", "g/h"], big, None, None)]
    held, pre = step_compress.spread_stack_svds(stacks, CFG, "prinmix", default_mesh())
    assert sorted(held) == [0, 1]
    assert {t[0] for t in pre} == {"0/a", "0/b", "0/c"}
    monkeypatch.setattr(step_compress, "STACK_SPLIT_BYTES", 1 << 30)
    held, pre = step_compress.spread_stack_svds(stacks, CFG, "prinmix", default_mesh())
    assert sorted(held) == [0, 1, 2] and {t[0] for t in pre} == {"0/a", "0/b", "0/c", "g/e", "g/h"}
