"""Compressed-matrix forms: ``factors`` and ``reconstruct`` give the stored values (a float64 oracle from the
codes), the same bytes on the host and under ``jit``, and cost one compiled program per matrix however its
width groups are sized (unpacking on the host; op by op in JAX it was some 60 per matrix)."""
import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src import monitoring

from prinmix_jax.core.packing import pack_bits, unpack_bits
from prinmix_jax.formats import LowRankDelta, SignDelta, SVDQuantDelta


def _per_entry(a, group_size, length):
    return np.repeat(a, group_size, axis=1)[:, :length]


def _svd_delta(m, n, counts, bits=(1, 2, 3, 8), group_size=16, seed=0):
    """A random :class:`SVDQuantDelta` and its float64 oracle factors (codes, scales and zeros known)."""
    rng = np.random.default_rng(seed)
    f = {k: [] for k in ("sigma", "v_codes", "v_scale", "v_zero", "u_codes", "u_scale", "u_zero")}
    oracle = {"u": [], "v": [], "s": []}
    for b, k in zip(bits, counts):
        sig = rng.random(k).astype(np.float32)
        f["sigma"].append(jnp.asarray(sig))
        oracle["s"].append(sig.astype(np.float64))
        for side, length in (("v", n), ("u", m)):
            ng = -(-length // group_size)
            q = rng.integers(0, 2 ** b, (k, length), dtype=np.uint8)
            scale = (rng.random((k, ng)) + 0.5).astype(np.float16)
            zero = rng.integers(0, 2 ** b, (k, ng), dtype=np.uint8)
            f[f"{side}_codes"].append(jnp.asarray(pack_bits(q, b)))
            f[f"{side}_scale"].append(jnp.asarray(scale))
            f[f"{side}_zero"].append(jnp.asarray(zero))
            z = zero.astype(np.float64) / (2 if b <= 2 else 1)          # stored in half steps up to 2 bits
            oracle[side].append(_per_entry(scale.astype(np.float64), group_size, length)
                                * (q - _per_entry(z, group_size, length)))
    widths = np.concatenate([np.full(k, b, np.uint8) for b, k in zip(bits, counts)])
    cm = SVDQuantDelta(**{k: tuple(v) for k, v in f.items()}, widths=jnp.asarray(widths), shape=(m, n),
                       group_bits=tuple(bits), group_size=group_size)
    u, s, v = (np.concatenate(oracle[x]) for x in ("u", "s", "v"))
    return cm, (u.T, s, v)


@pytest.mark.parametrize("shape", [(40, 24), (24, 70)])
def test_factors_and_reconstruction_are_the_stored_values_on_host_and_under_jit(shape):
    cm, (u, s, v) = _svd_delta(*shape, counts=(3, 5, 2, 1))
    host = [np.asarray(a) for a in cm.factors()]
    traced = [np.asarray(a) for a in jax.jit(lambda c: c.factors())(cm)]
    for a, b, want in zip(host, traced, (u, s, v)):
        assert a.dtype == np.float32
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, want.astype(np.float32))    # one rounding of an exact product
    rec = np.asarray(cm.reconstruct())
    assert rec.shape == shape and rec.dtype == np.float32
    np.testing.assert_allclose(rec, (u * s) @ v, rtol=1e-5, atol=1e-5 * np.abs((u * s) @ v).max())
    np.testing.assert_array_equal(rec, np.asarray(jax.jit(lambda c: c.reconstruct())(cm)))


