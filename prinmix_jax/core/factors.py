"""GPTQ's set-up under each distinct Hessian, computed once and shared by every pass under it.

A GPTQ pass under a Hessian starts with a set-up that depends on the Hessian alone: the damped Cholesky factor
and the rows of the upper factor ``R`` its column loop reads (:func:`~prinmix_jax.core.gptq_setup.gptq_factor`, about
0.8·n³ flops). Inside one pass it is shared by the widths of an error table (vmap), but nothing shared it
across passes: q, k and v (one input Hessian) each computed it, and so did every row tile of a stack spread
over the devices (:func:`~prinmix_jax.core.mesh.run_rows_sharded`), where it was 60–70% of a tile's work for a
7B block on 8 devices (docs/benchmarks.md). Here a stack's distinct Hessians are factored once each, on a
device of their own (:func:`start_factors`: the set-ups of a stack, a block or a window of blocks side by side),
and the passes take the factors (``factor=``, the same bytes).

:func:`prefetch_factors` starts the set-ups of many Hessians at once (a window of blocks' Hessians, spread over
the devices) and :func:`using_prefetched_factors` makes :func:`stack_factors` take them.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
from typing import NamedTuple

import jax
import numpy as np
from jax.sharding import Mesh

from prinmix_jax.core.gptq_setup import GPTQFactor, gptq_factor
from prinmix_jax.core.mesh import default_mesh, same_bytes, same_operand_groups
from prinmix_jax.core.svd import plan_devices


class FactorSettings(NamedTuple):
    """What a V-side (row mode) set-up depends on besides its Hessian (:func:`~prinmix_jax.core.gptq_setup.gptq_factor`)."""
    damp: float
    group_size: int | None
    act_order: bool
    block_size: int


def factor_settings(damp, group_size=None, act_order=False, block_size=128, **_) -> FactorSettings:
    """:class:`FactorSettings` from a damping and GPTQ keyword settings (others, e.g. the grid, ignored)."""
    return FactorSettings(float(np.float32(damp)), group_size, bool(act_order), int(block_size))


@functools.cache
def _factor_fn(s: FactorSettings):
    return jax.jit(lambda h: gptq_factor(h, np.float32(s.damp), group_size=s.group_size, act_order=s.act_order,
                                         block_size=s.block_size))


@dataclasses.dataclass
class _Started:
    hessian: np.ndarray        # the (n, n) float32 Hessian (held: the match of a later lookup)
    settings: FactorSettings
    factor: GPTQFactor | None  # on its device, possibly still running; dropped once its last use took it
    uses: int = 1              # how many stacks will take it


def start_factors(hessians, settings: FactorSettings, mesh: Mesh | None = None) -> list[_Started]:
    """Starts the set-ups of ``hessians`` ((n, n) float32 each, distinct), each on one device of ``mesh``, the
    largest first on the least-loaded devices (:func:`~prinmix_jax.core.svd.plan_devices`), and returns
    without waiting: a block's four Hessians, or a window's sixteen, are factored side by side."""
    devs = list(default_mesh(mesh).devices.flat)
    place = plan_devices([1] * len(hessians), [float(h.shape[0]) ** 3 for h in hessians], len(devs))
    fn = _factor_fn(settings)
    return [_Started(h, settings, fn(jax.device_put(np.asarray(h, np.float32), devs[p[0]])))
            for h, p in zip(hessians, place)]


_PREFETCHED: contextvars.ContextVar = contextvars.ContextVar("prinmix_gptq_factors", default=None)


def prefetch_factors(hessians, settings: FactorSettings, mesh: Mesh | None = None) -> list[_Started]:
    """:func:`start_factors` of the distinct arrays among ``hessians``, one per stack that will take it (equal
    bytes are factored once), for :func:`using_prefetched_factors`. Once taken by as many stacks as it appears
    in ``hessians``, a factor is dropped (its device memory freed: a 7B window holds up to 4 × 485 MB)."""
    hessians = [np.asarray(h, np.float32) for h in hessians]
    groups = same_operand_groups(hessians)
    started = start_factors([hessians[g[0]] for g in groups], settings, mesh)
    for s, g in zip(started, groups):
        s.uses = len(g)
    return started


@contextlib.contextmanager
def using_prefetched_factors(prefetched: list[_Started]):
    """Within the ``with`` block, :func:`stack_factors` takes the factors of ``prefetched``
    (:func:`prefetch_factors`) for Hessians of equal bytes and settings, each as many times as it was asked for
    (a Hessian may serve several stacks: q and k,v under GQA); a stack asking after that computes its own."""
    token = _PREFETCHED.set(list(prefetched) + list(_PREFETCHED.get() or []))
    try:
        yield
    finally:
        _PREFETCHED.reset(token)


def _prefetched(h: np.ndarray, settings: FactorSettings) -> GPTQFactor | None:
    """The active prefetched factor of ``h`` under ``settings`` (one of its uses taken), or ``None``."""
    for s in _PREFETCHED.get() or []:
        if s.factor is not None and s.settings == settings and same_bytes(s.hessian, h):
            factor = s.factor
            s.uses -= 1
            if s.uses <= 0:
                s.factor = None
            return factor
    return None


def stack_factors(h_all, settings: FactorSettings, mesh: Mesh | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The set-ups of a stack's (B, n, n) Hessians: each distinct Hessian factored once (or taken from
    :func:`using_prefetched_factors`), the others started side by side (:func:`start_factors`).

    Returns:
      ``(r (B, cp, cp), damp (B,))`` on the host, :class:`~prinmix_jax.core.gptq_setup.GPTQFactor`'s fields per matrix,
      for the passes' ``factor=`` (``r`` a read-only view of one factor when the stack has one Hessian).
    """
    h_all = np.asarray(h_all, np.float32)
    groups = same_operand_groups([h_all[i] for i in range(len(h_all))])
    factors = [_prefetched(h_all[g[0]], settings) for g in groups]
    todo = [j for j, f in enumerate(factors) if f is None]
    started = start_factors([h_all[groups[j][0]] for j in todo], settings, mesh) if todo else []
    for j, s in zip(todo, started):
        factors[j] = s.factor
    host = [jax.device_get(f) for f in factors]
    d = np.empty(len(h_all), np.float32)
    for j, g in enumerate(groups):
        d[g] = host[j].damp
    if len(groups) == 1:           # one Hessian (q, k, v): a view, not B host copies of an n×n factor
        return np.broadcast_to(np.asarray(host[0].r), (len(h_all),) + host[0].r.shape), d
    r = np.empty((len(h_all),) + host[0].r.shape, host[0].r.dtype)
    for j, g in enumerate(groups):
        r[g] = host[j].r
    return r, d
