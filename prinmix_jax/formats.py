"""Compressed forms of one delta matrix: registered pytrees (arrays are children; shapes,
widths and the method are static), ready for Orbax.

Every stored byte is a leaf, so ``nbytes`` is the sum of the leaves' ``nbytes``.

* :class:`SVDQuantDelta` (prinmix, deltacome, uniform): kept singular indices grouped by width;
  per group, ``V̂`` rows and ``Û`` columns (stored as rows, i.e. ``Ûᵀ``) packed at that width,
  one float16 scale and uint8 zero per group of ``group_size`` entries, and σ (float32). The
  ``widths`` leaf (uint8, one per kept index) makes a stored tree self-describing.
* :class:`LowRankDelta`: ``(U diag σ)ᵀ`` and ``V`` in float16.
* :class:`SignDelta` (BitDelta): packed signs and one float32 scale.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from prinmix_jax.core.gptq import HIGHEST
from prinmix_jax.core.packing import unpack_bits
from prinmix_jax.core.quantizer import dequantize, expand_groups


def _nbytes(tree) -> int:
    return int(sum(np.dtype(x.dtype).itemsize * int(np.prod(x.shape)) for x in jax.tree.leaves(tree)))


def _dequant_rows(codes, scale, zero, bits: int, length: int, group_size: int):
    q = unpack_bits(codes, bits, length).astype(jnp.float32)
    g = length if not group_size or group_size >= length else group_size
    s = expand_groups(scale.astype(jnp.float32), length, g)
    z = expand_groups(zero.astype(jnp.float32), length, g)
    return dequantize(q, s, z, bits)


@dataclasses.dataclass(frozen=True)
class SVDQuantDelta:
    """Mixed-precision low-rank delta ``ΔŴ = Û diag(σ) V̂`` (grouped by width)."""
    sigma: tuple            # per group: (k_b,) float32
    widths: jax.Array       # (k,) uint8, group order
    v_codes: tuple          # per group: (k_b, b*ceil(n/8)) uint8
    v_scale: tuple          # per group: (k_b, ceil(n/g)) float16
    v_zero: tuple           # per group: (k_b, ceil(n/g)) uint8
    u_codes: tuple          # per group: (k_b, b*ceil(m/8)) uint8  (Ûᵀ rows)
    u_scale: tuple          # per group: (k_b, ceil(m/g)) float16
    u_zero: tuple
    shape: tuple = dataclasses.field(metadata=dict(static=True), default=(0, 0))
    group_bits: tuple = dataclasses.field(metadata=dict(static=True), default=())
    group_size: int = dataclasses.field(metadata=dict(static=True), default=128)
    method: str = dataclasses.field(metadata=dict(static=True), default="prinmix")

    @property
    def nbytes(self) -> int:
        return _nbytes(self)

    @property
    def rank(self) -> int:
        return int(self.widths.shape[0])

    @property
    def bits(self) -> np.ndarray:
        """Width of each kept singular index, in decreasing-σ order."""
        sig = np.concatenate([np.asarray(s) for s in self.sigma]) if self.sigma else np.zeros(0)
        return np.asarray(self.widths)[np.argsort(-sig, kind="stable")]

    def factors(self):
        """``(Û (m, k), σ (k,), V̂ (k, n))`` in float32, indices in group order."""
        m, n = self.shape
        us, vs = [], []
        for i, b in enumerate(self.group_bits):
            vs.append(_dequant_rows(self.v_codes[i], self.v_scale[i], self.v_zero[i], b, n, self.group_size))
            us.append(_dequant_rows(self.u_codes[i], self.u_scale[i], self.u_zero[i], b, m, self.group_size))
        if not us:
            return jnp.zeros((m, 0), jnp.float32), jnp.zeros((0,), jnp.float32), jnp.zeros((0, n), jnp.float32)
        sig = jnp.concatenate([jnp.asarray(s, jnp.float32) for s in self.sigma])
        return jnp.concatenate(us).T, sig, jnp.concatenate(vs)

    def reconstruct(self):
        """The (m, n) float32 approximation of the delta."""
        u, s, v = self.factors()
        return jnp.matmul(u * s[None, :], v, precision=HIGHEST)

    def apply(self, x):
        """The factored delta path ``x ↦ Û (σ ⊙ (V̂ x))`` for ``x`` (..., n) -> (..., m)."""
        u, s, v = self.factors()
        return jnp.matmul(jnp.matmul(x, v.T, precision=HIGHEST) * s, u.T, precision=HIGHEST)


@dataclasses.dataclass(frozen=True)
class LowRankDelta:
    """Top-k SVD delta in float16: ``ΔŴ = usᵀ v`` with ``us = (U_k diag σ_k)ᵀ``."""
    us: jax.Array           # (k, m) float16
    v: jax.Array            # (k, n) float16
    shape: tuple = dataclasses.field(metadata=dict(static=True), default=(0, 0))
    method: str = dataclasses.field(metadata=dict(static=True), default="lowrank")

    @property
    def nbytes(self) -> int:
        return _nbytes(self)

    @property
    def rank(self) -> int:
        return int(self.v.shape[0])

    @property
    def bits(self) -> np.ndarray:
        return np.full(self.rank, 16, np.int64)

    def factors(self):
        return self.us.astype(jnp.float32).T, jnp.ones((self.rank,), jnp.float32), self.v.astype(jnp.float32)

    def reconstruct(self):
        return jnp.matmul(self.us.astype(jnp.float32).T, self.v.astype(jnp.float32), precision=HIGHEST)

    def apply(self, x):
        u, _, v = self.factors()
        return jnp.matmul(jnp.matmul(x, v.T, precision=HIGHEST), u.T, precision=HIGHEST)


@dataclasses.dataclass(frozen=True)
class SignDelta:
    """BitDelta: ``ΔŴ = scale · sign(ΔW)``, signs packed 1 bit each (0 counts as +)."""
    signs: jax.Array        # (m, ceil(n/8)) uint8
    scale: jax.Array        # (1,) float32
    shape: tuple = dataclasses.field(metadata=dict(static=True), default=(0, 0))
    method: str = dataclasses.field(metadata=dict(static=True), default="bitdelta")

    @property
    def nbytes(self) -> int:
        return _nbytes(self)

    @property
    def rank(self) -> int | None:
        return None

    @property
    def bits(self):
        return None

    def factors(self):
        return None

    def reconstruct(self):
        m, n = self.shape
        s = unpack_bits(self.signs, 1, n).astype(jnp.float32)
        return self.scale[0] * (2.0 * s - 1.0)

    def apply(self, x):
        return jnp.matmul(x, self.reconstruct().T, precision=HIGHEST)


for _cls in (SVDQuantDelta, LowRankDelta, SignDelta):
    jax.tree_util.register_dataclass(_cls)

#: Any compressed matrix.
CompressedMatrix = SVDQuantDelta | LowRankDelta | SignDelta


_CLASSES = {"SVDQuantDelta": SVDQuantDelta, "LowRankDelta": LowRankDelta, "SignDelta": SignDelta}
_TUPLE_FIELDS = ("sigma", "v_codes", "v_scale", "v_zero", "u_codes", "u_scale", "u_zero")


def to_state(cm: CompressedMatrix) -> tuple[dict, dict]:
    """Splits a compressed matrix into a flat dict of numpy arrays and a JSON-able metadata dict.

    Array keys are field names, with ``"<field>_<b>"`` (b = the group's width) for the per-width
    groups of :class:`SVDQuantDelta`. :func:`from_state` inverts it exactly.
    """
    kind = type(cm).__name__
    if kind not in _CLASSES:
        raise TypeError(f"not a compressed matrix: {type(cm).__name__}")
    meta = {"format": kind, "method": cm.method, "shape": [int(x) for x in cm.shape], "nbytes": cm.nbytes}
    arrays = {}
    for f in dataclasses.fields(cm):
        val = getattr(cm, f.name)
        if f.metadata.get("static"):
            meta[f.name] = list(val) if isinstance(val, tuple) else val
        elif isinstance(val, tuple):
            for b, a in zip(cm.group_bits, val):
                arrays[f"{f.name}_{b}"] = np.asarray(a)
        else:
            arrays[f.name] = np.asarray(val)
    return arrays, meta


def from_state(arrays: dict, meta: dict) -> CompressedMatrix:
    """Rebuilds a compressed matrix from :func:`to_state`'s output (validating the fields)."""
    kind = meta.get("format")
    if kind not in _CLASSES:
        raise ValueError(f"unknown compressed-matrix format {kind!r}; known: {sorted(_CLASSES)}")
    cls = _CLASSES[kind]
    kw = {}
    for f in dataclasses.fields(cls):
        if f.metadata.get("static"):
            if f.name not in meta:
                raise ValueError(f"{kind} metadata lacks {f.name!r}")
            v = meta[f.name]
            kw[f.name] = tuple(v) if isinstance(v, list) else v
    for f in dataclasses.fields(cls):
        if f.metadata.get("static"):
            continue
        if f.name in _TUPLE_FIELDS and kind == "SVDQuantDelta":
            keys = [f"{f.name}_{b}" for b in kw["group_bits"]]
        else:
            keys = [f.name]
        missing = [k for k in keys if k not in arrays]
        if missing:
            raise ValueError(f"{kind} state lacks arrays {missing}")
        vals = tuple(jnp.asarray(arrays[k]) for k in keys)
        kw[f.name] = vals if (f.name in _TUPLE_FIELDS and kind == "SVDQuantDelta") else vals[0]
    cm = cls(**kw)
    if "nbytes" in meta and cm.nbytes != meta["nbytes"]:
        raise ValueError(f"{kind} arrays hold {cm.nbytes} bytes but the metadata records {meta['nbytes']}")
    return cm
