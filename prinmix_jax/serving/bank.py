"""A delta bank: one base model on the device and many compressed fine-tunes of it in fixed-capacity slots,
served together in mixed batches (:mod:`prinmix_jax.serving.forward`, :mod:`prinmix_jax.serving.generate`).

Example::

    bank = DeltaBank.from_deltas("llama-base/", {"chat": "chat-delta/", "code": "code-delta/"})
    bank.generate([[1, 5, 9], [1, 7]], ["chat", None], max_new_tokens=16)   # None: the base
"""
from __future__ import annotations

import os
import threading

import jax
import jax.numpy as jnp
import numpy as np

from prinmix_jax.apply import check_base_compatible
from prinmix_jax.delta_tree import param_groups, step_digest
from prinmix_jax.serving.forward import STRATEGIES, BankSpec
from prinmix_jax.serving.slots import (SlotCapacityError, UnsupportedDeltaError, capacities, delta_entries,
                                       empty_state, linear_shapes, slot_arrays)
from prinmix_jax.storage import FingerprintMismatchError, combine_fingerprint, load_delta

__all__ = ["DeltaBank", "SlotCapacityError", "UnsupportedDeltaError", "FingerprintMismatchError"]

MODES = ("packed", "factors")


def _nbytes(tree) -> int:
    return int(sum(x.nbytes for x in jax.tree.leaves(tree)))


@jax.jit
def _write_slot(state, slot, content):
    return jax.tree.map(lambda a, c: a.at[slot].set(c.astype(a.dtype)), state, content)


