"""Serving many compressed fine-tunes of one base together: a :class:`DeltaBank` (the base on the device and
each delta in a fixed-capacity slot), mixed-batch forward and KV-cache generation, and an OpenAI-style HTTP
server (:mod:`prinmix_jax.serving.server`, ``prinmix serve``)."""
from prinmix_jax.serving.bank import DeltaBank, FingerprintMismatchError
from prinmix_jax.serving.forward import STRATEGIES, BankSpec
from prinmix_jax.serving.generate import ContextLengthError, bank_logits, generate
from prinmix_jax.serving.slots import SlotCapacityError, UnsupportedDeltaError

__all__ = ["DeltaBank", "BankSpec", "STRATEGIES", "ContextLengthError", "FingerprintMismatchError",
           "SlotCapacityError", "UnsupportedDeltaError", "bank_logits", "generate"]
