"""The test suite's own housekeeping: a run killed before ``pytest_unconfigure`` leaves its compilation cache
folder behind, and the next run removes it (conftest.remove_stale_caches)."""
import os
import subprocess
import sys

from conftest import _CACHE_PREFIX, remove_stale_caches


def test_only_folders_of_dead_runs_are_removed(tmp_path):
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                           check=True)
    dead = int(child.stdout)                      # reaped: its pid names no live process (barring reuse)
    names = {
        "dead": f"{_CACHE_PREFIX}{dead}-abc123",
        "alive": f"{_CACHE_PREFIX}{os.getpid()}-def456",
        "legacy": f"{_CACHE_PREFIX}k3j2h1",        # no pid in the name: not ours to judge
        "other": f"something-else-{dead}-x",
    }
    for n in names.values():
        (tmp_path / n).mkdir()
        (tmp_path / n / "entry").write_bytes(b"x")
    (tmp_path / f"{_CACHE_PREFIX}{dead}-file").write_text("a file, not a folder")
    gone = remove_stale_caches(str(tmp_path))
    assert gone == [str(tmp_path / names["dead"])]
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted([names["alive"], names["legacy"], names["other"], f"{_CACHE_PREFIX}{dead}-file"])


def test_this_run_cache_is_named_after_its_controller():
    cache = os.environ["JAX_COMPILATION_CACHE_DIR"]
    name = os.path.basename(cache)
    if name.startswith(_CACHE_PREFIX):            # not when the caller set JAX_COMPILATION_CACHE_DIR itself
        pid = int(name[len(_CACHE_PREFIX):].partition("-")[0])
        assert pid in (os.getpid(), os.getppid())     # the only process, or xdist's controller
        assert os.path.isdir(cache)
