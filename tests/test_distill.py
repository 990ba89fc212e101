"""distill_delta (issue 12's distillation option): the KL it reports is the KL of the checkpoint it writes
(an independent oracle: token_metrics of apply_delta's merged params), distillation lowers it; without
refit_codes only σ, the multi-group scales and the dense deltas change, with it codes move within their
widths too (zeros, widths, byte count and layout never change); the written checkpoint verifies, and bad
inputs are refused before anything is written."""
import os

import numpy as np
import pytest

from pipeline_fixtures import SMALL_CONFIG, make_pair, read_arrays, write_calib

from prinmix_jax import CompressionConfig
from prinmix_jax.apply import apply_delta
from prinmix_jax.distill import distill_delta
from prinmix_jax.evaluation import token_metrics
from prinmix_jax.models import ModelConfig, load_hf_params
from prinmix_jax.models.calibration_data import tokenize_calibration
from prinmix_jax.pipeline import compress_model
from prinmix_jax.storage import FingerprintMismatchError, load_delta

# one worker runs the whole module (pytest --dist loadgroup): its module fixtures are built once
pytestmark = pytest.mark.xdist_group("distill")

SEQ = 16


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("distill")
    base, ft = make_pair(root, "llama")
    calib = write_calib(root, "ids")
    delta = os.path.join(root, "delta")
    compress_model(base, ft, delta, calib=calib, config=CompressionConfig(**dict(SMALL_CONFIG, ratio=1 / 32)),
                   seq_len=SEQ)
    return root, base, ft, calib, delta


def _kl(base, ft, delta, ids):
    cfg = ModelConfig.from_pretrained_dir(ft)
    return token_metrics(load_hf_params(ft), apply_delta(load_hf_params(base), delta), cfg, ids)["kl"]


def test_distillation_lowers_the_kl_of_the_written_checkpoint_and_changes_only_sigma_and_scales(setup):
    root, base, ft, calib, delta = setup
    out = os.path.join(root, "distilled")
    res = distill_delta(base, ft, delta, out, calib=calib, seq_len=SEQ, steps=40, lr=0.02, batch_size=4,
                        refit_codes=False)
    ids = tokenize_calibration(calib, ft, seq_len=SEQ)
    before, after = _kl(base, ft, delta, ids), _kl(base, ft, out, ids)
    assert res["kept"] and res["matrices"] == 16              # 2 blocks x 7 linears, embedding and head
    np.testing.assert_allclose(res["kl_before"], before, rtol=1e-4)
    np.testing.assert_allclose(res["kl_after"], after, rtol=1e-4)    # the score is of what was stored
    assert after < 0.9 * before
    src, dst = load_delta(delta), load_delta(out)
    dst.verify()
    assert dst.meta["bytes"]["total"] == src.meta["bytes"]["total"]
    assert dst.meta["distillation"]["kl_after"] == res["kl_after"]
    changed = {"sigma": 0, "scale": 0, "dense": 0, "globals": 0}
    a, b = read_arrays(delta), read_arrays(out)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k][:2] == b[k][:2], k                            # dtype and shape
        if a[k][2] == b[k][2]:
            continue
        kind = ("sigma" if "'sigma_" in k[1] else "scale" if "_scale_" in k[1]
                else "dense" if k[1].startswith("['dense']") else None)
        assert kind is not None, f"{k} changed"
        changed[kind] += 1
        changed["globals"] += k[0] == 0
    assert changed["sigma"] > 0 and changed["scale"] > 0       # group size 16 on 32-wide vectors: 2 groups
    assert changed["dense"] > 0                                 # the stored norm and bias deltas
    assert changed["globals"] > 0


