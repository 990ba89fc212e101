"""The mixed-batch forward: the base model's own modules, each block linear, norm, the embedding and the head
wrapped so that row ``j`` of the batch adds its own delta ``Û_j (σ_j ⊙ (V̂_j x))`` (and its norm / bias
deltas) to the base product computed for the whole batch.

The wrappers are installed on a :class:`~prinmix_jax.models.CausalLM` built from the base params inside the
jitted function (:func:`patched_model`), so the full forward is ``CausalLM.__call__`` and the KV-cache decode
is :func:`prinmix_jax.evaluation.decoder_block`: no attention code is copied.

**Dequantise once per call.** :func:`prepare` turns the bank's slots into float32 factors ``V̂`` and
``W = σ ⊙ Ûᵀ`` (every width group of a linear concatenated along the rank axis) and gathers each row's
norm / bias weights, once per jitted call, before the decode ``lax.scan``: the loop body closes over the
results, so each decode step only runs the base matmul plus two small low-rank products per linear.
Unpacking codes inside every step (the first version) gave 0.31–0.46× the base's tokens/s on CPU. The price
is memory while a call runs: every slot's float32 factors, about a bf16 model's size per slot at 1/16
(``DeltaBank.memory()["prepared"]``). Fine for small models; a 7B base with many deltas needs the codes
dequantised inside the low-rank products (a fused kernel), which this module does not have.

**Grouping** (``strategy``), measured on CPU at the demo's size (docs/benchmarks.md, "Serving"):

* ``"row"``: gather each row's factors once per call, ``V̂ (B, R, n)``, ``W (B, R, m)``; a step computes
  ``einsum(x, V̂_b)`` then ``einsum(t, W_b)`` per row (batched matmuls). Flops ∝ rows × rank, whatever the
  number of deltas, but every step reads ``B × R(n+m)`` floats per linear: at 32 rows that traffic, not
  the flops, dominates (0.29× the base's tokens/s, against 0.53× at 8 rows).
* ``"slot"``: keep every delta slot's factors stacked, ``V̂ (S·R, n)``, ``W (S·R, m)`` (slot 0, the base,
  left out); a step is two dense matmuls ``(x V̂ᵀ ⊙ mask) W`` where ``mask`` keeps the row's own slot. Flops
  ∝ rows × slots × rank but the factors are read once per step for the whole batch: 0.42–0.55× at 32 rows.
* ``"auto"`` (default): ``"row"`` for batches of at most twice the delta slots, else ``"slot"``; the row
  count is static in the jitted program (a power-of-two bucket), so this is a trace-time choice.

Segmenting rows by delta (sort, one matmul per delta: Punica's SGMV) needs data-dependent shapes;
``jax.lax.ragged_dot`` expresses it but looked no faster than ``"slot"`` on CPU in a first micro-benchmark
(not conclusive), so it is not offered. Broadcast-multiply-and-sum instead of the batched ``einsum`` was
10–40× slower on XLA:CPU at one token per step.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from prinmix_jax.core.packing import unpack_bits
from prinmix_jax.core.quantizer import dequantize, expand_groups
from prinmix_jax.formats import HIGHEST
from prinmix_jax.models.llama.modeling import rms_norm, unembed

__all__ = ["BankSpec", "prepare", "patched_model", "STRATEGIES", "bucket", "resolve_strategy"]

STRATEGIES = ("auto", "row", "slot")


@dataclasses.dataclass(frozen=True)
class BankSpec:
    """What a jitted bank function is specialised on (hashable): ``mode`` (``"packed"``/``"factors"``),
    ``strategy`` (``"row"``/``"slot"``) and the quantisation ``group_size`` of the packed codes."""
    mode: str = "packed"
    strategy: str = "auto"
    group_size: int = 128


def _dequant(codes, scale, zero, bits: int, length: int, group_size: int):
    """Packed rows (..., words) -> float32 rows (..., length): ``scale * (code - zero)`` per group, the zero
    read back from its stored form (:func:`~prinmix_jax.core.quantizer.dequantize`)."""
    g = length if not group_size or group_size >= length else group_size
    q = unpack_bits(codes, bits, length).astype(jnp.float32)
    return dequantize(q, expand_groups(scale.astype(jnp.float32), length, g),
                      expand_groups(zero.astype(jnp.float32), length, g), bits)


def dequant_slots(state: dict, shapes: dict, spec: BankSpec) -> dict:
    """Every packed width group's float32 factor rows ``{(key, width, side): (S, k, length)}``, dequantised in
    one batch per (width, length): the groups' codes, scales and zeros concatenated along the rank axis, one
    unpack and one ``scale * (code - zero)``, then split. One chain per width group and side (the first
    version: 240 at the demo's size, 4 deltas) took 17.6 ms of a jitted :func:`prepare` alone, this 8-10 ms
    (2 CPU cores)."""
    batches: dict = {}
    for key, groups in state["linears"].items():
        m, n = shapes[key]
        for w, grp in groups.items():
            if grp["sigma"].shape[1] == 0 or "v_codes" not in grp:
                continue
            for side, length in (("v", n), ("u", m)):
                batches.setdefault((int(w), length), []).append(
                    ((key, w, side), grp[f"{side}_codes"], grp[f"{side}_scale"], grp[f"{side}_zero"]))
    out = {}
    for (bits, length), items in batches.items():
        def cat(i):
            return jnp.concatenate([it[i] for it in items], axis=1)
        rows = _dequant(cat(1), cat(2), cat(3), bits, length, spec.group_size)
        splits = np.cumsum([it[1].shape[1] for it in items])[:-1]
        out.update((it[0], part) for it, part in zip(items, jnp.split(rows, splits, axis=1)))
    return out


def slot_factors(groups: dict, key: str, rows: dict):
    """Every slot's float32 factors of one linear: ``(V̂ (S, R, n), W = σ ⊙ Ûᵀ (S, R, m))``, the width groups
    concatenated along the rank axis R (packed groups read from ``rows``, :func:`dequant_slots`); None when
    the linear has no slot capacity."""
    vs, ws = [], []
    for w, grp in groups.items():
        if grp["sigma"].shape[1] == 0:
            continue
        if "v_codes" in grp:
            v, u = rows[(key, w, "v")], rows[(key, w, "u")]
        else:
            v, u = grp["v"].astype(jnp.float32), grp["u"].astype(jnp.float32)
        vs.append(v)
        ws.append(u * grp["sigma"][..., None])
    if not vs:
        return None
    return jnp.concatenate(vs, axis=1), jnp.concatenate(ws, axis=1)


def resolve_strategy(strategy: str, rows: int, slots: int) -> str:
    """``"auto"`` -> ``"row"`` for batches of at most ``2 ×`` the delta slots, else ``"slot"`` (the crossover
    measured on CPU, docs/benchmarks.md "Serving"); other strategies unchanged."""
    if strategy != "auto":
        return strategy
    return "row" if rows <= 2 * max(slots - 1, 1) else "slot"


def _rows_of(v, w, slots, strategy: str) -> dict:
    """The factors one linear's steps use (see the module docstring)."""
    s, r = v.shape[:2]
    if resolve_strategy(strategy, slots.shape[0], s) == "row":
        return {"v": v[slots], "w": w[slots]}
    # slot 0 (the base) is all zeros: leave it out of the stack; base rows get an all-zero mask
    mask = jnp.repeat(jax.nn.one_hot(slots - 1, s - 1, dtype=jnp.float32), r, axis=1)   # (B, (S-1)·R)
    return {"v": v[1:].reshape((s - 1) * r, -1), "w": w[1:].reshape((s - 1) * r, -1), "mask": mask}


def prepare(config, base_params: dict, state: dict, slots, spec: BankSpec) -> dict:
    """What the wrapped modules read, computed once per jitted call (outside any decode loop):
    ``{"linears": {key: factors or None}, "embed": {...} or None, "dense": {key: (B, ...) weights}}``."""
    from prinmix_jax.serving.slots import linear_shapes

    shapes = linear_shapes(config)
    out = {"linears": {}, "embed": None, "dense": {}}
    rows = dequant_slots(state, shapes, spec)
    for key, groups in state["linears"].items():
        f = slot_factors(groups, key, rows)
        if f is None:
            out["linears"][key] = None
            continue
        out["linears"][key] = _rows_of(*f, slots, spec.strategy)
        if key == "embed_tokens":      # rows ΔE[id] = W[slot, :, id] · V̂[slot]: per-row V̂, every slot's W
            out["embed"] = {"v": f[0][slots], "w": jnp.swapaxes(f[1], 1, 2)}          # (B, R, d), (S, V, R)
    for key, d in state["dense"].items():
        base = _param(base_params, key)
        out["dense"][key] = (base.astype(jnp.float32) + d[slots]).astype(base.dtype)    # (B, ...)
    return out


def _param(params: dict, key: str):
    first, *rest = key.split("/")
    node = params["layers"][int(first)] if first.isdigit() else params[first]
    for p in rest:
        node = node[p]
    return node


def delta_term(x, f: dict | None):
    """Each row's ``Û_j (σ_j ⊙ (V̂_j x_j))`` for ``x`` (B, ..., n): float32 (B, ..., m); None without a delta."""
    if f is None:
        return None
    b, n = x.shape[0], x.shape[-1]
    xf = x.astype(jnp.float32).reshape(b, -1, n)
    if "mask" in f:
        t = jnp.einsum("btn,kn->btk", xf, f["v"], precision=HIGHEST) * f["mask"][:, None, :]
        y = jnp.einsum("btk,km->btm", t, f["w"], precision=HIGHEST)
    else:
        t = jnp.einsum("btn,brn->btr", xf, f["v"], precision=HIGHEST)
        y = jnp.einsum("btr,brm->btm", t, f["w"], precision=HIGHEST)
    return y.reshape(*x.shape[:-1], y.shape[-1])


def _row_weight(base_w, rows, ndim: int):
    """The per-row weight ``rows`` (B, D) (or the base weight when the bank has no such delta), shaped to
    broadcast over (B, ..., D)."""
    if rows is None:
        return base_w
    return rows.reshape(rows.shape[0], *(1,) * (ndim - 2), rows.shape[-1])


class _RowLinear:
    """A base :class:`~prinmix_jax.models.llama.modeling.Linear` plus each row's delta (and bias delta)."""

    def __init__(self, base, factors, bias_rows):
        self.base, self.factors, self.bias_rows = base, factors, bias_rows
        self.weight, self.bias = base.weight, base.bias

    def __call__(self, x):
        y = jnp.einsum("...i,oi->...o", x, self.base.weight[...])
        d = delta_term(x, self.factors)
        if d is not None:
            y = y + d.astype(y.dtype)
        if self.base.bias is not None:
            y = y + _row_weight(self.base.bias[...], self.bias_rows, y.ndim)
        return y


class _RowNorm:
    """A base RMSNorm whose weight is the base weight plus each row's norm delta."""

    def __init__(self, base, rows):
        self.base, self.rows = base, rows

    def __call__(self, x):
        return rms_norm(x, _row_weight(self.base.weight[...], self.rows, x.ndim), self.base.eps)


class _RowEmbed:
    """The token embedding plus each row's embedding delta; :meth:`attend` is the tied head with its delta."""

    def __init__(self, base, embed, factors):
        self.base, self.embed, self.factors = base, embed, factors

    def __call__(self, ids_bt):
        x = self.base(ids_bt)
        if self.embed is None:
            return x
        # W[slot_b, id, :] for every (b, t): a gather of R values per token, then (B, T, R) x (B, R, d)
        u = self.embed["w"][self.embed["slots"][:, None], ids_bt]                         # (B, T, R)
        d = jnp.einsum("btr,brd->btd", u, self.embed["v"], precision=HIGHEST)
        return x + d.astype(x.dtype)

    def attend(self, x_btd):
        y = unembed(x_btd, self.base.weight[...])
        d = delta_term(x_btd, self.factors)
        return y if d is None else y + d.astype(y.dtype)


def patched_model(config, base_params: dict, state: dict, slots, spec: BankSpec):
    """A :class:`~prinmix_jax.models.CausalLM` of the base whose modules add row ``j``'s delta from slot
    ``slots[j]`` of the bank ``state`` (slot 0 = the base). Call inside ``jax.jit``; the dequantisation
    (:func:`prepare`) happens here, once, so build the model outside any ``lax.scan``."""
    from prinmix_jax.models import model_from_params

    model = model_from_params(config, base_params)
    prep = prepare(config, base_params, state, slots, spec)
    lin, dense = prep["linears"], prep["dense"]
    for b, layer in enumerate(model.layers):
        for parent, names, sub in ((layer.self_attn, ("q_proj", "k_proj", "v_proj", "o_proj"), "self_attn"),
                                   (layer.mlp, ("gate_proj", "up_proj", "down_proj"), "mlp")):
            for name in names:
                setattr(parent, name, _RowLinear(getattr(parent, name), lin[f"{b}/{name}"],
                                                 dense.get(f"{b}/{sub}/{name}/bias")))
        for norm in ("input_layernorm", "post_attention_layernorm"):
            setattr(layer, norm, _RowNorm(getattr(layer, norm), dense.get(f"{b}/{norm}/weight")))
        attn = layer.self_attn
        if attn.q_norm is not None:
            attn.q_norm = _RowNorm(attn.q_norm, dense.get(f"{b}/self_attn/q_norm/weight"))
            attn.k_norm = _RowNorm(attn.k_norm, dense.get(f"{b}/self_attn/k_norm/weight"))
    embed = None if prep["embed"] is None else dict(prep["embed"], slots=slots)
    model.embed_tokens = _RowEmbed(model.embed_tokens, embed, lin["embed_tokens"])
    model.norm = _RowNorm(model.norm, dense.get("norm/weight"))
    if model.lm_head is not None:
        model.lm_head = _RowLinear(model.lm_head, lin["lm_head"], None)
    return model


def bucket(n: int, minimum: int = 1) -> int:
    """``n`` rounded up to a power of two (at least ``minimum``): the shapes jitted bank calls are padded to."""
    return max(minimum, 1 << max(0, math.ceil(math.log2(max(n, 1)))))
