"""Integrity of delta checkpoints on disk: which bytes a restore reads, that ``inspect --verify`` checks all of
them (and that the bytes it does not check are never used), and that a damaged array file gives exactly one
``error:`` line on stderr of the real CLI process.

Layout of a step's ``arrays/`` (an Orbax PyTree in an OCDBT database; see ``DeltaCheckpoint.verify``):
``manifest.ocdbt`` and ``d/<root>`` (the B-tree Orbax writes when it merges the per-process databases at
commit) are read and carry CRC-32C; array values are inline in that B-tree or, above 1 KiB, byte ranges of
``ocdbt.process_<i>/d/`` data files, checked by their SHA-256; ``ocdbt.process_<i>/manifest.ocdbt`` and the
per-process B-tree nodes (whole files in ``ocdbt.process_<i>/d/`` or the tail of a data file) are left over
from before the merge and never read.
"""
import copy
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from cli_helpers import FAST
from hf_fixtures import random_torch_model, save_checkpoint, save_tiny_tokenizer
from pipeline_fixtures import DIMS, jax_cache_env, make_finetuned, make_pair

from prinmix_jax.cli import main
from prinmix_jax.storage import DeltaCheckpoint, DeltaFormatError, StepStore, decode_step

# one worker runs the whole module (pytest --dist loadgroup): its module fixtures are built once
pytestmark = pytest.mark.xdist_group("storage_integrity")



@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("integrity")


@pytest.fixture(scope="module")
def pair(root):
    return make_pair(root, "llama")


@pytest.fixture(scope="module")
def prinmix_delta(root, pair):
    """The default method with small groups (several arrays per matrix) and compressed embeddings."""
    out = os.path.join(root, "delta-prinmix")
    res = CliRunner().invoke(main, ["compress", *pair, out, "--data-free", "--group-size", "16", "--no-progress"])
    assert res.exit_code == 0, res.output
    return out


@pytest.fixture(scope="module")
def wide(root):
    """(base, delta) of a 1-block model with 256x256 linears: each 8 KiB sign array is stored out of line, as
    a byte range of an ``ocdbt.process_0/d`` data file (as in real models), not inline in the B-tree."""
    base = os.path.join(root, "wide-base")
    cfg = dict(DIMS, hidden_size=256, intermediate_size=256, num_attention_heads=4, num_key_value_heads=4)
    import transformers as tf

    save_checkpoint(random_torch_model(tf.LlamaConfig(num_hidden_layers=1, **cfg), 0), base)
    save_tiny_tokenizer(base)
    ft = make_finetuned(base, os.path.join(root, "wide-ft"), 1)
    out = os.path.join(root, "delta-wide")
    res = CliRunner().invoke(main, ["compress", base, ft, out, *FAST])
    assert res.exit_code == 0, res.output
    return base, out


def _copy(src, dst):
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst)
    return dst


def _flip(path, offset, n=16):
    data = bytearray(open(path, "rb").read())
    for i in range(offset, min(offset + n, len(data))):
        data[i] ^= 0xFF
    open(path, "wb").write(bytes(data))


def _restored(path):
    """Everything a restore yields: per step the JSON metadata and every array's dtype, shape and bytes."""
    import jax

    d = DeltaCheckpoint(path)
    out = []
    for s in range(d.num_steps):
        arrays, meta = d._store.restore(s)
        leaves = jax.tree_util.tree_flatten_with_path(arrays)[0]
        out.append((json.dumps(meta, sort_keys=True),
                    [(jax.tree_util.keystr(p), np.asarray(a).dtype.str, np.asarray(a).shape, np.asarray(a).tobytes())
                     for p, a in leaves]))
    d.close()
    return out


def _verify_error(path) -> str | None:
    try:
        d = DeltaCheckpoint(path)
        d.verify()
        d.close()
    except DeltaFormatError as e:
        return str(e)
    return None


def _referenced(arrays_dir):
    """``{relative file: [(offset, length), ...]}`` of every byte range a restore of this step's OCDBT
    database reads (the manifest, the merged B-tree's nodes, the out-of-line values)."""
    import tensorstore as ts

    kv = ts.KvStore.open({"driver": "file", "path": arrays_dir + "/"}).result()
    refs = {"manifest.ocdbt": [(0, os.path.getsize(os.path.join(arrays_dir, "manifest.ocdbt")))]}

    def add(loc):                          # "<kind>:<base path>:<path>:<offset>:<length>"
        head, off, length = loc.rsplit(":", 2)
        _, base, rel = head.split(":", 2)
        refs.setdefault(base + rel, []).append((int(off), int(length)))

    def walk(loc):
        add(loc)
        for e in ts.ocdbt.dump(kv, loc).result()["entries"]:
            for k, v in e.items():
                if k != "key" and isinstance(v, str) and v.startswith("btreenode:"):
                    walk(v)
                elif k != "key" and isinstance(v, str) and v.startswith("value:"):
                    add(v)

    for version in ts.ocdbt.dump(kv).result()["versions"]:
        walk(version["root"]["location"])
    return refs