def test_empty_low_rank_and_sign_forms_reconstruct():
    empty = SVDQuantDelta(sigma=(), widths=jnp.zeros((0,), jnp.uint8), v_codes=(), v_scale=(), v_zero=(),
                          u_codes=(), u_scale=(), u_zero=(), shape=(6, 9), group_bits=(), group_size=4)
    assert [a.shape for a in empty.factors()] == [(6, 0), (0,), (0, 9)]
    np.testing.assert_array_equal(np.asarray(empty.reconstruct()), np.zeros((6, 9), np.float32))
    rng = np.random.default_rng(1)
    us, v = rng.standard_normal((3, 10)).astype(np.float16), rng.standard_normal((3, 7)).astype(np.float16)
    low = LowRankDelta(us=jnp.asarray(us), v=jnp.asarray(v), shape=(10, 7))
    np.testing.assert_allclose(np.asarray(low.reconstruct()), us.astype(np.float64).T @ v.astype(np.float64),
                               rtol=1e-5, atol=1e-5)
    d = rng.standard_normal((5, 13))
    signs = pack_bits((d >= 0).astype(np.uint8), 1)
    sign = SignDelta(signs=jnp.asarray(signs), scale=jnp.asarray([0.25], jnp.float32), shape=(5, 13))
    want = np.where(d >= 0, 0.25, -0.25).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(sign.reconstruct()), want)
    np.testing.assert_array_equal(np.asarray(jax.jit(lambda c: c.reconstruct())(sign)), want)


@contextlib.contextmanager
def programs_lowered():
    """Counts the programs JAX lowers inside the block (every program, whether the compile cache has it or not):
    ``with programs_lowered() as n: ...; n[0]``."""
    n = [0]

    def count(event, duration, **kw):
        if event == "/jax/core/compile/jaxpr_to_mlir_module_duration":
            n[0] += 1

    monitoring.register_event_duration_secs_listener(count)
    try:
        yield n
    finally:
        monitoring.unregister_event_duration_listener(count)


def test_reconstruction_compiles_one_program_per_matrix_whatever_its_groups():
    # row counts no other test uses, so no program of theirs is already in this process' caches
    mats = [_svd_delta(56, 40, counts=(7 + i, 11 + 2 * i, 5 + i, 3), seed=i)[0] for i in range(3)]
    per_matrix = []
    for cm in mats:
        with programs_lowered() as n:
            np.asarray(cm.reconstruct())
        per_matrix.append(n[0])
    assert per_matrix == [1, 1, 1], per_matrix


@pytest.mark.parametrize("word_bits", [8, 32])
def test_jax_packing_is_one_program_per_shape(word_bits):
    codes = np.random.default_rng(2).integers(0, 8, (3, 37 + word_bits), dtype=np.uint8)
    x = jnp.asarray(codes)
    with programs_lowered() as n:
        words = pack_bits(x, 3, word_bits)
        back = unpack_bits(words, 3, codes.shape[1], word_bits)
    assert n[0] == 2, n[0]
    np.testing.assert_array_equal(np.asarray(words), pack_bits(codes, 3, word_bits))
    np.testing.assert_array_equal(np.asarray(back), codes)


def test_arrays_that_disagree_with_the_metadata_are_refused():
    """``from_state`` (every matrix read from a checkpoint) checks each array's shape against the shape,
    widths and group size recorded: a scale of the wrong group count, codes of the wrong width, a σ of the
    wrong length or a widths vector of the wrong length are refused, naming the array; so is a scale count
    that reaches the host dequantisation directly."""
    from prinmix_jax.formats import dequant_codes, from_state, to_state

    cm, _ = _svd_delta(40, 24, counts=(3, 5, 2, 1))
    arrays, meta = to_state(cm)
    again = from_state(arrays, meta)
    np.testing.assert_array_equal(np.asarray(again.reconstruct()), np.asarray(cm.reconstruct()))
    cases = {"v_scale_3": (lambda a: a[:, :1], "v_scale_3"), "u_zero_8": (lambda a: np.concatenate([a, a], 1),
             "u_zero_8"), "u_codes_2": (lambda a: a[:, :-1], "u_codes_2"),
             "sigma_1": (lambda a: a[:-1], "v_codes_1")}      # σ gives the row count: the codes disagree
    for key, (edit, named) in cases.items():
        bad = {**arrays, key: edit(np.asarray(arrays[key]))}
        with pytest.raises(ValueError, match=rf"{named} has shape"):
            from_state(bad, meta)
    with pytest.raises(ValueError, match="widths has shape"):
        from_state({**arrays, "widths": np.asarray(arrays["widths"])[:-1]}, meta)
    with pytest.raises(ValueError, match="groups of 8 implies"):
        from_state(arrays, {**meta, "group_size": 8})
    q = np.zeros((2, 24), np.float32)
    with pytest.raises(ValueError, match="2 groups"):
        dequant_codes(q, np.ones((2, 3), np.float16), np.zeros((2, 3), np.uint8), 2, 16)


