"""Issue 14 item 3: run_rows_sharded spreads the rows of a stack over the devices (GPTQ's error feedback
stays in a row, the Hessian is shared), so that no device computes padding copies for a Llama block, with
results that do not depend on the device count."""
import functools
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import Mesh

from prinmix_jax.config import CompressionConfig
from prinmix_jax.core.factors import factor_settings, stack_factors
from prinmix_jax.core.gptq import GPTQResult, gptq_quantize
from prinmix_jax.core.mesh import ROW_TILES, row_plan, run_rows_sharded, run_sharded, useful_share
from prinmix_jax.methods.prinmix import TABLE_ROWS as PIPELINE_TABLE_ROWS, _error_table_fn
from prinmix_jax.methods.shared import gptq_kw, max_kept_rank, svd_rank
from prinmix_jax.methods.v_step import V_ROWS

CFG = CompressionConfig(group_size=32)
# one worker runs the module (pytest --dist loadgroup): its children run once for both tests
pytestmark = pytest.mark.xdist_group("mesh_rows")

TABLE_ROWS = (0, GPTQResult(1, 1, 1, 1, None))       # e (k, nw); passes (nnz, k, n) ...; damp per Hessian
GPTQ_ROWS = GPTQResult(0, 0, 0, 0, None)


@functools.cache
def _v_gptq(**kw):
    return lambda v, bits, h, damp: gptq_quantize(v, h, bits, damp, scale_axis="row", **kw)


def _v_gptq_matrices(**kw):      # run_sharded's argument order: v, h, bits, damp
    return _matrices_fn(_v_gptq(**kw))


@functools.cache
def _matrices_fn(fn):
    return lambda v, h, bits, damp: fn(v, bits, h, damp)


def _stack(b, k, n, seed=0, hessians=1):
    rng = np.random.default_rng(seed)
    v = rng.standard_normal((b, k, n)).astype(np.float32)
    v /= np.linalg.norm(v, axis=2, keepdims=True)
    s = np.sort(rng.random((b, k)).astype(np.float32), axis=1)[:, ::-1].copy()
    hs = []
    for _ in range(hessians):
        x = (rng.standard_normal((n, 2 * n)) * (np.arange(1, n + 1) ** -0.5)[:, None]).astype(np.float32)
        hs.append(x @ x.T / (2 * n))
    h = np.stack([hs[i % hessians] for i in range(b)]).astype(np.float32)
    bits = rng.choice([2, 3, 4, 8], (b, k)).astype(np.int32)
    return v, s, h, bits