def test_step_metadata_is_checked(root, prinmix_delta):
    """Two bytes of a step's JSON metadata (a matrix's group size) change what its arrays mean; verify used to
    pass, now the step's ``meta_sha256`` catches it, in verify and in apply's reads, and without the digest
    (a delta from before it) decoding refuses scales whose group count the group size does not imply."""
    store = StepStore(os.path.join(prinmix_delta, "steps"), read_only=True)
    arrays, meta = store.restore(1)
    store.close()
    assert "meta_sha256" in meta
    name = next(n for n, e in meta["linears"].items() if e["kind"] == "matrix" and e["state"].get("group_size") == 16)
    edited = copy.deepcopy(meta)
    edited["linears"][name]["state"]["group_size"] = 32
    assert decode_step(arrays, meta).linears[name].reconstruct().shape
    with pytest.raises(DeltaFormatError, match=rf"matrix {name!r}: v_scale_\d+ has shape .* groups of 32 implies"):
        decode_step(arrays, edited)

    bad = _copy(prinmix_delta, os.path.join(root, "bad-meta"))
    p = os.path.join(bad, "steps", "1", "meta", "metadata")
    text = open(p).read()
    assert text.count('"group_size": 16') >= 1
    open(p, "w").write(text.replace('"group_size": 16', '"group_size": 32', 1))
    res = CliRunner().invoke(main, ["inspect", bad, "--verify"])
    assert res.exit_code == 1 and "step metadata is corrupted" in res.stderr, res.output
    with pytest.raises(DeltaFormatError, match="corrupted"):
        DeltaCheckpoint(bad).block(0)

    # a delta written before meta_sha256 existed (no such entry) still verifies
    old = _copy(prinmix_delta, os.path.join(root, "old-format"))
    for s in os.listdir(os.path.join(old, "steps")):
        p = os.path.join(old, "steps", s, "meta", "metadata")
        if os.path.isfile(p):
            m = json.load(open(p))
            del m["meta_sha256"]
            open(p, "w").write(json.dumps(m))
    assert _verify_error(old) is None


