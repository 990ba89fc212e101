"""Host memory of big matrices (a 7B model's 128256×4096 embedding is 2.1 GB in float32): no needless copies
of a delta on its way to the SVD, and float64 sums over a whole matrix done by blocks, with the same numbers."""
import numpy as np
import pytest

import prinmix_jax.methods.shared as shared
from prinmix_jax import CompressionConfig
from prinmix_jax.compress import _prepare
from prinmix_jax.methods.base import Stack


def test_squared_norm64_by_row_blocks(monkeypatch):
    rng = np.random.default_rng(0)
    a = rng.standard_normal((101, 7)).astype(np.float32)
    want = float(np.sum(np.square(a, dtype=np.float64)))
    assert shared.squared_norm64(a) == want                      # one block: the same number
    monkeypatch.setattr(shared, "SQUARE_CHUNK", 7 * 10)         # 11 blocks
    assert shared.squared_norm64(a) == pytest.approx(want, rel=1e-14)


def test_a_float32_delta_reaches_the_svd_without_a_copy():
    """compress_stack validates float32 deltas in place and a one-matrix stack is a view: before, the
    globals step held the delta four times over (stacked, validated, stacked again) before its SVD."""
    rng = np.random.default_rng(1)
    d = rng.standard_normal((24, 16)).astype(np.float32)
    cfg, pairs, _ = _prepare([d], None, CompressionConfig(), "prinmix")
    assert pairs[0][0] is d or np.shares_memory(pairs[0][0], d)
    stack = Stack(method="prinmix", pairs=pairs, cfg=cfg, mesh=None)
    assert np.shares_memory(stack.deltas(), d) and stack.deltas().shape == (1, 24, 16)
    # other dtypes are still converted (a copy), and two matrices are stacked
    _, pairs64, _ = _prepare([d.astype(np.float64)], None, cfg, "prinmix")
    assert pairs64[0][0].dtype == np.float32
    two = Stack(method="prinmix", pairs=pairs + pairs, cfg=cfg, mesh=None)
    np.testing.assert_array_equal(two.deltas(), np.stack([d, d]))
    # the same for a Hessian
    h = np.eye(16, dtype=np.float32)
    _, hpairs, _ = _prepare([d], [h], cfg, "prinmix")
    one = Stack(method="prinmix", pairs=hpairs, cfg=cfg, mesh=None)
    assert np.shares_memory(one.hessians(), h) and one.hessians().shape == (1, 16, 16)
    assert stack.hessians() is None
    np.testing.assert_array_equal(Stack(method="prinmix", pairs=hpairs * 2, cfg=cfg, mesh=None).hessians(),
                                  np.stack([h, h]))
