"""Test-wide set-up, done before JAX initialises: 8 simulated CPU devices, and compile settings for a suite
that is mostly XLA compile time on a 2-core CI machine.

* The in-process tests compile with XLA's CPU backend at ``--xla_backend_optimization_level=0``: ~30% less
  CPU time over the suite (measured: test_compress + test_lean_metadata, 396 → 278 CPU s). The in-process
  tests pass at both levels. The subprocess runs (``pipeline_fixtures.jax_cache_env``: CLI, multi-process
  and resume tests; test_mesh_rows' children) set their own ``XLA_FLAGS`` and compile at the default level,
  so the optimised build, which is what users run, stays covered. That matters: test_mesh_rows' 1- against
  8-device identity (V by rows against whole matrices) holds at the default level, while at level 0 one
  error table differs in its last bits (tried, not kept). Those children do take the emitter choice below.
  The in-process tests also compile fusions with XLA:CPU's older elemental emitters
  (``--xla_cpu_use_fusion_emitters=false``, where this jaxlib knows the flag): half the backend compile time
  (a compress_matrix set of 37 programs: 6.8-8.7 → 3.7 s in one sitting; the suite: docs/development.md,
  "How the suite stays fast").
  ``PRINMIX_TEST_XLA_OPT=default`` keeps XLA's defaults (an optimisation level already in ``XLA_FLAGS`` is
  kept either way).
* One compute thread per test process: ``OPENBLAS_NUM_THREADS=1`` (jaxlib's CPU QR, LU, SVD and eigh call
  OpenBLAS, whose threads spin when the cores are shared) and ``--xla_cpu_multi_thread_eigen=false`` (XLA's
  CPU matrix products), since ``pytest -n 2`` already runs a process per core. Measured on the 2-core machine,
  the whole suite in consecutive runs: 832 and 785 s with the defaults, 680 s with one thread (the workers'
  summed test time 1500 → 1281 s; the LAPACK-heavy test_svd_truncated 148 → 95 s). The
  subprocess runs inherit ``OPENBLAS_NUM_THREADS`` and set their own ``XLA_FLAGS``. An existing setting of
  either is kept.
* One persistent compilation cache for the whole run, shared by the xdist workers (the same program is often
  compiled by both) and by the subprocess runs, in a temporary folder the controlling process removes at the
  end (and the next run, if this one was killed first). An existing ``JAX_COMPILATION_CACHE_DIR`` is used as
  it is. The in-process tests write only programs that took 0.5 s or more to compile.
"""
import os
import shutil
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    _flags = (_flags + " --xla_force_host_platform_device_count=8").strip()


def _xla_knows(flag: str) -> bool:
    """Whether this jaxlib's XLA has ``flag``: XLA aborts the process on an unknown one in ``XLA_FLAGS``. Looks
    for its name in jaxlib's library (~0.1 s; no JAX set-up)."""
    import importlib.util
    import mmap
    spec = importlib.util.find_spec("jaxlib")
    for folder in (spec.submodule_search_locations or ()) if spec else ():
        lib = os.path.join(folder, "libjax_common.so")
        if os.path.exists(lib):
            with open(lib, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
                return m.find(flag.encode()) >= 0
    return False


if os.environ.get("PRINMIX_TEST_XLA_OPT") != "default":
    if "xla_backend_optimization_level" not in _flags:
        _flags += " --xla_backend_optimization_level=0"
    if "xla_cpu_use_fusion_emitters" not in _flags and _xla_knows("xla_cpu_use_fusion_emitters"):
        _flags += " --xla_cpu_use_fusion_emitters=false"
if "xla_cpu_multi_thread_eigen" not in _flags:
    _flags += " --xla_cpu_multi_thread_eigen=false"
os.environ["XLA_FLAGS"] = _flags
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
# CLI runs inside the test process leave prinmix's compilation cache alone (no writes to ~/.cache/prinmix-jax);
# subprocess runs use the run's JAX_COMPILATION_CACHE_DIR below (pipeline_fixtures.jax_cache_env), and
# test_cli_compile_cache.py tests prinmix's own cache.
os.environ.setdefault("PRINMIX_NO_COMPILE_CACHE", "1")

# The controlling process (xdist's, or the only one) makes the run's cache folder before the workers start;
# they inherit the environment. The folder's name carries the controller's pid: a run killed before
# pytest_unconfigure (SIGKILL, a CI timeout) leaves its folder behind, and the next run removes it.
_CACHE_PREFIX = "prinmix-jax-test-cache-"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:          # another user's live process
        return True
    return True


def cache_owner(name: str, prefix: str = _CACHE_PREFIX) -> int | None:
    """The pid in a cache folder's name ``<prefix><pid>-<random>``, or ``None`` for any other name."""
    if not name.startswith(prefix):
        return None
    pid, _, rest = name[len(prefix):].partition("-")
    return int(pid) if pid.isdigit() and rest else None


def remove_stale_caches(tmp: str, prefix: str = _CACHE_PREFIX) -> list:
    """Removes ``tmp/<prefix><pid>-*`` folders whose process is gone; returns their paths."""
    gone = []
    for name in os.listdir(tmp):
        pid, path = cache_owner(name, prefix), os.path.join(tmp, name)
        if pid is not None and os.path.isdir(path) and not _pid_alive(pid):
            shutil.rmtree(path, ignore_errors=True)
            gone.append(path)
    return gone


_OWN_CACHE = None
if "PYTEST_XDIST_WORKER" not in os.environ and "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    remove_stale_caches(tempfile.gettempdir())
    _OWN_CACHE = tempfile.mkdtemp(prefix=f"{_CACHE_PREFIX}{os.getpid()}-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _OWN_CACHE
    # Only programs that took 0.5 s or more to compile are written: the many small ones cost less to compile
    # again than to serialize, and serializing is where a worker once crashed (a segfault in XLA:CPU's
    # executable.serialize(), 2026-12-04; xdist then hung on the crashed worker's group).
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")


def pytest_unconfigure(config):
    if _OWN_CACHE is not None:
        shutil.rmtree(_OWN_CACHE, ignore_errors=True)


def pytest_collection_modifyitems(config, items):
    """Tests marked ``eight_devices`` compare 1 against 8 devices, or index the 8 simulated CPU devices this
    file sets up. On the CPU they always run (a run that lost the 8-device flag fails them); on an accelerator
    backend (``JAX_PLATFORMS=cuda``, one GPU: benchmarks/device_tests.sh) they are skipped with that reason, not
    failed."""
    import jax
    import pytest
    if jax.default_backend() == "cpu":
        return
    skip = pytest.mark.skip(reason=f"needs 8 devices; {jax.default_backend()} has {jax.device_count()}")
    for item in items:
        if "eight_devices" in item.keywords and jax.device_count() < 8:
            item.add_marker(skip)


def pytest_runtest_logreport(report):
    """``PRINMIX_TEST_INSTAFAIL=1``: each failure's report goes to stderr as it happens, not only in the
    summary at the end. For runs on a lent accelerator, whose command is stopped at a time limit (on the first
    H200 run, the limit fell before the summary and the reasons for four failures were lost)."""
    if report.failed and os.environ.get("PRINMIX_TEST_INSTAFAIL") == "1":
        import sys
        sys.__stderr__.write(f"\n---- FAILED {report.nodeid} ({report.when})\n{report.longreprtext}\n")
        sys.__stderr__.flush()
