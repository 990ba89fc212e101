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


@pytest.fixture(scope="module")
def qwen_pair(tmp_path_factory):
    from pipeline_fixtures import make_pair
    root = tmp_path_factory.mktemp("deferred-globals")
    return (root, *make_pair(root, "qwen2", tokenizer=False, layers=1))    # untied: embedding and head, 64x32


def _sources(base, ft):
    from prinmix_jax.sources import ModelSource
    return tuple(ModelSource(d, None, lbl) for d, lbl in ((base, "base"), (ft, "fine-tuned")))


def test_large_global_deltas_are_read_when_compressed_one_at_a_time(qwen_pair, monkeypatch):
    """The globals step keeps a large delta (a 7B embedding or head: 2.1 GB in float32) as a DeferredDelta and
    reads it again right before its stack is compressed: while the head is compressed, the embedding's delta
    is gone (it used to wait, the globals' peak). The stored arrays are those of the eager deltas."""
    import os
    import weakref

    from pipeline_fixtures import SMALL_CONFIG, read_arrays

    import prinmix_jax.delta_tree as dt
    import prinmix_jax.run as run
    import prinmix_jax.step_compress as sc
    from prinmix_jax.core.mesh import single_device_mesh
    from prinmix_jax.pipeline import compress_model

    root, base, ft = qwen_pair
    monkeypatch.setattr(sc, "STACK_SPLIT_BYTES", 0)              # one matrix per stack on one device
    loads, real_load = [], dt.DeferredDelta.load

    def load(self):
        assert all(r() is None for _, r in loads), "a deferred delta outlived its stack"
        a = real_load(self)
        loads.append((self.path, weakref.ref(a)))
        return a
    monkeypatch.setattr(dt.DeferredDelta, "load", load)

    def compress(out, defer_bytes):
        monkeypatch.setattr(run, "STACK_SPLIT_BYTES", defer_bytes)
        compress_model(base, ft, os.path.join(root, out), config=CompressionConfig(**SMALL_CONFIG),
                       mesh=single_device_mesh(), log=lambda m: None)
        return read_arrays(os.path.join(root, out))

    eager = compress("eager", 1 << 62)
    assert loads == []
    deferred = compress("deferred", 64 * 32 * 4)                 # the embedding and the head, not the norm
    assert sorted(p for p, _ in loads) == [("embed_tokens", "weight"), ("lm_head", "weight")]
    assert deferred == eager


def test_a_global_changed_between_its_two_reads_is_refused(qwen_pair):
    """A DeferredDelta is the delta of its first read: if a model file changes before the second read, the
    compression stops with an error that says so, instead of storing bytes other than those digested."""
    from prinmix_jax.delta_tree import (ChangedWhileReadingError, DeferredDelta, global_deltas, is_zero, materialise,
                                        param_groups)

    _, base, ft = qwen_pair
    base_src, ft_src = _sources(base, ft)
    _, table = param_groups(base_src.config)
    _, eager = global_deltas(table, base_src, ft_src)
    _, deferred = global_deltas(table, base_src, ft_src, defer_bytes=64 * 32 * 4)
    kinds = {p: type(d).__name__ for p, d in deferred.items()}
    assert kinds == {("embed_tokens", "weight"): "DeferredDelta", ("lm_head", "weight"): "DeferredDelta",
                     ("norm", "weight"): "ndarray"}
    for p, d in deferred.items():
        assert d.shape == eager[p].shape
        np.testing.assert_array_equal(materialise(d), eager[p])
    head = deferred[("lm_head", "weight")]
    assert isinstance(head, DeferredDelta) and head.nonzero and head.nbytes == eager[("lm_head", "weight")].nbytes
    # a zero delta is stored as zero without reading it again (compress_entries asks is_zero first)
    assert not is_zero(head) and is_zero(DeferredDelta(head.path, np.zeros(head.shape, np.float32), base_src, ft_src))
    read = ft_src.global_tensor
    ft_src.global_tensor = lambda path: read(path) + np.float32(1e-3) * (tuple(path) == ("lm_head", "weight"))
    np.testing.assert_array_equal(materialise(deferred[("embed_tokens", "weight")]), eager[("embed_tokens", "weight")])
    with pytest.raises(ChangedWhileReadingError, match="lm_head/weight changed"):
        head.load()