def test_refit_codes_moves_codes_within_their_widths_and_scores_what_it_stores(setup):
    """Also: ``refit_dense=False`` leaves the stored dense deltas as they were."""
    from prinmix_jax.core.packing import unpack_bits

    root, base, ft, calib, delta = setup
    out = os.path.join(root, "distilled-codes")
    res = distill_delta(base, ft, delta, out, calib=calib, seq_len=SEQ, steps=40, lr=0.02, batch_size=4,
                        refit_codes=True, code_lr=0.05, refit_dense=False)
    ids = tokenize_calibration(calib, ft, seq_len=SEQ)
    assert res["kept"] and res["refit_codes"]
    np.testing.assert_allclose(res["kl_after"], _kl(base, ft, out, ids), rtol=1e-4)
    assert res["kl_after"] < 0.9 * res["kl_before"]
    src, dst = load_delta(delta), load_delta(out)
    dst.verify()
    assert dst.meta["bytes"]["total"] == src.meta["bytes"]["total"]
    a, b = read_arrays(delta), read_arrays(out)
    moved = 0
    for k in a:
        assert a[k][:2] == b[k][:2], k
        if "_zero_" in k[1] or "widths" in k[1] or k[1].startswith("['dense']"):
            assert a[k] == b[k], k
        if "_codes_" in k[1] and a[k] != b[k]:
            bits = int(k[1].split("_codes_")[1].split("'")[0])
            shape = a[k][1]
            old = np.frombuffer(a[k][2], np.uint8).reshape(shape)
            new = np.frombuffer(b[k][2], np.uint8).reshape(shape)
            length = shape[1] // bits * 8            # whole words: the padding stays zero
            qa, qb = unpack_bits(old, bits, length), unpack_bits(new, bits, length)
            assert qb.max() < 2 ** bits
            moved += int(np.sum(qa != qb))
    assert moved > 0 and moved == res["codes_changed"]


def test_no_steps_keeps_the_input_values(setup):
    root, base, ft, calib, delta = setup
    out = os.path.join(root, "distilled0")
    res = distill_delta(base, ft, delta, out, calib=calib, seq_len=SEQ, steps=0)
    assert not res["kept"] and res["kl_after"] == res["kl_before"]
    assert read_arrays(delta) == read_arrays(out)

def test_bad_inputs_are_refused_before_writing(setup, tmp_path):
    root, base, ft, calib, delta = setup
    with pytest.raises(ValueError, match="destroy the input"):
        distill_delta(base, ft, delta, delta, calib=calib, seq_len=SEQ, overwrite=True)
    with pytest.raises(ValueError, match="steps must be"):
        distill_delta(base, ft, delta, str(tmp_path / "o1"), calib=calib, seq_len=SEQ, steps=-1)
    with pytest.raises(ValueError, match="code_lr"):
        distill_delta(base, ft, delta, str(tmp_path / "o1"), calib=calib, seq_len=SEQ, refit_codes=True, code_lr=0)
    other_base, _ = make_pair(root, "llama", seed=5)
    with pytest.raises(FingerprintMismatchError):
        distill_delta(other_base, ft, delta, str(tmp_path / "o2"), calib=calib, seq_len=SEQ, steps=1)
    lowrank = str(tmp_path / "lowrank")
    compress_model(base, ft, lowrank, config=CompressionConfig(**SMALL_CONFIG), method="lowrank")
    with pytest.raises(ValueError, match="no SVD-quantised"):
        distill_delta(base, ft, lowrank, str(tmp_path / "o3"), calib=calib, seq_len=SEQ, steps=1)
    assert not any(os.path.exists(tmp_path / f"o{i}") for i in (1, 2, 3))


def test_cli_writes_the_checkpoint_and_reports_its_kl(setup):
    import json

    from click.testing import CliRunner

    from prinmix_jax.cli import main

    root, base, ft, calib, delta = setup
    out = os.path.join(root, "cli-distilled")
    r = CliRunner().invoke(main, ["distill", base, ft, delta, out, "--calib", calib, "--seq-len", str(SEQ),
                                  "--steps", "20", "--lr", "0.01", "--batch-size", "4", "--json",
                                  "--no-compile-cache"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.output.strip().splitlines()[-1])
    ids = tokenize_calibration(calib, ft, seq_len=SEQ)
    np.testing.assert_allclose(res["kl_after"], _kl(base, ft, out, ids), rtol=1e-4)
    assert res["kl_after"] < res["kl_before"]
    r = CliRunner().invoke(main, ["distill", base, ft, delta, out, "--calib", calib, "--seq-len", str(SEQ),
                                  "--no-compile-cache"])
    assert r.exit_code != 0 and "already exists" in r.output
    # inspect says the delta was distilled, with its KLs, and that the rel_err column predates it
    r = CliRunner().invoke(main, ["inspect", out])
    line = [ln for ln in r.output.splitlines() if ln.startswith("distilled")]
    assert r.exit_code == 0 and len(line) == 1, r.output
    assert f"{res['kl_before']:.4g} → {res['kl_after']:.4g}" in line[0] and "rel_err below is from before" in line[0]
    assert "distilled" not in CliRunner().invoke(main, ["inspect", delta]).output
