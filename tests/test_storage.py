"""Storage: step encoding round trips (including zero-size arrays Orbax refuses), checksums catch changed
bytes, the step store resumes by the manager's latest step, fingerprints ignore the storage dtype,
unknown format versions are refused."""
import json
import os

import ml_dtypes
import numpy as np
import pytest

from prinmix_jax.formats import LowRankDelta, SignDelta, SVDQuantDelta
from prinmix_jax.storage import (DeltaFormatError, DenseEntry, MatrixEntry, StepStore, ZeroEntry, combine_fingerprint,
                                 decode_step, encode_step, load_delta, tensor_digest)


def _empty_svd(m=8, n=12):
    z = np.zeros((0,), np.uint8)
    return SVDQuantDelta(sigma=(), widths=z, v_codes=(), v_scale=(), v_zero=(), u_codes=(), u_scale=(),
                         u_zero=(), shape=(m, n), group_bits=(), group_size=4, method="prinmix")


def _entries():
    rng = np.random.default_rng(0)
    low = LowRankDelta(us=rng.standard_normal((2, 8)).astype(np.float16),
                       v=rng.standard_normal((2, 12)).astype(np.float16), shape=(8, 12))
    sign = SignDelta(signs=rng.integers(0, 255, (8, 2), dtype=np.uint8), scale=np.array([0.5], np.float32),
                     shape=(8, 12))
    linears = {"q_proj": MatrixEntry(low, {"rel_output_error": 0.1}), "k_proj": MatrixEntry(sign, {}),
               "v_proj": MatrixEntry(_empty_svd(), {}), "o_proj": ZeroEntry((8, 12), {})}
    dense = {"input_layernorm/weight": DenseEntry("store", (12,), array=np.ones(12, np.float16)),
             "self_attn/q_proj/bias": ZeroEntry((8,)),
             "post_attention_layernorm/weight": DenseEntry("skip", (12,), max_abs=0.3)}
    return linears, dense


def test_encode_decode_round_trip_and_store(tmp_path):
    linears, dense = _entries()
    arrays, meta = encode_step(linears, dense)
    assert "v_proj" not in arrays.get("linears", {})  # only zero-size arrays: kept out of the tree
    assert meta["linears"]["v_proj"]["empty"]["widths"] == [[0], "uint8"]
    assert meta["nbytes"] == linears["q_proj"].matrix.nbytes + linears["k_proj"].matrix.nbytes + 24
    store = StepStore(os.path.join(tmp_path, "steps"), {"run": 1})
    assert store.latest_step() is None
    store.save(0, arrays, meta)
    store.save(1, {}, {"linears": {}, "dense": {}, "nbytes": 0})  # a step without arrays
    store.close()
    store = StepStore(os.path.join(tmp_path, "steps"), read_only=True)
    assert store.all_steps() == [0, 1] and store.run_identity() == {"run": 1}
    a, m = store.restore(0)
    bd = decode_step(a, m)
    np.testing.assert_array_equal(np.asarray(bd.linears["q_proj"].reconstruct()),
                                  np.asarray(linears["q_proj"].matrix.reconstruct()))
    np.testing.assert_array_equal(np.asarray(bd.linears["k_proj"].signs), np.asarray(linears["k_proj"].matrix.signs))
    assert bd.linears["v_proj"].rank == 0 and np.all(np.asarray(bd.linears["v_proj"].reconstruct()) == 0)
    assert bd.linears["o_proj"] is None
    assert bd.dense["input_layernorm/weight"].dtype == np.float16
    assert bd.dense["self_attn/q_proj/bias"] is None and bd.dense["post_attention_layernorm/weight"] is None
    a1, m1 = store.restore(1)
    assert a1 == {} and decode_step(a1, m1).linears == {}
    store.close()


def test_checksum_and_missing_arrays_are_detected():
    linears, dense = _entries()
    arrays, meta = encode_step(linears, dense)
    bad = json.loads(json.dumps(meta))
    arrays2 = {"linears": {k: dict(v) for k, v in arrays["linears"].items()}, "dense": arrays["dense"]}
    arrays2["linears"]["k_proj"]["signs"] = arrays["linears"]["k_proj"]["signs"] ^ 1
    with pytest.raises(DeltaFormatError, match="corrupted"):
        decode_step(arrays2, bad)
    del arrays2["linears"]["q_proj"]
    with pytest.raises(DeltaFormatError):
        decode_step(arrays2, bad)
    with pytest.raises(DeltaFormatError, match="missing"):
        decode_step({"linears": arrays["linears"]}, meta)


def test_fingerprint_is_dtype_independent_and_ordered():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 6)).astype(ml_dtypes.bfloat16)
    a = tensor_digest([("x", w), ("y", np.ones(3, np.float16))])
    b = tensor_digest([("y", np.ones(3, np.float32)), ("x", w.astype(np.float32))])
    assert a == b
    c = tensor_digest([("x", w.astype(np.float32) + 1e-2), ("y", np.ones(3))])
    assert c != a
    assert combine_fingerprint([a, c]) != combine_fingerprint([c, a])


def test_refuses_unknown_version_and_incomplete(tmp_path):
    d = os.path.join(tmp_path, "delta")
    os.makedirs(d)
    with pytest.raises(DeltaFormatError, match="no prinmix_delta.json"):
        load_delta(d)
    with open(os.path.join(d, "prinmix_delta.json"), "w") as f:
        json.dump({"format": "prinmix-delta", "format_version": 99}, f)
    with pytest.raises(DeltaFormatError, match="version 99"):
        load_delta(d)
    with pytest.raises(FileNotFoundError):
        load_delta(os.path.join(tmp_path, "nope"))
