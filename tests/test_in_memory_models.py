"""``compress_model`` on in-memory param trees (NumPy or JAX arrays), which its docstring accepts beside
checkpoint folders: the caller's arrays are never written to, JAX arrays (read-only as NumPy) work, and both
give the same stored delta; a block's deltas read one tensor at a time equal those of the whole blocks."""
from __future__ import annotations

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from pipeline_fixtures import DIMS, SMALL_CONFIG  # noqa: E402

from prinmix_jax import CompressionConfig, apply_delta, compress_model, load_delta  # noqa: E402
from prinmix_jax.delta_tree import block_deltas, param_groups, step_digest  # noqa: E402
from prinmix_jax.models import ModelConfig  # noqa: E402
from prinmix_jax.models.llama.params import expected_tensors, get_path, put_path  # noqa: E402
from prinmix_jax.sources import ModelSource  # noqa: E402

CFG = ModelConfig.from_hf_config(dict(DIMS, architectures=["Qwen2ForCausalLM"], model_type="qwen2",
                                      num_hidden_layers=2))       # biases too


def _tree(seed: int, scale: float = 1.0) -> dict:
    rng = np.random.default_rng(seed)
    tree: dict = {}
    for _, (path, shape) in sorted(expected_tensors(CFG).items()):
        put_path(tree, path, (scale * rng.standard_normal(shape)).astype(np.float32))
    return tree


def _pair():
    base = _tree(0)
    return base, jax.tree.map(lambda b, d: b + d, base, _tree(1, 1e-2))


def _merged(base, path: str) -> list[np.ndarray]:
    return [np.asarray(a) for a in jax.tree.leaves(apply_delta(base, load_delta(path)))]


def test_param_trees_are_read_not_written_and_jax_arrays_work(tmp_path):
    base, ft = _pair()
    before = [a.copy() for a in jax.tree.leaves((base, ft))]
    cfg = CompressionConfig(**SMALL_CONFIG)
    compress_model(base, ft, str(tmp_path / "numpy"), model_config=CFG, config=cfg)
    # the deltas are taken in place of a fine-tuned copy: never of the caller's own arrays
    assert all(np.array_equal(a, b) for a, b in zip(before, jax.tree.leaves((base, ft))))
    jbase, jft = jax.tree.map(jnp.asarray, (base, ft))      # as load_hf_params returns them (read-only in NumPy)
    compress_model(jbase, jft, str(tmp_path / "jax"), model_config=CFG, config=cfg)
    one, two = _merged(base, str(tmp_path / "numpy")), _merged(base, str(tmp_path / "jax"))
    assert len(one) == len(two) > 0
    assert all(a.dtype == b.dtype and np.array_equal(a, b) for a, b in zip(one, two))


def test_block_deltas_one_tensor_at_a_time_equal_the_whole_blocks():
    """block_deltas: the digests of the whole blocks, the deltas (and dense entries) of step_items on the whole
    blocks, the blocks themselves when kept, and none of the sources' arrays changed."""
    base, ft = _pair()
    before = [a.copy() for a in jax.tree.leaves((base, ft))]
    bsrc, fsrc = ModelSource(base, CFG, "base"), ModelSource(ft, CFG, "fine-tuned")
    table = param_groups(CFG)[0]
    for b in range(CFG.num_layers):
        whole_b, whole_f = bsrc.block(b), fsrc.block(b)
        for keep_ft, keep_base in ((False, False), (True, False), (True, True), (False, True)):
            digests, deltas, ft_b, base_b = block_deltas(table, bsrc, fsrc, b, keep_ft=keep_ft, keep_base=keep_base)
            assert digests == (step_digest(whole_b, table), step_digest(whole_f, table))
            ref = {tuple(p): get - gb for (p, _), get, gb in
                   ((pk, get_path(whole_f, pk[0]), get_path(whole_b, pk[0])) for pk in table)}
            assert deltas.keys() == ref.keys()
            assert all(np.array_equal(deltas[k], ref[k]) for k in ref)
            for kept, whole, keep in ((ft_b, whole_f, keep_ft), (base_b, whole_b, keep_base)):
                if keep:
                    assert jax.tree.structure(kept) == jax.tree.structure(whole)
                    assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(kept), jax.tree.leaves(whole)))
                else:
                    assert kept is None
        none = block_deltas(table, bsrc, fsrc, b, digests=False)
        assert none[0] is None and len(none[1]) == len(table)
    assert all(np.array_equal(a, b) for a, b in zip(before, jax.tree.leaves((base, ft))))
