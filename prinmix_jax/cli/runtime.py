"""JAX set-up of a CLI run, done before JAX compiles anything: XLA's GPU autotuning and the persistent
compilation cache.

The compilation cache keeps XLA's compiled programs on disk, so a second ``prinmix compress`` of the same
shapes skips most compiling. It is on by default for ``compress``, ``apply``, ``eval`` and ``demo``:

* folder: ``$PRINMIX_CACHE_DIR``, else ``$XDG_CACHE_HOME/prinmix-jax/jax``, else ``~/.cache/prinmix-jax/jax``;
  a ``JAX_COMPILATION_CACHE_DIR`` of your own wins over all three;
* off: ``--no-compile-cache`` or ``PRINMIX_NO_COMPILE_CACHE=1`` (prinmix then sets up no cache; JAX's own
  ``JAX_COMPILATION_CACHE_DIR``, if you set one, still applies);
* programs that compiled in under 0.5 s are not stored (``JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS``
  overrides).
"""
from __future__ import annotations

import importlib.util
import os

__all__ = ["CUDA_PLUGINS", "MIN_COMPILE_SECONDS", "compile_cache_dir", "gpu_xla_flags", "use_compile_cache"]

CUDA_PLUGINS = ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_plugins.xla_cuda12", "jax_plugins.xla_cuda13")

#: Programs that compiled faster than this are not written to the cache (a disk read would not pay off).
MIN_COMPILE_SECONDS = 0.5

_TRUE = ("1", "true", "yes", "on")


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:          # a dotted name whose parent package is missing
        return False


def gpu_xla_flags(autotune: bool, environ=os.environ) -> bool:
    """Turns XLA's GPU autotuning off (``--xla_gpu_autotune_level=0`` in ``XLA_FLAGS``) unless ``autotune``,
    unless ``XLA_FLAGS`` already sets a level, and only where a JAX CUDA plugin is installed (other
    backends are left alone). Must run before JAX starts its backend. Returns whether it set the flag.

    Autotuning makes compiling much slower for runs that are barely faster (figures in docs/benchmarks.md).
    """
    flags = environ.get("XLA_FLAGS", "")
    if autotune or "xla_gpu_autotune_level" in flags:
        return False
    if not any(_installed(name) for name in CUDA_PLUGINS):
        return False
    environ["XLA_FLAGS"] = f"{flags} --xla_gpu_autotune_level=0".strip()
    return True


def compile_cache_dir(environ=os.environ) -> str:
    """prinmix's compilation cache folder: ``$PRINMIX_CACHE_DIR``, else ``$XDG_CACHE_HOME/prinmix-jax/jax``,
    else ``~/.cache/prinmix-jax/jax``."""
    if environ.get("PRINMIX_CACHE_DIR"):
        return os.path.abspath(os.path.expanduser(environ["PRINMIX_CACHE_DIR"]))
    root = environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(os.path.abspath(root), "prinmix-jax", "jax")


def use_compile_cache(enabled: bool | None, environ=os.environ) -> str | None:
    """Turns JAX's persistent compilation cache on for this process (before anything is compiled).

    ``enabled``: the ``--compile-cache/--no-compile-cache`` flag; ``None`` (not given) means on unless
    ``PRINMIX_NO_COMPILE_CACHE`` is set to 1/true/yes/on. A ``JAX_COMPILATION_CACHE_DIR`` (or a cache folder
    already configured in JAX) is kept as it is. Returns the cache folder in use, or None when prinmix set
    none up.
    """
    if enabled is None:
        enabled = environ.get("PRINMIX_NO_COMPILE_CACHE", "").strip().lower() not in _TRUE
    if not enabled:
        return None
    import jax

    path = jax.config.jax_compilation_cache_dir or environ.get("JAX_COMPILATION_CACHE_DIR")
    if not path:
        path = compile_cache_dir(environ)
        try:
            os.makedirs(path, exist_ok=True)
        except OSError:       # an unwritable cache folder must not stop the run: compile as without one
            return None
        jax.config.update("jax_compilation_cache_dir", path)
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in environ:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
    return path
