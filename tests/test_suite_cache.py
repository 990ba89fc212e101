"""The test suite's own housekeeping: a run killed before ``pytest_unconfigure`` leaves its compilation cache
folder behind, and the next run removes it (conftest.remove_stale_caches)."""
import os
import subprocess
import sys

import pytest

from conftest import _CACHE_PREFIX, cache_owner, remove_stale_caches


def test_only_folders_of_dead_runs_are_removed(tmp_path):
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                           check=True)
    dead = int(child.stdout)                      # reaped: its pid names no live process (barring reuse)
    names = {
        "dead": f"{_CACHE_PREFIX}{dead}-abc123",
        "alive": f"{_CACHE_PREFIX}{os.getpid()}-def456",
        "legacy": f"{_CACHE_PREFIX}k3j2h1",        # no pid in the name: not ours to judge
        "bare": f"{_CACHE_PREFIX}{dead}",           # no random part: not a name mkdtemp gives a run
        "other": f"something-else-{dead}-x",
    }
    for n in names.values():
        (tmp_path / n).mkdir()
        (tmp_path / n / "entry").write_bytes(b"x")
    (tmp_path / f"{_CACHE_PREFIX}{dead}-file").write_text("a file, not a folder")
    gone = remove_stale_caches(str(tmp_path))
    assert gone == [str(tmp_path / names["dead"])]
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted([names["alive"], names["legacy"], names["bare"], names["other"],
                           f"{_CACHE_PREFIX}{dead}-file"])


def test_this_run_cache_is_named_after_its_controller():
    cache = os.environ["JAX_COMPILATION_CACHE_DIR"]
    if not os.path.basename(cache).startswith(_CACHE_PREFIX):
        pytest.skip("the caller set JAX_COMPILATION_CACHE_DIR: the run made no cache folder of its own")
    assert cache_owner(os.path.basename(cache)) in (os.getpid(), os.getppid())   # the only process, or xdist's
    assert os.path.isdir(cache)
