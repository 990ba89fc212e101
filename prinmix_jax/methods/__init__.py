"""The compression methods, one unit each, chosen by name through :data:`REGISTRY`.

``prinmix`` and ``uniform`` (:mod:`.prinmix`) share the error-table path; ``deltacome``, ``bitdelta``
and ``lowrank`` are in :mod:`.baselines`. The interface is :class:`~.base.Method`; the shared steps
are in :mod:`.shared`. :data:`prinmix_jax.config.METHODS` is the public tuple of the names.
"""
from __future__ import annotations

from prinmix_jax.config import METHODS
from prinmix_jax.methods.base import Method, Stack
from prinmix_jax.methods.baselines import BitDelta, DeltaCoMe, LowRank
from prinmix_jax.methods.prinmix import PrinMix, Uniform

#: Every method by name, in the order of :data:`~prinmix_jax.config.METHODS`.
REGISTRY: dict[str, Method] = {m.name: m for m in (PrinMix(), DeltaCoMe(), BitDelta(), LowRank(), Uniform())}

if tuple(REGISTRY) != METHODS:
    raise ImportError(f"the method registry {tuple(REGISTRY)} and config.METHODS {METHODS} disagree")


def get_method(name: str) -> Method:
    """The method called ``name``; ValueError naming the choices when there is none."""
    try:
        return REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}") from None


__all__ = ["REGISTRY", "Method", "Stack", "get_method"]
