"""Test-wide set-up: 8 simulated CPU devices, set before JAX initialises."""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()
# CLI runs inside the test process leave JAX's compilation cache alone (no writes to ~/.cache/prinmix-jax);
# subprocess runs use the session's JAX_COMPILATION_CACHE_DIR (pipeline_fixtures.jax_cache_env), and
# test_cli_compile_cache.py tests prinmix's own cache.
os.environ.setdefault("PRINMIX_NO_COMPILE_CACHE", "1")
