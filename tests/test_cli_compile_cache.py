"""The CLI's persistent compilation cache: on by default in prinmix's own folder, off with --no-compile-cache,
a user's JAX_COMPILATION_CACHE_DIR kept (real processes: the cache is set up once per process)."""
import os
import subprocess
import sys

import pytest
from pipeline_fixtures import jax_cache_env, make_pair

from prinmix_jax.cli.runtime import compile_cache_dir, use_compile_cache

FAST = ["--data-free", "--method", "bitdelta", "--embeddings", "skip", "--lm-head", "skip", "--no-progress"]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return make_pair(tmp_path_factory.mktemp("cc"), "llama")


def _env(cache):
    """A real user's environment: no JAX cache of the test session's, prinmix's cache folder at ``cache``;
    every compiled program is stored (they all compile fast on these tiny shapes)."""
    env = jax_cache_env(devices=1)
    for k in ("JAX_COMPILATION_CACHE_DIR", "PRINMIX_NO_COMPILE_CACHE"):
        env.pop(k, None)
    env.update(PRINMIX_CACHE_DIR=cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    return env


def _compress(env, pair, out, *extra):
    r = subprocess.run([sys.executable, "-m", "prinmix_jax.cli", "compress", *pair, out, *FAST, *extra],
                       capture_output=True, text=True, env=env, timeout=300, check=False)
    assert r.returncode in (0, 3), r.stderr[-2000:]  # 3: over budget (bitdelta's scales on 32x32 matrices)


def test_cache_on_by_default_and_off_with_the_flag(tmp_path_factory, pair):
    tmp = tmp_path_factory.mktemp("cc-runs")
    on, off = str(tmp / "cache-on"), str(tmp / "cache-off")
    _compress(_env(on), pair, str(tmp / "d1"))
    assert os.path.isdir(on) and os.listdir(on), "no compiled program was cached"
    _compress(_env(off), pair, str(tmp / "d2"), "--no-compile-cache")
    assert not os.path.exists(off) or not os.listdir(off)
    env = dict(_env(off), PRINMIX_NO_COMPILE_CACHE="1")
    _compress(env, pair, str(tmp / "d3"))
    assert not os.path.exists(off) or not os.listdir(off)


def test_cache_folder_and_switches():
    home = os.path.expanduser("~")
    assert compile_cache_dir({}) == os.path.join(home, ".cache", "prinmix-jax", "jax")
    assert compile_cache_dir({"XDG_CACHE_HOME": "/x/c"}) == "/x/c/prinmix-jax/jax"
    assert compile_cache_dir({"PRINMIX_CACHE_DIR": "/p", "XDG_CACHE_HOME": "/x/c"}) == "/p"
    # off: nothing is touched (and JAX is not even configured)
    assert use_compile_cache(False, {}) is None
    assert use_compile_cache(None, {"PRINMIX_NO_COMPILE_CACHE": "1"}) is None


def test_users_own_jax_cache_dir_wins(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cc-own")
    env = _env(str(tmp / "prinmix"))
    env["JAX_COMPILATION_CACHE_DIR"] = str(tmp / "mine")
    code = ("from prinmix_jax.cli.runtime import use_compile_cache; import jax, jax.numpy as jnp;"
            "print(use_compile_cache(None)); jax.jit(lambda x: x * 2 + 1)(jnp.ones(3)).block_until_ready()")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120, check=False)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == str(tmp / "mine")
    assert os.listdir(tmp / "mine") and not os.path.exists(tmp / "prinmix")
