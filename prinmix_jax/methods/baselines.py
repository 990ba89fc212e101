"""The baselines of method.md (same budget, same storage accounting): Delta-CoMe, BitDelta, low-rank.

The uniform-width baseline shares PrinMix's error-table path: :mod:`prinmix_jax.methods.prinmix`.
"""
from __future__ import annotations

import dataclasses

import time

import jax.numpy as jnp
import numpy as np

from prinmix_jax.core.packing import pack_bits
from prinmix_jax.formats import LowRankDelta, SignDelta
from prinmix_jax.methods.base import Method, Stack
from prinmix_jax.methods.shared import (finish, hessian_stack, index_costs, max_kept_rank, quantize_stack, stack_svd,
                                        svd_kwargs, svd_rank)
from prinmix_jax.methods.v_step import fixed_width_rows

# Widths of Delta-CoMe by singular-value rank: (count, bits); the rest at 2 bits, then dropped.
DELTACOME_SCHEDULE = ((2, 8), (32, 3))
DELTACOME_BITS = (0, 2, 3, 8)


def deltacome_widths(sig, m, n, budget, cfg):
    """Delta-CoMe's widths by σ rank (8 bits ×2, 3 bits ×32, then 2 bits) until the budget is full."""
    cost = dict(zip(DELTACOME_BITS, index_costs(m, n, cfg, DELTACOME_BITS)))
    widths = np.zeros(sig.shape[0], np.int64)
    sched = [b for cnt, b in DELTACOME_SCHEDULE for _ in range(cnt)]
    spent = 0
    for i in range(sig.shape[0]):
        b = sched[i] if i < len(sched) else 2
        if sig[i] <= 0 or spent + cost[b] > budget:
            break
        widths[i], spent = b, spent + cost[b]
    return widths


class DeltaCoMe(Method):
    """Delta-CoMe: fixed widths by σ rank, GPTQ of V then of U with inputs ``Σ V̂ X``, no RTC, on the
    published method's min–max grid whatever ``cfg.grid`` says."""
    name = "deltacome"

    def compress(self, stack: Stack) -> list:
        if stack.widths is not None:
            raise ValueError(f"given widths only apply to prinmix/uniform, not {self.name!r}")
        stack = dataclasses.replace(stack, cfg=dataclasses.replace(stack.cfg, grid="minmax"))
        cfg = stack.cfg
        m, n = stack.shape
        u, sigma, v = stack_svd(stack, self._svd_rank(stack))
        h_all = hessian_stack(stack)
        t = time.perf_counter()
        widths = np.stack([deltacome_widths(s, m, n, stack.budget, cfg) for s in np.asarray(sigma)])
        u_rank = stack.u_rank if stack.u_rank is not None else max_kept_rank(m, n, cfg, DELTACOME_BITS)
        select = fixed_width_rows(stack, v, h_all, widths)
        t_stage1 = (time.perf_counter() - t) / len(stack.pairs)
        return quantize_stack(stack, u, sigma, h_all, select, u_rank=u_rank, rtc=False, t_stage1=t_stage1)

    def svd_request(self, stack):
        return svd_kwargs(stack.cfg, self._svd_rank(stack))

    def v_passes_under_hessian(self):
        return True

    def _svd_rank(self, stack):
        m, n = stack.shape
        return svd_rank(m, n, stack.cfg, max_kept_rank(m, n, stack.cfg, DELTACOME_BITS))

    def one_index_bits(self, m, n, cfg):   # the schedule starts at 8 bits
        return int(index_costs(m, n, cfg, (8,))[0])


class BitDelta(Method):
    """BitDelta (training-free part): ``ΔŴ = mean|ΔW| · sign(ΔW)``, one scale per matrix."""
    name = "bitdelta"
    follows_budget = False   # 1 bit per entry (and one scale) whatever the ratio

    def compress(self, stack: Stack) -> list:
        m, n = stack.shape
        out = []
        for (d_np, h_np), info in zip(stack.pairs, stack.infos):
            d = jnp.asarray(d_np)
            cm = SignDelta(signs=jnp.asarray(pack_bits((d_np >= 0).astype(np.uint8), 1)),
                           scale=jnp.mean(jnp.abs(d)).reshape(1).astype(jnp.float32), shape=(m, n))
            out.append(finish(cm, d, h_np, info, stack))
        return out

    def check_settings(self, blocks, globs, cfg, scope):
        if cfg.ratio < 1 / 16:
            raise ValueError(f"method bitdelta stores 1 bit per parameter (ratio 1/16) whatever the budget; ratio "
                             f"{cfg.ratio:.4g} (--ratio) is below it: use --ratio 1/16 or a method that "
                             "follows the budget (prinmix)")


class LowRank(Method):
    """Low-rank: the top-k SVD indices in 16-bit, ``k = C / (16 (m + n))``."""
    name = "lowrank"

    def compress(self, stack: Stack) -> list:
        m, n = stack.shape
        u, sigma, v = stack_svd(stack, self._svd_rank(stack))
        sig_np = np.asarray(sigma)
        out = []
        for i, ((d_np, h_np), info) in enumerate(zip(stack.pairs, stack.infos)):
            k = int(min(int((sig_np[i] > 0).sum()), stack.budget // self.one_index_bits(m, n, stack.cfg)))
            cm = LowRankDelta(us=jnp.asarray((u[i, :, :k] * sigma[i, None, :k]).T, jnp.float16),
                              v=jnp.asarray(v[i, :k], jnp.float16), shape=(m, n))
            out.append(finish(cm, jnp.asarray(d_np), h_np, info, stack))
        return out

    def svd_request(self, stack):
        return svd_kwargs(stack.cfg, self._svd_rank(stack))

    def _svd_rank(self, stack):
        m, n = stack.shape
        return svd_rank(m, n, stack.cfg, min(min(m, n), stack.budget // self.one_index_bits(m, n, stack.cfg)))

    def one_index_bits(self, m, n, cfg):
        return 16 * (m + n)
