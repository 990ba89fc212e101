"""Lean index metadata (issue 12, delta format version 3): no width byte per index, single-group scales folded
into σ, no zero points on the symmetric widths 1–2 (grid ``"mse-sym"``). Checked against the byte formula,
against the full layout at the same widths, through storage, and by the error it buys at a fixed budget."""
from __future__ import annotations

import jax
import numpy as np
import pytest

from prinmix_jax import CompressionConfig, compress_matrix, compress_stack, from_state, to_state
from prinmix_jax.core.quantizer import HALF_ZERO_MAX_BITS, grid_params
from prinmix_jax.costs import index_cost_bits
from prinmix_jax.methods.shared import index_costs
from prinmix_jax.storage import decode_step, encode_step
from prinmix_jax.storage.format import MatrixEntry
from prinmix_jax.synthetic import long_tailed_delta

#: grid_params as the core calls it, inside a compiled program (one compile per shape; op by op, each call of
#: a new shape took ~2.5 s on the 2-core CPU).
_grid = jax.jit(grid_params, static_argnames=("scale_dtype", "grid"))


def test_cost_formula_counts_what_each_layout_stores():
    """96×96, one group per vector: full = codes + 2·(16-bit scale + 8-bit zero) + 32-bit σ + 8-bit width;
    lean = codes + σ at widths 1–2, + the two zeros at ≥ 3. Two groups per vector keep their scales."""
    full = index_cost_bits(96, 96, (0, 2, 3), 128)
    lean = index_cost_bits(96, 96, (0, 2, 3), 128, lean=True, zero_free_max_bits=2)
    assert full.tolist() == [0, 2 * 192 + 2 * 24 + 32 + 8, 3 * 192 + 2 * 24 + 32 + 8]
    assert lean.tolist() == [0, 2 * 192 + 32, 3 * 192 + 32 + 2 * 8]
    two = index_cost_bits(96, 96, (2,), 48, lean=True, zero_free_max_bits=2)     # 2 groups of each vector
    assert two.tolist() == [2 * 192 + 32 + 2 * 2 * 16]
    assert index_costs(96, 96, CompressionConfig(bits=(0, 2, 3))).tolist() == lean.tolist()
    assert index_costs(96, 96, CompressionConfig(bits=(0, 2, 3), index_metadata="full")).tolist() == full.tolist()
    # the min-max grid has zero points at every width: lean then drops only the width byte and the scales
    mm = index_costs(96, 96, CompressionConfig(bits=(0, 2), grid="minmax"))
    assert mm.tolist() == [0, 2 * 192 + 32 + 2 * 8]


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_symmetric_grid_has_implied_zeros_and_matches_mse_above_two_bits(bits):
    rng = np.random.default_rng(bits)
    x = rng.standard_normal((64, 96)).astype(np.float32)
    x[:8] += 1.5                                         # skewed rows, where min-max grids would win
    maxq = np.float32(2 ** bits - 1)
    s_sym, z_sym = (np.asarray(a) for a in _grid(x, maxq, grid="mse-sym"))
    s_mse, z_mse = (np.asarray(a) for a in _grid(x, maxq, grid="mse"))
    if bits <= HALF_ZERO_MAX_BITS:
        np.testing.assert_array_equal(z_sym, maxq / 2)
        assert bits == 1 or np.any(z_mse != maxq / 2)    # "mse" takes a min-max grid somewhere
    else:
        np.testing.assert_array_equal(s_sym, s_mse)
        np.testing.assert_array_equal(z_sym, z_mse)


@pytest.mark.parametrize("scale_dtype", [None, np.float16])
def test_symmetric_grid_of_mixed_widths_chooses_each_group_as_alone(scale_dtype):
    """``"mse-sym"`` tries one family per group (symmetric at widths <= 2, min-max above), in one list of
    candidates whose i-th is either family's i-th: a group's grid must not depend on its neighbours' widths, so
    a call with mixed widths (U's columns in GPTQ, a V step's rows) chooses every group as a call of its width
    alone does (and those are checked against "mse" and the implied zeros above). Each width's call holds every
    group at that width (one program for all calls); only the groups of that width in the mixed call are
    compared."""
    rng = np.random.default_rng(7)
    x = (rng.standard_normal((400, 128)) * rng.choice([1e-3, 1.0, 30.0], (400, 1))).astype(np.float32)
    x[::9] += 1.5                                         # skewed groups
    x[::13] = np.round(x[::13] * 2) / 2                   # ties between candidates
    widths = rng.choice([1, 2, 3, 4, 8], 400)
    maxq = (2.0 ** widths - 1).astype(np.float32)
    count = rng.integers(100, 129, 400).astype(np.float32)      # short last groups
    s_mix, z_mix = (np.asarray(a) for a in _grid(x, maxq, scale_dtype, count, "mse-sym"))
    for b in (1, 2, 3, 4, 8):
        rows = widths == b
        s_b, z_b = (np.asarray(a)[rows] for a in _grid(x, np.full(400, 2 ** b - 1, np.float32), scale_dtype,
                                                        count, "mse-sym"))
        np.testing.assert_array_equal(s_mix[rows], s_b)
        np.testing.assert_array_equal(z_mix[rows], z_b)
        if b <= HALF_ZERO_MAX_BITS:
            np.testing.assert_array_equal(z_b, (2 ** b - 1) / 2)
        else:
            np.testing.assert_array_equal(z_b, np.round(z_b))


