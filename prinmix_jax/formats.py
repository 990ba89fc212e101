"""Compressed forms of one delta matrix: registered pytrees (arrays are children; shapes,
widths and the method are static), ready for Orbax.

Every stored byte is a leaf, and ``nbytes`` is the sum of the stored leaves' ``nbytes`` (all leaves, but for
the implied ones of a lean :class:`SVDQuantDelta`).

* :class:`SVDQuantDelta` (prinmix, deltacome, uniform): kept singular indices grouped by width;
  per group, ``V̂`` rows and ``Û`` columns (stored as rows, i.e. ``Ûᵀ``) packed at that width,
  one float16 scale and uint8 zero per group of ``group_size`` entries, and σ (float32). The
  ``widths`` leaf (uint8, one per kept index) makes a stored tree self-describing. With ``lean``
  metadata (format version 3) the leaves that carry no information are not stored
  (:meth:`SVDQuantDelta.stored_fields`): ``widths`` (implied by the width groups), the scales of a
  factor with one quantisation group per vector (all 1: σ holds ``σ · s_u · s_v``) and the zero points of
  widths up to ``zero_free_max_bits`` (symmetric grids: all ``maxq / 2``). In memory every leaf is present,
  so reading and serving code sees one layout; ``nbytes`` counts what is stored.
* :class:`LowRankDelta`: ``(U diag σ)ᵀ`` and ``V`` in float16.
* :class:`SignDelta` (BitDelta): packed signs and one float32 scale.
"""
from __future__ import annotations

import dataclasses
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np

from prinmix_jax.core.gptq import HIGHEST
from prinmix_jax.core.packing import packed_words, unpack_bits
from prinmix_jax.core.quantizer import dequantize, expand_groups, stored_zero
from prinmix_jax.costs import num_groups


def _nbytes(tree) -> int:
    return int(sum(np.dtype(x.dtype).itemsize * int(np.prod(x.shape)) for x in jax.tree.leaves(tree)))


def _traced(tree) -> bool:
    """Whether any leaf of ``tree`` is a JAX tracer (the caller is being traced by ``jit``/``grad``)."""
    return any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(tree))


