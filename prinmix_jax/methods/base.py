"""The interface of a compression method: one small unit per method, chosen by name.

A method takes a validated :class:`Stack` of same-shape deltas (with their Hessians, the settings,
the mesh, and optional widths/U rank decided elsewhere) and returns one compressed matrix, or one
``(compressed, info)`` pair, per delta. The registry of the methods is :mod:`prinmix_jax.methods`;
the shared steps (SVD, the U step, packing) are in :mod:`prinmix_jax.methods.shared`.
"""
from __future__ import annotations

import dataclasses

import numpy as np
from jax.sharding import Mesh

from prinmix_jax.config import CompressionConfig


@dataclasses.dataclass
class Stack:
    """The validated inputs of one :func:`~prinmix_jax.compress.compress_stack` call.

    Attributes:
      method: the method's name (recorded in the results).
      pairs: ``(delta, hessian)`` per matrix: float32 numpy arrays (m, n) and (n, n) or ``None``.
      cfg: the settings.
      mesh: the 1-D device mesh the stacked programs run on.
      widths: optional per-matrix widths decided elsewhere (e.g. a global allocation).
      u_rank: optional rank the U step is padded to (:func:`~prinmix_jax.methods.shared.rank_bucket`).
      return_info: return ``(compressed, info)`` pairs.
      infos: one diagnostics dict per matrix, filled by the method.
      t0: ``time.perf_counter()`` at the start of the call.
    """
    method: str
    pairs: list
    cfg: CompressionConfig
    mesh: Mesh
    widths: object = None
    u_rank: int | None = None
    return_info: bool = False
    infos: list = dataclasses.field(default_factory=list)
    t0: float = 0.0

    @property
    def shape(self) -> tuple[int, int]:
        return self.pairs[0][0].shape

    @property
    def budget(self) -> int:
        return self.cfg.budget_bits(*self.shape)

    def deltas(self) -> np.ndarray:
        """The (B, m, n) float32 stack of the deltas."""
        return _stacked([p[0] for p in self.pairs])

    def hessians(self) -> np.ndarray | None:
        """The (B, n, n) float32 stack of the Hessians, or ``None`` (data-free)."""
        return None if self.pairs[0][1] is None else _stacked([p[1] for p in self.pairs])


def _stacked(arrays: list) -> np.ndarray:
    """``np.stack(arrays)``, but a view, not a copy, of a single array (a 7B embedding is 2.1 GB in float32)."""
    return arrays[0][None] if len(arrays) == 1 else np.stack(arrays)


class Method:
    """A compression method. Subclasses set :attr:`name` and implement :meth:`compress`.

    Attributes:
      name: the name users pass (``--method``, ``compress_stack(method=...)``).
      follows_budget: the result's size follows ``cfg.ratio`` (so at least one singular index must fit).
    """
    name: str = ""
    follows_budget: bool = True

    def compress(self, stack: Stack) -> list:
        """One compressed matrix (or ``(compressed, info)`` pair, with ``stack.return_info``) per delta."""
        raise NotImplementedError

    def svd_request(self, stack: Stack):
        """The plain SVD :meth:`compress` takes first, as the keyword arguments of
        :func:`~prinmix_jax.core.svd.svd_sharded` that :func:`~prinmix_jax.methods.shared.stack_svd` passes for
        ``stack.deltas()`` (:func:`~prinmix_jax.methods.shared.svd_kwargs`; ``{}`` is the full SVD), or ``None``
        when it takes none (or decomposes something it computes on the way, such as a whitened delta). It lets
        a caller start the SVDs of several stacks at once (:func:`~prinmix_jax.compress.prefetch_svds`)."""
        return None

    def v_passes_under_hessian(self) -> bool:
        """Whether :meth:`compress` of a calibrated stack runs GPTQ passes of V under its Hessians with the
        config's settings (:func:`~prinmix_jax.methods.v_step.stack_rows`; with given widths, unless the global
        scope's first pass kept them), whose set-ups a caller may start ahead for several stacks
        (:func:`~prinmix_jax.step_compress.spread_factors`)."""
        return False

    def one_index_bits(self, m: int, n: int, cfg: CompressionConfig) -> int:
        """What keeping a single singular vector of an (m, n) matrix costs (its cheapest first index)."""
        raise NotImplementedError

    def check_settings(self, blocks: list, globs: list, cfg: CompressionConfig, scope: str) -> None:
        """Method-specific refusals of :func:`~prinmix_jax.compress.check_settings` (ValueError, in the
        words of the CLI's options); the shared check that one index fits follows when
        :attr:`follows_budget`."""