class DeltaBank:
    """One base model and up to ``max_deltas`` deltas of it, each in a slot of fixed shape.

    Use :meth:`from_deltas` to size the slots for a set of deltas. Rows of a batch name their delta (or
    ``None`` for the base); see :meth:`logits` and :meth:`generate`.

    Args:
      base: a Hugging Face checkpoint folder of the base model.
      capacity: the rank capacity per linear kind (from :func:`~prinmix_jax.serving.slots.capacities`).
      max_deltas: number of delta slots (slot 0, the base, comes on top).
      mode: ``"packed"`` (stored codes, every slot dequantised once per jitted call, before its decode loop)
        or ``"factors"`` (dequantised low-rank factors in ``factor_dtype``); see :meth:`memory`.
      strategy: how rows are grouped: ``"auto"`` (``"row"`` for batches up to twice the delta slots, else
        ``"slot"``), ``"row"`` or ``"slot"`` (see :mod:`~prinmix_jax.serving.forward`).
      group_size: the quantisation group size of the packed codes (every delta of the bank shares it).
      dtype: the base params' dtype on the device (default: as stored).
      factor_dtype: dtype of the factors in ``"factors"`` mode (default bfloat16).
      force: skip the base fingerprint check of each delta.
    """

    def __init__(self, base, capacity: dict, *, max_deltas: int = 8, mode: str = "packed", strategy: str = "auto",
                 group_size: int = 128, dtype=None, factor_dtype=jnp.bfloat16, force: bool = False):
        from prinmix_jax.models import CheckpointReader

        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
        if max_deltas < 1:
            raise ValueError(f"max_deltas must be >= 1, got {max_deltas}")
        self.base_dir = os.path.abspath(os.fspath(base))
        with CheckpointReader(self.base_dir) as reader:
            self.config = reader.config
            host = reader.read_params(None, device_put=False)
        self.step_digests = self._digests(host)
        self.fingerprint = combine_fingerprint(self.step_digests)
        self.params = jax.tree.map(lambda a: jnp.asarray(a, dtype or a.dtype), host)
        del host
        self.spec = BankSpec(mode=mode, strategy=strategy, group_size=int(group_size or 0))
        self.capacity, self.max_deltas, self.force = capacity, int(max_deltas), force
        self.factor_dtype = np.dtype(factor_dtype)
        self.state = jax.tree.map(jnp.asarray, empty_state(self.config, capacity, mode, self.max_deltas + 1,
                                                           self.spec.group_size, self.factor_dtype))
        self._slots: dict[str, int] = {}
        self._paths: dict[str, str] = {}
        self._lock = threading.Lock()

    # ----- building -------------------------------------------------------------------------------
    @classmethod
    def from_deltas(cls, base, deltas: dict, *, max_deltas: int | None = None, mode: str = "packed",
                    strategy: str = "auto", rank_multiple: int = 1, rank_capacity: int | None = None, dtype=None,
                    factor_dtype=jnp.bfloat16, force: bool = False) -> "DeltaBank":
        """A bank whose slots fit every delta of ``deltas`` (``{name: folder}``), with those deltas added.

        ``max_deltas`` (default: ``len(deltas)``) leaves room for deltas added later with :meth:`add`. Each
        rank capacity is exactly what these deltas need (``rank_multiple=1``: the least memory, see
        docs/benchmarks.md); a later delta that needs more raises :class:`SlotCapacityError`, so give headroom
        with ``rank_multiple`` (e.g. 8) or ``rank_capacity`` when deltas will be added while serving.
        """
        loaded = {name: load_delta(path) for name, path in deltas.items()}
        from prinmix_jax.models import ModelConfig

        cfg = ModelConfig.from_pretrained_dir(os.fspath(base))
        entries = {}
        for name, d in loaded.items():
            check_base_compatible(cfg, d)
            entries[name] = delta_entries(d, cfg, name)
        cap = capacities([e[0] for e in entries.values()], cfg, mode, rank_multiple, rank_capacity)
        gs = sorted({int(cm.group_size or 0) for e in entries.values() for cm in e[0].values()
                     if hasattr(cm, "group_size")}) or [128]
        bank = cls(base, cap, max_deltas=max(max_deltas or len(deltas), len(deltas), 1), mode=mode,
                   strategy=strategy, group_size=gs[0], dtype=dtype, factor_dtype=factor_dtype, force=force)
        for name, d in loaded.items():
            bank.add(name, d, _entries=entries[name])
        return bank

    def _digests(self, host) -> list[str]:
        block_table, global_table = param_groups(self.config)
        glob = {k: v for k, v in host.items() if k != "layers"}
        return [step_digest(glob, global_table)] + [step_digest(host["layers"][b], block_table)
                                                    for b in range(self.config.num_layers)]

    def _check_fingerprint(self, name: str, delta) -> None:
        if self.force:
            return
        want = list(delta.meta.get("base", {}).get("step_digests", []))
        if want != self.step_digests:
            raise FingerprintMismatchError(
                f"delta {name!r} ({delta.path}) was computed against a base with fingerprint "
                f"{delta.fingerprint[:16]}…, but this bank's base {self.base_dir} has fingerprint "
                f"{self.fingerprint[:16]}…; serve it with the base it was compressed from")

    # ----- slots ----------------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        """The names of the deltas in the bank, in slot order."""
        return sorted(self._slots, key=self._slots.get)

    def add(self, name: str, delta, *, _entries=None) -> int:
        """Loads ``delta`` (a folder or :class:`~prinmix_jax.storage.DeltaCheckpoint`) into a free slot under
        ``name`` and returns the slot. No recompilation: the slot's arrays are overwritten in place.

        Raises:
          FingerprintMismatchError: the delta was computed against another base (naming both fingerprints).
          SlotCapacityError: no free slot, or the delta needs more rank than the slots hold.
          UnsupportedDeltaError: a BitDelta delta, or a dense embedding / head delta.
        """
        if not name or not isinstance(name, str):
            raise ValueError(f"a delta needs a non-empty name, got {name!r}")
        delta = load_delta(delta)
        check_base_compatible(self.config, delta)
        self._check_fingerprint(name, delta)
        entries = _entries or delta_entries(delta, self.config, name)
        content = slot_arrays(self.config, self.capacity, self.spec.mode, self.spec.group_size, self.factor_dtype,
                              entries, name)
        with self._lock:
            if name in self._slots:
                raise ValueError(f"a delta named {name!r} is already in the bank (remove it first)")
            free = [s for s in range(1, self.max_deltas + 1) if s not in self._slots.values()]
            if not free:
                raise SlotCapacityError(f"the bank's {self.max_deltas} slots are all in use; remove a delta first")
            self.state = _write_slot(self.state, jnp.int32(free[0]), content)
            self._slots[name], self._paths[name] = free[0], delta.path
        return free[0]

    def remove(self, name: str) -> None:
        """Frees ``name``'s slot (zeroed: a stale slot id would serve the base, never another delta)."""
        with self._lock:
            slot = self._slots.pop(self._known(name))
            self._paths.pop(name)
            zeros = jax.tree.map(lambda a: jnp.zeros(a.shape[1:], a.dtype), self.state)
            self.state = _write_slot(self.state, jnp.int32(slot), zeros)

    def _known(self, name: str) -> str:
        if name not in self._slots:
            raise KeyError(f"no delta named {name!r} in the bank (known: {', '.join(self.names) or 'none'})")
        return name

    def slot_ids(self, models) -> np.ndarray:
        """Slot of each row's model name (``None`` or ``""``: the base, slot 0)."""
        return np.array([0 if not m else self._slots[self._known(m)] for m in models], np.int32)

    # ----- memory ---------------------------------------------------------------------------------
    def memory(self) -> dict:
        """Bytes on the device: ``{"base": ..., "slots": ..., "per_slot": ..., "prepared": ...}``.

        ``base`` and ``slots`` are held for the bank's life. ``prepared`` is what each jitted call builds on
        top of them before its decode loop and holds until it returns: every slot's float32 factors ``V̂`` and
        ``σ ⊙ Ûᵀ`` (:func:`~prinmix_jax.serving.forward.prepare`; in both modes). The ``"row"`` strategy
        also gathers each row's copy of them (``rows / (max_deltas + 1)`` times ``prepared`` more). At 1/16
        a slot's float32 factors are about a bf16 model's size: plan device memory with this figure."""
        slots = _nbytes(self.state)
        shapes = linear_shapes(self.config)
        prepared = sum(4 * grp["sigma"].shape[0] * grp["sigma"].shape[1] * sum(shapes[key])
                       for key, groups in self.state["linears"].items() for grp in groups.values())
        return {"base": _nbytes(self.params), "slots": slots, "per_slot": slots // (self.max_deltas + 1),
                "prepared": int(prepared)}

    # ----- running --------------------------------------------------------------------------------
    def logits(self, ids, models) -> np.ndarray:
        """float32 logits (B, T, V) of a full forward of ``ids`` (B, T), row j through ``models[j]``."""
        from prinmix_jax.serving.generate import bank_logits

        return np.asarray(bank_logits(self.params, self.state, self.config, self.spec, jnp.asarray(ids, jnp.int32),
                                      jnp.asarray(self.slot_ids(models))))

    def generate(self, prompts, models, max_new_tokens: int, **kw) -> list[list[int]]:
        """Continuations of ``prompts`` (token id lists), row j through ``models[j]``; see
        :func:`prinmix_jax.serving.generate.generate`."""
        from prinmix_jax.serving.generate import generate

        return generate(self, prompts, models, max_new_tokens, **kw)
