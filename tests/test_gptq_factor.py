"""GPTQ's set-up computed once per Hessian (core.gptq.gptq_factor, core.factors) and shared by the passes under
it: the same bytes as a pass that computes its own, one set-up per distinct Hessian of a stack, and a window's
prefetched set-ups taken instead of computed."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import prinmix_jax.core.factors as factors
from prinmix_jax.config import CompressionConfig
from prinmix_jax.core.error_table import error_table
from prinmix_jax.core.gptq import GPTQFactor, gptq_factor, gptq_quantize, gptq_quantize_with_error
from prinmix_jax.methods.shared import gptq_kw


#: The suite compiles with XLA:CPU's older elemental emitters (tests/conftest.py: half the compile time). Under
#: them a pass given its set-up and one that factors its own Hessian fuse differently, and their float outputs
#: (dequantised values, scales) differ by 1-4 ulps in a few cases; the codes stay equal. With XLA's default
#: emitters (what users run; ``PRINMIX_TEST_XLA_OPT=default``) they are the same bytes.
LEGACY_EMITTERS = "--xla_cpu_use_fusion_emitters=false" in os.environ.get("XLA_FLAGS", "")


def _same(a, b):
    a, b = np.asarray(a), np.asarray(b)
    assert a.dtype == b.dtype and a.shape == b.shape
    if LEGACY_EMITTERS and a.dtype.kind == "f":
        np.testing.assert_array_max_ulp(a, b, maxulp=8)
    else:
        np.testing.assert_array_equal(a, b)


def _hessian(n, seed, dead=(), indefinite=False):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 2 * n)) * np.linspace(0.3, 2, n)[:, None]
    h = (x @ x.T / (2 * n)).astype(np.float32)
    for j in dead:
        h[j, :] = h[:, j] = 0.0
    if indefinite:
        h -= 3.0 * np.eye(n, dtype=np.float32)
    return h


# (mode, group, act_order, block): one loop and four segments (>= 16 blocks), fixed and dynamic groups, U side
CASES = [("row", 16, True, 32), ("row", 32, False, 16), ("row", None, True, 16), ("row", 16, False, 8),
         ("col", 16, False, 32), ("col", 8, True, 16)]


@pytest.mark.parametrize("mode,group,act,block", CASES)
def test_a_pass_given_the_set_up_is_the_same_bytes(mode, group, act, block):
    """gptq_quantize with ``factor=gptq_factor(h, ...)`` equals the pass that factors ``h`` itself, array for
    array, with a dead column and on an indefinite Hessian (escalated damping); so do the row errors of
    gptq_quantize_with_error."""
    n, rows = 300, 24
    rng = np.random.default_rng(1)
    for h in (_hessian(n, 2, dead=(3, 200)), _hessian(n, 3, indefinite=True)):
        w = rng.standard_normal((rows, n)).astype(np.float32)
        bits = rng.integers(1, 5, rows if mode == "row" else n).astype(np.int32)
        kw = dict(group_size=group, act_order=act, block_size=block, scale_axis=mode)
        f = gptq_factor(h, 0.01, rows=rows, **kw)
        own, given = gptq_quantize(w, h, bits, 0.01, **kw), gptq_quantize(w, h, bits, 0.01, factor=f, **kw)
        for a, b in zip(own, given):
            _same(a, b)
        if mode == "row":
            kw.pop("scale_axis")
            (_, e_own), (_, e_given) = (gptq_quantize_with_error(w, h, bits, 0.01, factor=ff, **kw)
                                        for ff in (None, f))
            _same(e_own, e_given)
    assert float(f.damp) > 0.01                                       # the indefinite one escalated


def test_error_table_given_the_set_up_is_the_same_bytes():
    cfg = CompressionConfig(group_size=32)
    kw = dict(widths=cfg.bits, **gptq_kw(cfg))
    rng = np.random.default_rng(4)
    n = 160
    v = rng.standard_normal((30, n)).astype(np.float32)
    s = np.sort(rng.random(30).astype(np.float32))[::-1].copy()
    h = _hessian(n, 5)
    f = gptq_factor(h, cfg.damp, group_size=cfg.group_size, act_order=cfg.act_order, block_size=cfg.block_size)
    own, given = error_table(v, s, h, cfg.damp, **kw), error_table(v, s, h, cfg.damp, f, **kw)
    for a, b in zip(jax.tree.leaves(own), jax.tree.leaves(given)):
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_a_set_up_of_other_settings_is_refused():
    """A set-up made for another block layout or dtype does not fit the pass's loop: a clear error, not a
    silently wrong result."""
    h = _hessian(64, 6)
    w = np.ones((4, 64), np.float32)
    f = gptq_factor(h, 0.01, group_size=16, block_size=16)
    with pytest.raises(ValueError, match="gptq_factor"):
        gptq_quantize(w, h, np.full(4, 3), 0.01, group_size=16, block_size=48, factor=f)   # blocks of 48: cp 96
    with pytest.raises(ValueError, match="gptq_factor"):
        gptq_quantize(w, h, np.full(4, 3), 0.01, group_size=16, block_size=16,
                      factor=GPTQFactor(jnp.asarray(f.r, jnp.float16), f.damp))


def test_the_row_pass_given_the_set_up_holds_no_n2_scratch():
    """Given the set-up, a pass holds only its (rows × n) and (block × n) buffers: below 0.5 n² of scratch (its
    own set-up holds ~2 n²: tests/test_gptq_memory.py)."""
    n, rows = 1024, 64
    spec = jax.ShapeDtypeStruct
    f = GPTQFactor(spec((n, n), jnp.float32), spec((), jnp.float32))
    comp = gptq_quantize.lower(spec((rows, n), jnp.float32), spec((n, n), jnp.float32), spec((rows,), jnp.int32),
                               0.01, group_size=128, act_order=True, factor=f).compile()
    assert comp.memory_analysis().temp_size_in_bytes < 0.5 * 4 * n * n


def _count_starts(monkeypatch) -> list:
    """How many set-ups each call of factors.start_factors starts, from here on."""
    started, real = [], factors.start_factors

    def counted(hessians, *a, **kw):
        started.append(len(hessians))
        return real(hessians, *a, **kw)
    monkeypatch.setattr(factors, "start_factors", counted)
    return started


def _stack(b, n, hessians, seed=7):
    hs = [_hessian(n, seed + 10 + i) for i in range(hessians)]
    return np.stack([hs[i % hessians] for i in range(b)])


def test_a_stack_factors_each_distinct_hessian_once(monkeypatch):
    """Three matrices sharing a Hessian (q, k, v) start one set-up, a stack of two Hessians two; every matrix
    gets its own Hessian's factor, the same bytes as gptq_factor of it."""
    started = _count_starts(monkeypatch)
    s = factors.factor_settings(0.01, group_size=16, act_order=True, block_size=32)
    for b, nh in ((3, 1), (3, 2)):
        h_all = _stack(b, 96, nh)
        r, d = factors.stack_factors(h_all, s)
        assert r.shape == (b, 96, 96) and d.shape == (b,)
        for i in range(b):
            f = gptq_factor(h_all[i], np.float32(0.01), group_size=16, act_order=True, block_size=32)
            assert np.array_equal(r[i], np.asarray(f.r)) and d[i] == float(f.damp)
    assert started == [1, 2]