def test_lean_layout_stores_the_same_values_at_the_same_widths():
    """Same widths and grid (min-max, so the codes are identical): the lean matrix rebuilds the same delta to
    float32 rounding (σ holds the folded scales) and stores fewer bytes; both survive a storage round trip."""
    d, h = long_tailed_delta(96, 128, seed=5)
    widths = [np.where(np.arange(96) < 6, 3, np.where(np.arange(96) < 20, 2, 0))]
    cms = {}
    for md in ("lean", "full"):
        cfg = CompressionConfig(ratio=1 / 8, grid="minmax", index_metadata=md)
        (cms[md],) = compress_stack([d], [h], cfg, widths=widths)
    lean, full = cms["lean"], cms["full"]
    np.testing.assert_allclose(np.asarray(lean.reconstruct()), np.asarray(full.reconstruct()), rtol=0,
                               atol=1e-6 * float(np.abs(np.asarray(full.reconstruct())).max()))
    saved = 20 * 1 + 20 * 2 * 2          # per index: the width byte, two fp16 scales (one group per vector)
    assert full.nbytes - lean.nbytes == saved
    for cm in (lean, full):
        arrays, meta = encode_step({"q_proj": MatrixEntry(cm, {})}, {})
        back = decode_step(arrays, meta).linears["q_proj"]
        assert back.nbytes == cm.nbytes and back.lean == cm.lean
        np.testing.assert_array_equal(np.asarray(back.reconstruct()), np.asarray(cm.reconstruct()))
        np.testing.assert_array_equal(np.asarray(back.widths), np.asarray(cm.widths))


def test_default_lean_matrix_round_trips_through_storage():
    """The default (lean, symmetric 1–2-bit grids) at 1/32: the implied zeros, scales and widths are rebuilt
    exactly on read."""
    d, h = long_tailed_delta(96, 128, seed=8)
    cm = compress_matrix(d, h, CompressionConfig(ratio=1 / 32))
    assert cm.lean and {1, 2} & set(cm.group_bits)
    arrays, meta = encode_step({"q_proj": MatrixEntry(cm, {})}, {})
    assert not any(k.startswith(("widths", "u_scale", "v_scale")) for k in arrays["linears"]["q_proj"])
    back = decode_step(arrays, meta).linears["q_proj"]
    assert back.nbytes == cm.nbytes
    np.testing.assert_array_equal(np.asarray(back.reconstruct()), np.asarray(cm.reconstruct()))
    np.testing.assert_array_equal(np.asarray(back.widths), np.asarray(cm.widths))
    for f in ("u_scale", "v_scale", "u_zero", "v_zero"):
        for x, y in zip(getattr(back, f), getattr(cm, f)):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_matrices_written_before_lean_metadata_still_read():
    """A format-2 matrix's metadata has no ``lean`` / ``zero_free_max_bits``: it reads as the full layout."""
    d, h = long_tailed_delta(64, 96, seed=6)
    cm = compress_matrix(d, h, CompressionConfig(index_metadata="full"))
    arrays, meta = to_state(cm)
    old = {k: v for k, v in meta.items() if k not in ("lean", "zero_free_max_bits")}
    back = from_state(arrays, old)
    assert not back.lean and back.nbytes == cm.nbytes
    np.testing.assert_array_equal(np.asarray(back.reconstruct()), np.asarray(cm.reconstruct()))
    lean_arrays, lean_meta = to_state(compress_matrix(d, h, CompressionConfig()))
    with pytest.raises(ValueError, match="lacks arrays"):        # a lean state read as full misses leaves
        from_state(lean_arrays, {k: v for k, v in lean_meta.items() if k != "lean"})


@pytest.mark.parametrize("shape,group", [((96, 96), 128), ((256, 96), 128), ((200, 300), 64)])
def test_lean_metadata_lowers_the_error_at_the_same_budget(shape, group):
    """What the saved bytes buy: more kept indices within the same budget, hence a lower output error, at
    1/32 on small long-tailed deltas (where the metadata is a large share of an index)."""
    d, h = long_tailed_delta(*shape, seed=7)
    res = {}
    for md in ("lean", "full"):
        cfg = CompressionConfig(ratio=1 / 32, group_size=group, index_metadata=md)
        cm, info = compress_matrix(d, h, cfg, return_info=True)
        assert cm.nbytes <= cfg.budget_bits(*shape) // 8
        res[md] = (info["rel_output_error"], cm.rank)
    assert res["lean"][0] < res["full"][0]
    assert res["lean"][1] >= res["full"][1]


def test_bad_lean_state_is_refused_when_packed():
    """Lean storage drops the zero points of widths 1–2: a zero off the symmetric grid there is an error,
    never silently lost."""
    from prinmix_jax.compress import pack_svd
    from prinmix_jax.core.gptq import GPTQResult

    cfg = CompressionConfig(bits=(0, 2))
    res = GPTQResult(None, np.zeros((2, 8), np.uint8), np.ones((2, 1)), np.zeros((2, 1)), None)   # zero 0, not 1.5
    with pytest.raises(AssertionError, match="symmetric"):
        pack_svd((8, 8), np.ones(2), np.full(2, 2), res, res._replace(codes=np.zeros((8, 2), np.uint8)), cfg, "prinmix")