def test_llama_block_rows_need_no_padding_on_8_devices():
    """7B-shaped block at 1/16 (q, k, v, o: 1168 rows of V from the truncated SVD; gate, up, down: 4096): every
    stack (q/k/v, o, gate/up, down) splits into 8 equal tiles; whole matrices padded to 8 were 20% useful."""
    stacks = {"qkv": (3, 1168), "o": (1, 1168), "gate/up": (2, 4096), "down": (1, 4096)}
    needed = computed_rows = computed_matrices = 0
    for b, k in stacks.values():
        plan = row_plan([list(range(b))], k, 8)
        assert useful_share(plan) == 1.0 and plan.rows.shape[0] == 8
        needed += b * k
        computed_rows += plan.rows.size
        computed_matrices += -(-b // 8) * 8 * k                        # run_sharded: B padded to 8 copies
    assert computed_rows == needed and needed / computed_matrices < 0.21
    for d in (1, 2, 4, 8):                                             # the same tiles on every device count
        assert row_plan([[0, 1, 2]], 1168, d).rows.shape == (8, 438)
    plan = row_plan([[0, 2], [1]], 5, 8)                               # two Hessians: tiles of their own
    assert plan.rows.shape == (ROW_TILES, 2) and plan.group.tolist() == [0] * 5 + [1] * 3
    assert plan.rows.reshape(-1)[plan.slot].tolist() == list(range(15))   # each needed row, once
    assert plan.first_tile.tolist() == [0, 5, 0] and useful_share(plan) == 15 / 16


def _outputs(path: str) -> None:
    """Writes GPTQ of V at per-row widths (two settings) and the error-table program, by rows and by whole
    matrices, on every device of this process."""
    mesh = Mesh(np.asarray(jax.devices()), ("batch",))
    res = {}
    for tag, cfg in (("act", CompressionConfig(group_size=32)),
                     ("plain", CompressionConfig(group_size=None, act_order=False))):
        kw = gptq_kw(cfg)
        v, _, h, bits = _stack(3, 37, 96, seed=1)
        damp = np.float32(0.01)
        res[f"{tag}-rows"] = run_rows_sharded(_v_gptq(**kw), mesh, (v, bits), (h,), damp, out_rows=GPTQ_ROWS)
        res[f"{tag}-matrices"] = run_sharded(_v_gptq_matrices(**kw), mesh, v, h, bits, damp)
    fn = _error_table_fn(widths=CFG.bits, **gptq_kw(CFG))
    v, s, h, _ = _stack(3, 40, 128, seed=2)
    r, d = stack_factors(h, factor_settings(CFG.damp, **gptq_kw(CFG)), mesh)
    res["table-rows"] = run_rows_sharded(fn, mesh, (v, s), (h, r, d), np.float32(CFG.damp), out_rows=TABLE_ROWS)
    res["table-matrices"] = run_sharded(fn, mesh, v, s, h, r, d, np.float32(CFG.damp))
    flat = {f"{k}/{i}": np.asarray(x) for k, r in res.items() for i, x in enumerate(jax.tree.leaves(r))}
    np.savez(path, **flat)


def test_rows_are_byte_identical_on_1_and_8_devices(child_runs):
    """GPTQ of V at per-row widths (the global scope's second pass) and the error-table program: by rows, the
    same bytes on 1 and 8 devices; the GPTQ passes also equal whole matrices' (run_sharded); the error table
    itself (a batched product) rounds with the batch, as whole matrices on 1 and 8 devices already do:
    within 1e-6 relative of them. (Not 2 or 4 devices: on this 2-core CPU, XLA hangs when several
    simulated devices each run a batch of more than one of these programs, with run_sharded too.)"""
    runs = child_runs["_outputs"]
    rows = {k for k in runs[8] if "-rows/" in k}
    table = "table-rows/0"
    for d in (1,):
        assert all(np.array_equal(runs[d][k], runs[8][k]) for k in rows if k != table)
        np.testing.assert_allclose(runs[d][table], runs[8][table], rtol=1e-6)
    for d in (8, 1):
        for k in rows:
            want = runs[d][k.replace("-rows/", "-matrices/")]
            if k == table:
                np.testing.assert_allclose(runs[d][k], want, rtol=1e-6)
            else:
                assert np.array_equal(runs[d][k], want), k
    assert runs[8]["act-rows/0"].shape == (3, 37, 96) and runs[8]["table-rows/0"].shape == (3, 40, len(CFG.bits))


# ----- the pipeline's GPTQ passes of V go by rows (methods.prinmix.allocation_tables, v_step.fixed_width_rows) ----
#: A Llama-2-7B block as the pipeline stacks it (same shape and same input Hessian, step_compress): B, m, n.
LLAMA_7B = {"q,k,v": (3, 4096, 4096), "o": (1, 4096, 4096), "gate,up": (2, 11008, 4096), "down": (1, 4096, 11008)}


def llama_block_shares(stacks=None, devices: int = 8, cfg: CompressionConfig | None = None) -> dict:
    """The useful share of the V passes' work (rows x n², a row's GPTQ cost) for a block's stacks (default
    :data:`LLAMA_7B`, each sharing one Hessian) at the pipeline's SVD rank (:func:`svd_rank` of
    :func:`max_kept_rank`, default config at 1/16): by rows (:func:`row_plan`) and by whole matrices padded to
    the device count (:func:`run_sharded`).

    Returns:
      ``{stack: {k, rows, matrices}, "block": {rows, matrices}}``.
    """
    cfg = cfg or CompressionConfig(ratio=1 / 16)
    out, tot = {}, np.zeros(3)
    for name, (b, m, n) in (stacks or LLAMA_7B).items():
        k = svd_rank(m, n, cfg, max_kept_rank(m, n, cfg)) or min(m, n)
        plan = row_plan([list(range(b))], k, devices)
        work = np.asarray([b * k, plan.rows.size, -(-b // devices) * devices * k], np.float64) * n * n
        out[name] = dict(k=k, rows=useful_share(plan), matrices=work[0] / work[2])
        tot += work
    out["block"] = dict(rows=tot[0] / tot[1], matrices=tot[0] / tot[2])
    return out


def test_llama_7b_block_at_the_pipeline_ranks_is_all_useful_on_8_devices():
    """The stacks of a 7B block the pipeline hands to the V passes at 1/16, with their truncated-SVD ranks: all
    of the row work is useful on 8 devices but the padding of a stack's rows to the device count (under one row
    per device: ≥ 99.5% at these ranks), against under a quarter by whole matrices (also with q, k, v and o in
    one stack)."""
    for stacks in (LLAMA_7B, {"q,k,v,o": (4, 4096, 4096), **{k: v for k, v in LLAMA_7B.items() if k in
                                                               ("gate,up", "down")}}):
        shares = llama_block_shares(stacks)
        for name, (b, _, _) in stacks.items():
            k = shares[name]["k"]
            assert shares[name]["rows"] == b * k / (-(-b * k // 8) * 8), shares   # padding < 1 row per device
        assert shares["block"]["rows"] >= 0.99, shares
        assert shares["block"]["matrices"] < 0.25, shares


def _entry_inputs():
    """Three 40 x 56 deltas, two sharing a Hessian (a q/k-like pair) and one with its own, and widths for them
    (the global scope's second pass)."""
    from prinmix_jax.synthetic import long_tailed_delta
    pairs = [long_tailed_delta(40, 56, seed=s) for s in (3, 4, 5)]
    deltas = [p[0] for p in pairs]
    hessians = [pairs[0][1], pairs[0][1], pairs[2][1]]
    widths = [np.where(np.arange(40) < 6, 4, np.where(np.arange(40) < 14 + i, 2, 0)) for i in range(3)]
    return deltas, hessians, widths


def _by_whole_matrices(fn, mesh, rows, shared, scalar=None, *, out_rows, axis="batch"):
    """:func:`run_rows_sharded`'s stand-in for the path before rows: ``vmap(fn)`` over whole matrices padded to
    the device count (:func:`run_sharded`), on the host."""
    return jax.tree.map(np.asarray, jax.device_get(run_sharded(fn, mesh, *rows, *shared, scalar, axis=axis)))


def _entry_outputs(path: str) -> None:
    """Writes what the entry points give on every device of this process (one mesh per process, as in a run),
    and how often they went through :func:`run_rows_sharded`: the error tables (:func:`error_tables`) of one
    delta and of the stack of three, and compress_stack of the three with prinmix (its own tables; given
    widths, the global scope's second pass; data-free) and with deltacome. With several devices, also the
    stack's tables by whole matrices (``run_sharded``, the path before rows)."""
    import prinmix_jax.core.mesh as mesh_mod
    from prinmix_jax import compress_stack, error_tables, to_state

    # the row path on simulated CPU devices (off in runs)
    rows_on_cpu, mesh_mod.ROWS_ON_CPU = mesh_mod.ROWS_ON_CPU, True
    calls = []
    inner = mesh_mod.run_rows_sharded

    def counted(*a, **kw):
        calls.append(a[0])
        return inner(*a, **kw)
    mesh_mod.run_rows_sharded = counted
    deltas, hessians, widths = _entry_inputs()
    cfg = CompressionConfig(group_size=16)
    res = {f"one/table/{i}": t for i, t in enumerate(error_tables(deltas[:1], hessians[:1], cfg))}
    res.update({f"three/table/{i}": t for i, t in enumerate(error_tables(deltas, hessians, cfg))})
    runs = {"prinmix": dict(method="prinmix"), "given": dict(method="prinmix", widths=widths),
            "free": dict(method="prinmix", hessians=None), "deltacome": dict(method="deltacome")}
    for tag, kw in runs.items():
        kw = dict(kw)
        h = kw.pop("hessians", hessians)
        for i, cm in enumerate(compress_stack(deltas, h, cfg, **kw)):
            arrays, meta = to_state(cm)
            assert meta["format"] == "SVDQuantDelta"
            res.update({f"three/{tag}/{i}/{k}": np.asarray(a) for k, a in arrays.items()})
    res["calls"] = np.asarray(len(calls))
    if jax.device_count() > 1:
        mesh_mod.run_rows_sharded = _by_whole_matrices
        res.update({f"matrices/table/{i}": t for i, t in enumerate(error_tables(deltas, hessians, cfg))})
    mesh_mod.run_rows_sharded, mesh_mod.ROWS_ON_CPU = inner, rows_on_cpu   # as found: a child runs more targets
    np.savez(path, **res)


#: The children compile at XLA's default optimisation level (at level 0 one error table differs between 1 and 8
#: devices in its last bits), with the suite's cheaper fusion emitters where conftest chose them (half the
#: compile time; the identities hold under both).
CHILD_XLA_FLAGS = "".join(f" {f}" for f in os.environ.get("XLA_FLAGS", "").split()
                          if f.startswith("--xla_cpu_use_fusion_emitters"))
#: What each child writes, one file per target: the row programs (:func:`_outputs`) and the entry points
#: (:func:`_entry_outputs`), in one process per device count (JAX starts once, and the two share programs).
TARGETS = ("_outputs", "_entry_outputs")


def _children(folder, targets=TARGETS, devices=(8, 1)) -> dict:
    """Each of ``targets`` (``target(path)`` of this module) in one child process per device count (simulated
    devices, set before JAX initialises; the children run side by side); returns ``{target: {devices: what it
    wrote}}``."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    procs = {}
    for d in devices:
        outs = {t: folder / f"{t}-d{d}.npz" for t in targets}
        calls = "; ".join(f"t.{t}({str(o)!r})" for t, o in outs.items())
        code = f"import sys; sys.path.insert(0, {os.path.dirname(__file__)!r}); import test_mesh_rows as t; {calls}"
        procs[d] = outs, subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True,
                                          env=dict(env, XLA_FLAGS=f"--xla_force_host_platform_device_count={d}"
                                                   + CHILD_XLA_FLAGS))
    res = {t: {} for t in targets}
    for d, (outs, p) in procs.items():
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
        for t, out in outs.items():
            with np.load(out, allow_pickle=False) as z:
                res[t][d] = dict(z)
    return res


@pytest.fixture(scope="module")
def child_runs(tmp_path_factory):
    """Both targets' outputs on 8 and on 1 device: ``{target: {devices: {name: array}}}``."""
    return _children(tmp_path_factory.mktemp("mesh-rows"))


def test_entry_points_by_rows_on_8_devices_match_1_device(child_runs):
    """error_tables and compress_stack (prinmix with its tables, with given widths, data-free; deltacome) on 8
    devices, where the V passes go by rows (every entry point calls run_rows_sharded once), against 1 device,
    where they go by whole matrices (run_sharded, the path before rows; no call): the compressed matrices are
    the same bytes, and so are one delta's error tables. The tables of the stack of three are the same bytes as
    whole matrices' on 8 devices; against 1 device they can differ by the SVD's last bits (XLA:CPU's products
    round with the threads each simulated device gets: 1-2 against 4-8 devices on a 2-core machine), within
    1e-4 relative."""
    runs = child_runs["_entry_outputs"]
    assert int(runs[8]["calls"]) == 6 and int(runs[1]["calls"]) == 0
    one, eight = runs[1], runs[8]
    assert eight.keys() - {"matrices/table/0", "matrices/table/1", "matrices/table/2"} == one.keys()
    nw = len(CompressionConfig(group_size=16).bits)
    for k in one:
        if k.startswith("three/table/"):
            assert eight[k].shape == (40, nw) and np.array_equal(eight[k], eight[k.replace("three", "matrices")]), k
            np.testing.assert_allclose(eight[k], one[k], rtol=1e-4, err_msg=k)
        elif k != "calls":
            assert eight[k].dtype == one[k].dtype and np.array_equal(eight[k], one[k]), k
    tags = {tuple(k.split("/")[:2]) for k in one}
    assert tags == {("one", "table"), ("three", "table"), ("three", "prinmix"), ("three", "given"),
                    ("three", "free"), ("three", "deltacome"), ("calls",)}


def test_pipeline_row_axes_match_the_programs():
    """The row axes the pipeline declares are those of its programs' outputs: the error table (e by row; the
    passes (nnz, k, ...) by row at axis 1, their damping per Hessian) and GPTQ of V (by row, damping per
    Hessian)."""
    assert PIPELINE_TABLE_ROWS == TABLE_ROWS and V_ROWS == GPTQ_ROWS


def test_cpu_devices_keep_whole_matrices_unless_asked(monkeypatch):
    """On simulated CPU devices (this process has 8) the V passes go by whole matrices: tiles buy nothing on
    shared cores, and XLA:CPU's shard_map hung once in CI there (mesh.ROWS_ON_CPU)."""
    import prinmix_jax.core.mesh as mesh_mod
    from prinmix_jax import error_tables

    assert jax.device_count() > 1 and not mesh_mod.ROWS_ON_CPU

    def refuse(*a, **kw):
        raise AssertionError("run_rows_sharded called on CPU devices")
    monkeypatch.setattr(mesh_mod, "run_rows_sharded", refuse)
    d = np.random.default_rng(0).standard_normal((32, 48)).astype(np.float32)
    assert error_tables([d], None, CompressionConfig(group_size=16))[0].shape[0] == 32