def test_every_read_byte_is_checked_and_the_rest_unused(root, wide):
    """Flip 16 bytes in the middle of each range a restore reads: verify reports it. Flip 16 bytes in every
    range it does not read (per-process manifest and B-tree nodes, the tail of the data file, commit markers,
    orbax step metadata): verify passes and the restore is byte-identical."""
    _, delta = wide
    ref = _restored(delta)
    steps = sorted(int(s) for s in os.listdir(os.path.join(delta, "steps")) if s.isdigit())
    unused, n_case = [], 0
    for s in steps:
        sdir = os.path.join(delta, "steps", str(s))
        adir = os.path.join(sdir, "arrays")
        refs = _referenced(adir)
        read = [(os.path.join("arrays", f), off, n) for f, rs in refs.items() for off, n in rs]
        read += [(os.path.join("arrays", "_METADATA"), 0, os.path.getsize(os.path.join(adir, "_METADATA")))]
        for rel, off, n in read:          # each read range: 16 flipped bytes are reported
            n_case += 1
            cor = _copy(delta, os.path.join(root, f"flip{n_case}"))
            _flip(os.path.join(cor, "steps", str(s), rel), off + max(0, n // 2 - 8))
            assert _verify_error(cor) is not None, (s, rel, off, n)
            shutil.rmtree(cor)
        for dirpath, _, files in os.walk(sdir):
            for fn in files:
                rel = os.path.relpath(os.path.join(dirpath, fn), sdir)
                size = os.path.getsize(os.path.join(dirpath, fn))
                if rel in (os.path.join("meta", "metadata"), os.path.join("arrays", "_METADATA")):
                    continue
                covered = sorted(refs.get(os.path.relpath(rel, "arrays"), []) if rel.startswith("arrays") else [])
                gaps, pos = [], 0
                for off, n in covered:
                    gaps += [(pos, off - pos)] if off > pos else []
                    pos = max(pos, off + n)
                gaps += [(pos, size - pos)] if size > pos else []
                unused += [(os.path.join(sdir, rel), off, n) for off, n in gaps]
        # the step's JSON metadata: 16 digits nearest its middle changed (the JSON stays valid)
        n_case += 1
        cor = _copy(delta, os.path.join(root, f"flip{n_case}"))
        p = os.path.join(cor, "steps", str(s), "meta", "metadata")
        text = open(p).read()
        runs = [m.start() for m in re.finditer(r"\d{16}", text)]
        at = min(runs, key=lambda i: abs(i - len(text) // 2))
        text = text[:at] + "".join(str((int(c) + 1) % 10) for c in text[at:at + 16]) + text[at + 16:]
        open(p, "w").write(text)
        json.loads(text)
        assert _verify_error(cor) is not None, (s, "meta", at)
        shutil.rmtree(cor)
    rdir = os.path.join(delta, "steps", "metadata")      # the run identity: read by a resumed compress only
    unused += [(os.path.join(rdir, f), 0, os.path.getsize(os.path.join(rdir, f))) for f in os.listdir(rdir)]
    # the finding: the largest ocdbt.process_0/d file ends in an unused per-process B-tree node
    pdir = os.path.join(delta, "steps", "1", "arrays", "ocdbt.process_0", "d")
    largest = max((os.path.join(pdir, f) for f in os.listdir(pdir)), key=os.path.getsize)
    assert any(p == largest for p, _, _ in unused)
    assert any("ocdbt.process_0" + os.sep + "manifest.ocdbt" in p for p, _, _ in unused)
    cor = _copy(delta, os.path.join(root, "flip-unused"))
    for p, off, n in unused:
        _flip(p.replace(delta, cor), off + max(0, n // 2 - 8), min(16, n))
    assert _verify_error(cor) is None
    assert _restored(cor) == ref


def test_truncated_data_file_gives_one_error_line(root, wide):
    """The real process, several runs: a data file cut to half gives exactly one ``error:`` line on stderr
    (Orbax's reads still in flight used to print 'Event loop is closed' tracebacks, in most runs)."""
    base, delta = wide
    trunc = _copy(delta, os.path.join(root, "truncated"))
    d = os.path.join(trunc, "steps", "1", "arrays", "ocdbt.process_0", "d")
    largest = max((os.path.join(d, f) for f in os.listdir(d)), key=os.path.getsize)
    with open(largest, "r+b") as f:
        f.truncate(os.path.getsize(largest) // 2)
    env = jax_cache_env()
    runs = [["apply", base, trunc, os.path.join(root, "merged-trunc")]] * 3 + [["inspect", trunc, "--verify"]]
    for args in runs:
        r = subprocess.run([sys.executable, "-m", "prinmix_jax.cli", *args], capture_output=True, text=True,
                           env=env, timeout=120)
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert r.returncode == 1, r.stderr
        assert len(lines) == 1 and lines[0].startswith("error: ") and "corrupted" in lines[0], r.stderr
        assert "Traceback" not in r.stderr and "Event loop" not in r.stderr
    assert not os.path.exists(os.path.join(root, "merged-trunc"))


def test_orphaned_read_reports_of_a_store_are_dropped_and_others_kept(tmp_path, caplog):
    """Reads still in flight when a damaged store's first read failed report later as asyncio's "Task
    exception was never retrieved" (when their task is collected, so only some runs of the test above show
    it): those naming a step store opened here are dropped, a user's own asyncio errors still show."""
    import logging

    store = StepStore(str(tmp_path / "steps"), {"run": 1})
    log = logging.getLogger("asyncio")
    ours = ValueError(f'OUT_OF_RANGE: Error reading "x" at local file "{store.directory}/1/arrays/"')
    theirs = ValueError('OUT_OF_RANGE: Error reading "x" at local file "/elsewhere/arrays/"')
    with caplog.at_level(logging.ERROR, logger="asyncio"):
        log.error("Task exception was never retrieved\nfuture: <Task>", exc_info=(ValueError, ours, None))
        log.error("Future exception was never retrieved\nfuture: <Future>", exc_info=(ValueError, ours, None))
        log.error("Task exception was never retrieved\nfuture: <Task>", exc_info=(ValueError, theirs, None))
        log.error("something else about %s", store.directory)
    msgs = [(r.getMessage(), r.exc_info[1] if r.exc_info else None) for r in caplog.records]
    assert len(msgs) == 2
    assert msgs[0][1] is theirs and msgs[1][0].startswith("something else")