@pytest.mark.parametrize("m, group_size, step, limit", [(100, 16, 16, "rows"), (100, 24, 24, "rows"),
                                                        (100, 1000, 16, "rows"), (37, 16, 16, "rows"),
                                                        (100, 16, 16, "bytes")])
def test_row_blocks_are_reconstruct_by_rows(monkeypatch, m, group_size, step, limit):
    """A matrix is reconstructed on the host a block of rows at a time (what apply adds into a base: a
    128256-row embedding's Û and product are never whole). Blocks start on packed words and scale groups
    (16 rows asked, by a row limit or by float32 bytes: 24 with groups of 24); each product gets only its
    block of Û, which is the oracle's rows exactly; each block is the oracle's product within float32
    rounding; reconstruct() is the blocks' bytes."""
    import prinmix_jax.formats as F

    cm, (u, s, v) = _svd_delta(m, 40, counts=(3, 5, 2, 1), group_size=group_size)
    monkeypatch.setattr(F, *(("RECONSTRUCT_ROWS", 16) if limit == "rows" else ("RECONSTRUCT_BYTES", 16 * 40 * 4 + 100)))
    us, inner = [], F._scaled_product

    def spy(uu, ss, vv):
        us.append(np.asarray(uu))
        return inner(uu, ss, vv)
    monkeypatch.setattr(F, "_scaled_product", spy)
    blocks = list(cm.row_blocks())
    assert [(a, z) for a, z, _ in blocks] == [(a, min(a + step, m)) for a in range(0, m, step)]
    want = (u * s) @ v
    for (a, z, blk), uu in zip(blocks, us, strict=True):
        assert blk.dtype == np.float32 and blk.shape == (z - a, 40)
        np.testing.assert_array_equal(uu, u[a:z].astype(np.float32))
        np.testing.assert_allclose(blk, want[a:z], rtol=1e-5, atol=1e-5 * np.abs(want).max())
    np.testing.assert_array_equal(np.asarray(cm.reconstruct()), np.concatenate([b for _, _, b in blocks]))
    monkeypatch.setattr(F, "_scaled_product", inner)
    np.testing.assert_allclose(np.asarray(jax.jit(lambda c: c.reconstruct())(cm)), want, rtol=1e-5,
                               atol=1e-5 * np.abs(want).max())


def test_low_rank_and_sign_row_blocks_are_reconstruct_by_rows(monkeypatch):
    import prinmix_jax.formats as F

    rng = np.random.default_rng(4)
    us, v = rng.standard_normal((5, 50)).astype(np.float16), rng.standard_normal((5, 9)).astype(np.float16)
    low = LowRankDelta(us=jnp.asarray(us), v=jnp.asarray(v), shape=(50, 9))
    bits = rng.integers(0, 2, (50, 9)).astype(np.uint8)
    sign = SignDelta(signs=jnp.asarray(pack_bits(bits, 1)), scale=jnp.asarray([0.25], np.float32), shape=(50, 9))
    wants = (us.astype(np.float64).T @ v.astype(np.float64), 0.25 * (2.0 * bits - 1))
    monkeypatch.setattr(F, "RECONSTRUCT_ROWS", 16)
    for cm, want in zip((low, sign), wants):
        blocks = list(cm.row_blocks())
        assert [(a, z) for a, z, _ in blocks] == [(0, 16), (16, 32), (32, 48), (48, 50)]
        got = np.concatenate([b for _, _, b in blocks])
        np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3)
        np.testing.assert_array_equal(np.asarray(cm.reconstruct()), got)
