"""Issue 14 item 3: run_rows_sharded spreads the rows of a stack over the devices (GPTQ's error feedback
stays in a row, the Hessian is shared), so that no device computes padding copies for a Llama block, with
results that do not depend on the device count."""
import functools
import os
import subprocess
import sys

import jax
import numpy as np
from jax.sharding import Mesh

from prinmix_jax.config import CompressionConfig
from prinmix_jax.core.gptq import GPTQResult, gptq_quantize
from prinmix_jax.core.mesh import ROW_TILES, row_plan, run_rows_sharded, run_sharded, useful_share
from prinmix_jax.methods.prinmix import _error_table_fn
from prinmix_jax.methods.shared import gptq_kw

CFG = CompressionConfig(group_size=32)
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


def _child_outputs(tmp_path, devices: int) -> dict:
    """The row-sharded and whole-matrix results of :func:`_outputs` in a child process with ``devices``
    devices (one mesh per process, as in a run)."""
    out = tmp_path / f"d{devices}.npz"
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    code = f"import sys; sys.path.insert(0, {os.path.dirname(__file__)!r}); import test_mesh_rows as t; " \
           f"t._outputs({str(out)!r})"
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    with np.load(out, allow_pickle=False) as z:
        return dict(z)


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
    res["table-rows"] = run_rows_sharded(fn, mesh, (v, s), (h,), np.float32(CFG.damp), out_rows=TABLE_ROWS)
    res["table-matrices"] = run_sharded(fn, mesh, v, s, h, np.float32(CFG.damp))
    flat = {f"{k}/{i}": np.asarray(x) for k, r in res.items() for i, x in enumerate(jax.tree.leaves(r))}
    np.savez(path, **flat)


def test_rows_are_byte_identical_on_1_and_8_devices(tmp_path):
    """GPTQ of V at per-row widths (the global scope's second pass) and the error-table program: by rows, the
    same bytes on 1 and 8 devices; the GPTQ passes also equal whole matrices' (run_sharded); the error table
    itself (a batched product) rounds with the batch, as whole matrices on 1 and 8 devices already do:
    within 1e-6 relative of them. (Not 2 or 4 devices: on this 2-core CPU, XLA hangs when several
    simulated devices each run a batch of more than one of these programs, with run_sharded too.)"""
    runs = {d: _child_outputs(tmp_path, d) for d in (8, 1)}
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