def test_prefetched_set_ups_are_taken_not_computed(monkeypatch):
    """Inside using_prefetched_factors, a stack whose Hessians were prefetched (under the same settings) starts
    no set-up and gets the same bytes; a Hessian of other bytes or other settings is still computed. Each
    prefetched factor serves as many stacks as asked for it (``h0`` twice), then is dropped (its device memory
    freed) and a later stack computes its own."""
    started = _count_starts(monkeypatch)
    s = factors.factor_settings(0.01, group_size=16, act_order=True, block_size=32)
    h_all = _stack(3, 96, 2)
    h0, h1 = h_all[0], h_all[1]
    want = factors.stack_factors(h_all, s)
    pre = factors.prefetch_factors([h0, h1, h0.copy()], s)               # equal bytes are factored once
    assert started == [2, 2] and [p.uses for p in pre] == [2, 1]
    with factors.using_prefetched_factors(pre):
        got = factors.stack_factors(h_all, s)                            # one use of each
        assert started == [2, 2] and pre[1].factor is None
        factors.stack_factors(_hessian(96, 99)[None], s)                 # other bytes
        factors.stack_factors(h0[None], s._replace(damp=0.1))            # other settings
        assert started == [2, 2, 1, 1]
        assert np.array_equal(factors.stack_factors(h0[None], s)[0][0], want[0][0])   # h0's second use
        assert started == [2, 2, 1, 1] and pre[0].factor is None
        factors.stack_factors(h1[None], s)                               # used up: computed
        assert started == [2, 2, 1, 1, 1]
    assert all(np.array_equal(a, b) for a, b in zip(want, got))
    factors.stack_factors(h0[None], s)                                   # outside the block: computed
    assert started == [2, 2, 1, 1, 1, 1]


def test_same_bytes_compares_bytes():
    from prinmix_jax.core.mesh import same_bytes
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    assert same_bytes(a, a.copy()) and same_bytes(np.broadcast_to(a[0], (3, 4)), np.stack([a[0]] * 3))
    assert not same_bytes(a, a.astype(np.float64)) and not same_bytes(a, a.reshape(4, 3))
    b = a.copy()
    b[2, 3] = -b[2, 3]
    assert not same_bytes(a, b)
    z = np.zeros(3, np.float32)
    assert not same_bytes(z, -z)                                         # equal values, other bytes
    n = np.full(3, np.nan, np.float32)
    assert same_bytes(n, n.copy())                                       # the same bytes, unequal values
