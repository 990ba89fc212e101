"""What a compress run does with the parameters that are not decoder-block linears."""
from __future__ import annotations

import dataclasses

__all__ = ["ParamPolicy", "POLICY_CHOICES"]

POLICY_CHOICES = {"norms": ("store", "skip"), "biases": ("store", "skip"),
                   "embeddings": ("compress", "store", "skip"), "lm_head": ("compress", "store", "skip")}
_STORE_DTYPES = ("float16", "float32")


@dataclasses.dataclass(frozen=True)
class ParamPolicy:
    """What happens to the parameters that are not decoder-block linears.

    Attributes:
      norms: RMSNorm weights (block norms, q/k norms, final norm): ``"store"`` the delta in
        ``store_dtype`` or ``"skip"`` it (the base value is kept at apply).
      biases: linear biases (Qwen2 q/k/v, Llama ``attention_bias`` / ``mlp_bias``): ``"store"`` or ``"skip"``.
      embeddings: the token embedding ``[V, D]``: ``"compress"`` it like a linear with the same method and
        budget but data-free (identity Hessian), ``"store"`` the dense delta, or ``"skip"``.
      lm_head: the untied output head ``[V, D]``: same choices (ignored for tied embeddings).
      store_dtype: ``"float16"`` or ``"float32"`` for stored dense deltas.

    Whatever is stored is counted in the reported model-level ratio. A delta that is exactly zero is
    recorded as zero and costs nothing, whatever the policy.
    """
    norms: str = "store"
    biases: str = "store"
    embeddings: str = "compress"
    lm_head: str = "compress"
    store_dtype: str = "float16"

    def __post_init__(self):
        for k, choices in POLICY_CHOICES.items():
            if getattr(self, k) not in choices:
                raise ValueError(f"policy {k}={getattr(self, k)!r}: choose one of {', '.join(choices)}")
        if self.store_dtype not in _STORE_DTYPES:
            raise ValueError(f"policy store_dtype={self.store_dtype!r}: choose one of {', '.join(_STORE_DTYPES)}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
