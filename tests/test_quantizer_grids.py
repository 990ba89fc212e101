"""The least-squares grid search (core/quantizer.grid_params) tried at once (accelerators, small searches such
as one column inside GPTQ's loop) chooses what the one-candidate-at-a-time loop (the CPU, and large searches)
chooses, up to the break of exact ties; and each platform's program takes the form meant for it."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

from prinmix_jax.core import quantizer
from prinmix_jax.core.quantizer import GRID_SEARCH_AT_ONCE, grid_params, search_at_once, search_one_at_a_time


def _groups(seed, ties: bool):
    """64 groups of 128 values: mixed widths, magnitudes and padding; with ``ties``, values on a grid (candidates
    whose errors tie exactly) and all-zero groups (every candidate's error 0)."""
    rng = np.random.default_rng(seed)
    n, g = 64, 128
    x = (rng.standard_normal((n, g)) * rng.choice([1e-3, 1.0, 30.0], (n, 1))).astype(np.float32)
    if ties:
        x[: n // 2] = np.round(x[: n // 2] * 4) / 4
        x[n // 2: n // 2 + 4] = 0
    maxq = (2 ** rng.choice([1, 2, 3, 4, 8], n) - 1).astype(np.float32)
    count = rng.integers(1, g + 1, n).astype(np.float32)
    return x, maxq, count


def _searched(monkeypatch, search, grid, groups):
    """grid_params with every search made by ``search`` (whatever the platform)."""
    def platform_dependent(*args, cpu, default):
        return search(cpu.args[0], *args)
    monkeypatch.setattr(quantizer.jax.lax, "platform_dependent", platform_dependent)
    try:
        fn = jax.jit(functools.partial(grid_params, scale_dtype=jnp.float16, grid=grid))
        return [tuple(np.asarray(a) for a in fn(x, m, count=c)) for x, m, c in groups]
    finally:
        monkeypatch.undo()


def _error64(x, count, maxq, scale, zero):
    x = x[: int(count)].astype(np.float64)
    base = np.floor(zero)
    q = np.clip(np.round(x / scale + (zero - base)) + base, 0, maxq)
    return float(np.sum((x - scale * (q - zero)) ** 2))


@pytest.mark.parametrize("grid", ["mse", "mse-sym"])
def test_at_once_chooses_what_one_at_a_time_chooses(monkeypatch, grid):
    """The same grids on random groups, byte for byte; where candidates tie exactly (values on a grid), float32
    rounding of the two sums may break the tie either way: then the two choices' errors are equal in float64."""
    for ties in (False, True):
        groups = [_groups(seed, ties) for seed in range(3)]
        loop = _searched(monkeypatch, search_one_at_a_time, grid, groups)
        once = _searched(monkeypatch, search_at_once, grid, groups)
        cpu = [tuple(np.asarray(a) for a in grid_params(x, m, jnp.float16, c, grid)) for x, m, c in groups]
        for (x, m, c), a, b, d in zip(groups, loop, once, cpu):
            np.testing.assert_array_equal(a[0], d[0])          # the CPU's own program is the loop
            differ = np.nonzero((a[0] != b[0]) | (a[1] != b[1]))[0]
            if not ties:
                assert differ.size == 0, differ
            assert differ.size <= 2, differ
            for i in differ:
                ea, eb = (_error64(x[i], c[i], m[i], float(p[0][i]), float(p[1][i])) for p in (a, b))
                assert abs(ea - eb) <= 1e-6 * max(ea, eb), (i, ea, eb)
            zero_rows = np.nonzero(~x.any(axis=1))[0]
            np.testing.assert_array_equal(b[0][zero_rows], a[0][zero_rows])


def test_ties_go_to_the_first_candidate():
    """An all-zero group has error 0 on every candidate: the plain min-max grid (the first) is chosen by both."""
    errors = lambda s, z, ok: jnp.where(ok, jnp.zeros_like(s), jnp.finfo(jnp.float32).max)
    scales = jnp.arange(1, 21, dtype=jnp.float32)[:, None] * jnp.ones((1, 3))
    zeros = scales * 0 + 2
    allowed = jnp.ones(scales.shape, bool).at[0].set(False)        # candidate 0 not allowed: candidate 1 wins
    for search in (search_one_at_a_time, search_at_once):
        s, z = search(errors, scales, zeros, allowed)
        np.testing.assert_array_equal(np.asarray(s), [2.0, 2.0, 2.0])


def _lowered(platform, shape):
    x = jax.ShapeDtypeStruct(shape, jnp.float32)
    return export.export(jax.jit(lambda a: grid_params(a, 3, None, None, "mse-sym")), platforms=(platform,))(
        x).mlir_module()


def test_accelerators_search_small_groups_without_a_loop_and_large_ones_with_one():
    column = (32, 128)                                     # a 4096-row column of U in 128-row groups
    assert "stablehlo.while" not in _lowered("cuda", column)
    assert "stablehlo.while" not in _lowered("tpu", column)
    assert "stablehlo.while" in _lowered("cpu", column)
    big = (GRID_SEARCH_AT_ONCE // 128 // 19 + 1, 128)       # past the limit: one candidate at a time everywhere
    assert "stablehlo.while" in _lowered("cuda", big)