def _dequant_rows(codes, scale, zero, bits: int, length: int, group_size: int, host: bool, start: int = 0,
                  stop: int | None = None):
    """The dequantised rows of one width group of a factor, or on the host entries ``start:stop`` of each
    (``start`` on a packed word and a scale group)."""
    if host:
        stop = length if stop is None else stop
        g = group_size if group_size and group_size < length else None
        s, z = np.asarray(scale), np.asarray(zero)
        if (start, stop) != (0, length):
            lo = 0 if g is None else start // g
            hi = lo + (1 if g is None else num_groups(stop - start, g))
            s, z = s[:, lo:hi], z[:, lo:hi]
        words = np.asarray(codes)[:, bits * (start // 8): bits * -(-stop // 8)]
        return dequant_codes(unpack_bits(words, bits, stop - start).astype(np.float32), s, z, bits, g)
    return dequant_codes(unpack_bits(codes, bits, length).astype(jnp.float32), scale, zero, bits, group_size)


def dequant_codes(q, scale, zero, bits: int, group_size: int):
    """Unpacked codes ``q`` (rows, length) -> values, with per-group ``scale`` and stored ``zero``
    (rows, groups) of one width group of an :class:`SVDQuantDelta` factor: in NumPy for NumPy ``q`` (the
    same float32 values), else in JAX (traceable)."""
    length = q.shape[-1]
    g = length if not group_size or group_size >= length else group_size
    if isinstance(q, np.ndarray):
        rows, ng = q.shape[0], num_groups(length, group_size)
        s, z = np.asarray(scale, np.float32), np.asarray(zero, np.float32)
        if not s.shape[-1] == ng == z.shape[-1]:
            raise ValueError(f"scales of {s.shape[-1]} and zero points of {z.shape[-1]} groups for {length} "
                             f"entries in groups of {g} ({ng} groups)")
        # by groups, broadcasting the scales: no per-entry copies of them
        qg = np.pad(q, ((0, 0), (0, ng * g - length))).reshape(rows, ng, g)
        return dequantize(qg, s[..., None], z[..., None], bits).reshape(rows, ng * g)[:, :length]
    s = expand_groups(jnp.asarray(scale, jnp.float32), length, g)
    z = expand_groups(jnp.asarray(zero, jnp.float32), length, g)
    return dequantize(q, s, z, bits)


#: At most this many rows, and about :data:`RECONSTRUCT_BYTES` of float32, of a matrix are reconstructed at a time
#: on the host (``row_blocks``; rounded up to whole packed words and quantisation groups): what a tall matrix
#: needs beside its output is one block, e.g. for a 128256x4096 embedding at rank 2334 a 4096-row block of Û
#: (38 MB) and of the product (67 MB), not the whole Û (1.2 GB) and product (2.1 GB). A matrix of up to 4096
#: rows and 4096 columns is one block.
RECONSTRUCT_ROWS = 4096
RECONSTRUCT_BYTES = 64 << 20


def reconstruct_rows(cols: int) -> int:
    """Rows per host block of a matrix (or a tensor) with ``cols`` float32 values per row."""
    return max(1, min(RECONSTRUCT_ROWS, RECONSTRUCT_BYTES // (4 * max(1, int(cols)))))


def _row_spans(m: int, step: int) -> list[tuple[int, int]]:
    return [(a, min(a + step, m)) for a in range(0, m, step)]


def _assemble(blocks, shape):
    """A host ``reconstruct()`` from its ``_host_blocks``: the one block itself (as computed), else the blocks
    written into one float32 array."""
    blocks = iter(blocks)
    first = next(blocks)
    if first[1] - first[0] == shape[0]:
        return first[2] if isinstance(first[2], jax.Array) else jax.device_put(first[2])
    out = np.empty(shape, np.float32)
    for a, z, blk in itertools.chain([first], blocks):          # one block made at a time
        out[a:z] = np.asarray(blk)
    return jax.device_put(out)


def _row_blocks(blocks):
    for a, z, blk in blocks:
        yield a, z, np.asarray(blk, np.float32)


@jax.jit
def _scaled_product(u, s, v):
    """``Û diag(σ) V̂`` (m, n) in float32: one program per shape."""
    return jnp.matmul(u * s[None, :], v, precision=HIGHEST)


@jax.jit
def _f16_product(us, v):
    return jnp.matmul(us.astype(jnp.float32).T, v.astype(jnp.float32), precision=HIGHEST)


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
    lean: bool = dataclasses.field(metadata=dict(static=True), default=False)
    zero_free_max_bits: int = dataclasses.field(metadata=dict(static=True), default=0)

    def stored_fields(self) -> dict:
        """``{array key: array}`` of what a checkpoint stores (``"<field>_<b>"`` for per-width leaves): every
        leaf, or with ``lean`` metadata all but the implied ones (module docstring)."""
        out = {}
        for f in ("sigma", "v_codes", "v_scale", "v_zero", "u_codes", "u_scale", "u_zero"):
            for b, a in zip(self.group_bits, getattr(self, f)):
                if self.lean and (f.endswith("_scale") and a.shape[-1] == 1
                                  or f.endswith("_zero") and b <= self.zero_free_max_bits):
                    continue
                out[f"{f}_{b}"] = a
        if not self.lean:
            out["widths"] = self.widths
        return out

    @property
    def nbytes(self) -> int:
        return _nbytes(self.stored_fields())

    @property
    def rank(self) -> int:
        return int(self.widths.shape[0])

    @property
    def bits(self) -> np.ndarray:
        """Width of each kept singular index, in decreasing order of the stored σ (with lean metadata σ holds
        the folded scales too, so the order can differ slightly from the SVD's)."""
        sig = np.concatenate([np.asarray(s) for s in self.sigma]) if self.sigma else np.zeros(0)
        return np.asarray(self.widths)[np.argsort(-sig, kind="stable")]

    def check_layout(self) -> None:
        """Raises ``ValueError`` unless every array has the shape that ``shape``, ``group_bits`` and
        ``group_size`` imply (what :func:`from_state` checks of every matrix read from a checkpoint):
        per width group ``b`` of ``k_b`` rows, σ ``(k_b,)``, codes ``(k_b, b·⌈len/8⌉)``, scales and zero points
        ``(k_b, groups of len)``, and ``widths`` one entry per row."""
        m, n = self.shape
        fields = ("sigma", "v_codes", "v_scale", "v_zero", "u_codes", "u_scale", "u_zero")
        for f in fields:
            if len(getattr(self, f)) != len(self.group_bits):
                raise ValueError(f"{f} has {len(getattr(self, f))} width groups, group_bits {list(self.group_bits)}")
        rows = 0
        for i, b in enumerate(self.group_bits):
            k = int(np.shape(self.sigma[i])[0]) if np.ndim(self.sigma[i]) == 1 else -1
            if k < 0:
                raise ValueError(f"sigma_{b} has shape {np.shape(self.sigma[i])}, not one value per row")
            rows += k
            want = {"v_codes": (k, packed_words(n, b)), "v_scale": (k, num_groups(n, self.group_size)),
                    "u_codes": (k, packed_words(m, b)), "u_scale": (k, num_groups(m, self.group_size))}
            want["v_zero"], want["u_zero"] = want["v_scale"], want["u_scale"]
            for f, shape in want.items():
                got = tuple(np.shape(getattr(self, f)[i]))
                if got != shape:
                    raise ValueError(f"{f}_{b} has shape {got}; a {m}x{n} matrix with {k} rows of width {b} and "
                                     f"groups of {self.group_size} implies {shape}")
        if tuple(np.shape(self.widths)) != (rows,):
            raise ValueError(f"widths has shape {tuple(np.shape(self.widths))}, the width groups hold {rows} rows")

    def factors(self):
        """``(Û (m, k), σ (k,), V̂ (k, n))`` in float32, indices in group order.

        Outside a trace the codes are unpacked and dequantised on the host (NumPy, the same float32 values):
        op by op in JAX that would compile some 60 small programs per matrix, since every matrix's width
        groups have their own row counts (3 s per 4096 x 4096 matrix on a 2-core CPU, two thirds of it
        compiling; ``benchmarks/bench_apply.py``)."""
        host = not _traced(self)
        f = self._factors(np if host else jnp)
        return tuple(jax.device_put(a) for a in f) if host else f

    def _factors(self, xp):
        m, n = self.shape
        host = xp is np
        us, vs = [], []
        for i, b in enumerate(self.group_bits):
            vs.append(_dequant_rows(self.v_codes[i], self.v_scale[i], self.v_zero[i], b, n, self.group_size, host))
            us.append(_dequant_rows(self.u_codes[i], self.u_scale[i], self.u_zero[i], b, m, self.group_size, host))
        if not us:
            return xp.zeros((m, 0), np.float32), xp.zeros((0,), np.float32), xp.zeros((0, n), np.float32)
        sig = xp.concatenate([xp.asarray(s, np.float32) for s in self.sigma])
        return xp.concatenate(us).T, sig, xp.concatenate(vs)

    def reconstruct(self):
        """The (m, n) float32 approximation of the delta (outside a trace: :meth:`row_blocks` put together)."""
        if _traced(self):
            return _scaled_product(*self._factors(jnp))
        return _assemble(self._host_blocks(reconstruct_rows(self.shape[1])), self.shape)

    def row_blocks(self, rows: int | None = None):
        """Yields ``(start, stop, rows start:stop of reconstruct())`` as float32 NumPy, computed on the host one
        block of about ``rows`` rows at a time (default :func:`reconstruct_rows`): only that block of Û is
        unpacked. With the default, these are :meth:`reconstruct`'s own blocks, so adding them into a base one
        at a time gives the same bytes as adding ``reconstruct()``."""
        return _row_blocks(self._host_blocks(rows or reconstruct_rows(self.shape[1])))

    def _host_blocks(self, rows: int):
        m, n = self.shape
        if not self.group_bits:
            for a, z in _row_spans(m, rows):
                yield a, z, np.zeros((z - a, n), np.float32)
            return
        g = self.group_size if self.group_size and self.group_size < m else None
        step = math.lcm(8, g or 8)                       # blocks start on a packed word and a scale group
        step *= -(-rows // step)
        v = np.concatenate([_dequant_rows(self.v_codes[i], self.v_scale[i], self.v_zero[i], b, n, self.group_size,
                                          True) for i, b in enumerate(self.group_bits)])
        sig = np.concatenate([np.asarray(x, np.float32) for x in self.sigma])
        for a, z in _row_spans(m, step):
            us = [_dequant_rows(self.u_codes[i], self.u_scale[i], self.u_zero[i], b, m, self.group_size, True, a, z)
                  for i, b in enumerate(self.group_bits)]
            yield a, z, _scaled_product(np.concatenate(us).T, sig, v)

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
        if _traced(self):
            return _f16_product(self.us, self.v)
        return _assemble(self._host_blocks(reconstruct_rows(self.shape[1])), self.shape)

    def row_blocks(self, rows: int | None = None):
        """As :meth:`SVDQuantDelta.row_blocks`."""
        return _row_blocks(self._host_blocks(rows or reconstruct_rows(self.shape[1])))

    def _host_blocks(self, rows: int):
        us = np.asarray(self.us)
        for a, z in _row_spans(self.shape[0], rows):
            yield a, z, _f16_product(us[:, a:z], self.v)

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
        if _traced(self):
            s = unpack_bits(self.signs, 1, n).astype(jnp.float32)
            return self.scale[0] * (2.0 * s - 1.0)
        return _assemble(self._host_blocks(reconstruct_rows(self.shape[1])), self.shape)

    def row_blocks(self, rows: int | None = None):
        """As :meth:`SVDQuantDelta.row_blocks`."""
        return _row_blocks(self._host_blocks(rows or reconstruct_rows(self.shape[1])))

    def _host_blocks(self, rows: int):
        m, n = self.shape
        signs, scale = np.asarray(self.signs), np.asarray(self.scale, np.float32)[0]
        for a, z in _row_spans(m, rows):                # on the host, as factors()
            s = unpack_bits(signs[a:z], 1, n).astype(np.float32)
            yield a, z, scale * (2.0 * s - 1.0)

    def apply(self, x):
        return jnp.matmul(x, self.reconstruct().T, precision=HIGHEST)


for _cls in (SVDQuantDelta, LowRankDelta, SignDelta):
    jax.tree_util.register_dataclass(_cls)

#: Any compressed matrix.
CompressedMatrix = SVDQuantDelta | LowRankDelta | SignDelta


_CLASSES = {"SVDQuantDelta": SVDQuantDelta, "LowRankDelta": LowRankDelta, "SignDelta": SignDelta}
_TUPLE_FIELDS = ("sigma", "v_codes", "v_scale", "v_zero", "u_codes", "u_scale", "u_zero")
#: Static fields added after format version 2: a matrix whose metadata lacks them takes the default.
_ADDED_STATIC = ("lean", "zero_free_max_bits")


def _implied_arrays(arrays: dict, kw: dict) -> dict:
    """``arrays`` of a lean :class:`SVDQuantDelta` with the leaves it does not store put back: ``widths``,
    scales of single-group factors (1) and zero points of symmetric widths (``maxq / 2`` in half steps)."""
    out = dict(arrays)
    m, n = kw["shape"]
    g = kw["group_size"]
    widths = []
    for b in kw["group_bits"]:
        if f"sigma_{b}" not in arrays:
            return out                          # the missing-array check names it
        k = int(np.shape(arrays[f"sigma_{b}"])[0])
        widths.append(np.full(k, b, np.uint8))
        for side, length in (("v", n), ("u", m)):
            ng = num_groups(length, g)
            if ng == 1:
                out.setdefault(f"{side}_scale_{b}", np.ones((k, 1), np.float16))
            if b <= kw["zero_free_max_bits"]:
                out.setdefault(f"{side}_zero_{b}", np.full((k, ng), stored_zero((2 ** b - 1) / 2, b), np.uint8))
    out.setdefault("widths", np.concatenate(widths) if widths else np.zeros(0, np.uint8))
    return out


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
        elif kind != "SVDQuantDelta":
            arrays[f.name] = np.asarray(val)
    if kind == "SVDQuantDelta":
        arrays = {k: np.asarray(v) for k, v in cm.stored_fields().items()}
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
            if f.name not in meta and f.name in _ADDED_STATIC:       # written before that field existed
                kw[f.name] = f.default
                continue
            if f.name not in meta:
                raise ValueError(f"{kind} metadata lacks {f.name!r}")
            v = meta[f.name]
            kw[f.name] = tuple(v) if isinstance(v, list) else v
    if kind == "SVDQuantDelta" and kw["lean"]:
        arrays = _implied_arrays(arrays, kw)
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
    if kind == "SVDQuantDelta":
        cm.check_layout()
    if "nbytes" in meta and cm.nbytes != meta["nbytes"]:
        raise ValueError(f"{kind} arrays hold {cm.nbytes} bytes but the metadata records {meta['nbytes']}")
    return cm
