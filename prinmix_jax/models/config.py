"""One frozen config for the Llama-style decoder families (Llama, Mistral, Qwen2, Qwen3).

:class:`ModelConfig` is read from a Hugging Face ``config.json`` in either the transformers 4.x layout
(``rope_theta`` + ``rope_scaling``, ``torch_dtype``) or the 5.x layout (``rope_parameters``, ``dtype``).
Keys that a config.json may omit take the same default as the transformers config class of that family,
so a checkpoint means the same model here as in transformers. It is hashable, so it can be a static
argument of ``jax.jit``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from prinmix_jax.models.errors import CheckpointError, UnsupportedArchitectureError

__all__ = ["ModelConfig", "RopeConfig", "SUPPORTED_ARCHITECTURES", "SUPPORTED_ROPE_TYPES"]


@dataclasses.dataclass(frozen=True)
class _Family:
    architecture: str
    max_position_embeddings: int
    num_kv_heads: int | None  # None: same as num_attention_heads
    head_dim: int | None  # None: hidden_size // num_attention_heads
    sliding_window: int | None  # default when the key is absent


_FAMILIES: dict[str, _Family] = {
    "llama": _Family("LlamaForCausalLM", 2048, None, None, None),
    "mistral": _Family("MistralForCausalLM", 4096 * 32, 8, None, 4096),
    "qwen2": _Family("Qwen2ForCausalLM", 32768, None, None, 4096),
    "qwen3": _Family("Qwen3ForCausalLM", 32768, None, 128, 4096),
}

#: Hugging Face ``architectures`` entries this package can load, in the order of ``_FAMILIES``.
SUPPORTED_ARCHITECTURES: tuple[str, ...] = tuple(f.architecture for f in _FAMILIES.values())
#: ``rope_type`` values implemented by :func:`prinmix_jax.models.rope.rope_frequencies`.
SUPPORTED_ROPE_TYPES: tuple[str, ...] = ("default", "linear", "dynamic", "llama3", "yarn")
_ARCH_TO_TYPE = {f.architecture: t for t, f in _FAMILIES.items()}


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary position embedding settings (the ``rope_parameters`` of transformers 5).

    Attributes:
      rope_type: one of :data:`SUPPORTED_ROPE_TYPES`.
      theta: base wavelength (``rope_theta``).
      factor: scaling factor (linear, dynamic, llama3, yarn).
      low_freq_factor, high_freq_factor: llama3 smoothing band.
      original_max_position_embeddings: pre-training context (llama3, yarn).
      attention_factor, beta_fast, beta_slow, mscale, mscale_all_dim, truncate: yarn options.
    """

    rope_type: str = "default"
    theta: float = 10000.0
    factor: float | None = None
    low_freq_factor: float | None = None
    high_freq_factor: float | None = None
    original_max_position_embeddings: int | None = None
    attention_factor: float | None = None
    beta_fast: float | None = None
    beta_slow: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True

    def to_hf_dict(self) -> dict[str, Any]:
        """The transformers-5 ``rope_parameters`` dict (only the keys that are set)."""
        out: dict[str, Any] = {"rope_type": self.rope_type, "rope_theta": self.theta}
        for f in dataclasses.fields(self):
            if f.name in ("rope_type", "theta", "truncate"):
                continue
            if getattr(self, f.name) is not None:
                out[f.name] = getattr(self, f.name)
        if self.rope_type == "yarn" and not self.truncate:
            out["truncate"] = False
        return out


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape and switches of one decoder-only LM (Llama / Mistral / Qwen2 / Qwen3).

    Attributes:
      model_type: "llama", "mistral", "qwen2" or "qwen3".
      vocab_size, hidden_size, intermediate_size: V, D and F.
      num_layers: number of decoder blocks.
      num_heads, num_kv_heads, head_dim: N query heads, K key/value heads (grouped-query), H per head.
      rms_norm_eps: epsilon of every RMSNorm.
      rope: rotary embedding settings.
      max_position_embeddings: context length from the config (used by dynamic/yarn/llama3 rope).
      qkv_bias: q/k/v projections carry a bias (Qwen2; Llama/Qwen3 with ``attention_bias``).
      o_bias: o projection carries a bias (Llama/Qwen3 with ``attention_bias``).
      mlp_bias: gate/up/down carry biases (Llama ``mlp_bias``).
      qk_norm: per-head RMSNorm on queries and keys before rope (Qwen3).
      tie_word_embeddings: the output head reuses the input embedding (no ``lm_head`` tensor).
      sliding_window: window length for layers of type "sliding_attention" (None: no window).
      layer_types: per-layer "full_attention" / "sliding_attention".
      hidden_act: MLP activation; only "silu" is implemented.
      dtype: dtype name recorded in config.json ("bfloat16", "float32", ...), or None.
      architecture: the Hugging Face architecture name, e.g. "LlamaForCausalLM".
      hf_config_json: the original config.json text (kept so saving preserves unknown keys);
        excluded from equality and hashing.
    """

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope: RopeConfig = RopeConfig()
    max_position_embeddings: int = 2048
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    tie_word_embeddings: bool = False
    sliding_window: int | None = None
    layer_types: tuple[str, ...] = ()
    hidden_act: str = "silu"
    dtype: str | None = None
    architecture: str = ""
    hf_config_json: str | None = dataclasses.field(default=None, compare=False, hash=False, repr=False)

    def __post_init__(self):
        if self.model_type not in _FAMILIES:
            raise UnsupportedArchitectureError(
                f"unsupported model_type {self.model_type!r}; supported: {sorted(_FAMILIES)}")
        if not self.architecture:
            object.__setattr__(self, "architecture", _FAMILIES[self.model_type].architecture)
        if not self.layer_types:
            object.__setattr__(self, "layer_types", ("full_attention",) * self.num_layers)
        if len(self.layer_types) != self.num_layers:
            raise CheckpointError(
                f"layer_types has {len(self.layer_types)} entries but num_hidden_layers is {self.num_layers}")
        if self.num_heads % self.num_kv_heads:
            raise CheckpointError(f"num_attention_heads={self.num_heads} is not a multiple of "
                                  f"num_key_value_heads={self.num_kv_heads}")
        if self.head_dim % 2:
            raise CheckpointError(f"head_dim={self.head_dim} must be even for rotary embeddings")

    # ----- derived sizes -------------------------------------------------------------------
    @property
    def q_dim(self) -> int:
        """Width of the q projection output, N * H."""
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        """Width of the k and v projection outputs, K * H."""
        return self.num_kv_heads * self.head_dim

    def window(self, layer: int) -> int | None:
        """Sliding-window length used by decoder block ``layer`` (None: full causal attention)."""
        return self.sliding_window if self.layer_types[layer] == "sliding_attention" else None

    # ----- reading -------------------------------------------------------------------------
    @classmethod
    def from_pretrained_dir(cls, path: str | os.PathLike) -> "ModelConfig":
        """Read ``<path>/config.json``.

        Raises:
          FileNotFoundError: the folder or its config.json does not exist.
          CheckpointError: the file is not valid JSON or lacks a required key.
          UnsupportedArchitectureError: the architecture is not supported.
        """
        path = os.fspath(path)
        cfg_path = os.path.join(path, "config.json") if os.path.isdir(path) else path
        if not os.path.isfile(cfg_path):
            raise FileNotFoundError(f"no config.json found at {cfg_path!r} (expected a Hugging Face checkpoint "
                                    "folder holding config.json and *.safetensors)")
        try:
            with open(cfg_path, encoding="utf-8") as f:
                d = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{cfg_path}: not valid JSON ({e})") from e
        if not isinstance(d, dict):
            raise CheckpointError(f"{cfg_path}: expected a JSON object, got {type(d).__name__}")
        return cls.from_hf_config(d, source=cfg_path)

    @classmethod
    def from_hf_config(cls, d: dict[str, Any], source: str = "config.json") -> "ModelConfig":
        """Build a config from a config.json dict (transformers 4.x or 5.x layout).

        Args:
          d: the parsed config.json.
          source: file name used in error messages.
        """
        model_type = _model_type(d, source)
        fam = _FAMILIES[model_type]

        def req(key):
            if d.get(key) is None:
                raise CheckpointError(f"{source}: required key {key!r} is missing")
            return d[key]

        hidden, heads = int(req("hidden_size")), int(req("num_attention_heads"))
        num_layers = int(req("num_hidden_layers"))
        kv = d.get("num_key_value_heads") or fam.num_kv_heads or heads
        head_dim = d.get("head_dim") or fam.head_dim or hidden // heads
        max_pos = int(d.get("max_position_embeddings") or fam.max_position_embeddings)
        act = d.get("hidden_act", "silu")
        if act != "silu":
            raise CheckpointError(f"{source}: hidden_act {act!r} is not implemented (only 'silu')")
        if d.get("partial_rotary_factor", 1.0) not in (None, 1.0):
            raise CheckpointError(f"{source}: partial_rotary_factor != 1 is not implemented")

        attn_bias = bool(d.get("attention_bias", False))
        qkv_bias = o_bias = mlp_bias = qk_norm = False
        if model_type == "llama":
            qkv_bias = o_bias = attn_bias
            mlp_bias = bool(d.get("mlp_bias", False))
        elif model_type == "qwen2":
            qkv_bias = True
        elif model_type == "qwen3":
            qkv_bias = o_bias = attn_bias
            qk_norm = True

        sliding, layer_types = _sliding_layers(d, model_type, num_layers, source)

        return cls(
            model_type=model_type,
            vocab_size=int(req("vocab_size")),
            hidden_size=hidden,
            intermediate_size=int(req("intermediate_size")),
            num_layers=num_layers,
            num_heads=heads,
            num_kv_heads=int(kv),
            head_dim=int(head_dim),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope=_parse_rope(d, max_pos, source),
            max_position_embeddings=max_pos,
            qkv_bias=qkv_bias,
            o_bias=o_bias,
            mlp_bias=mlp_bias,
            qk_norm=qk_norm,
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            sliding_window=int(sliding) if sliding else None,
            layer_types=layer_types or (),
            hidden_act=act,
            dtype=d.get("dtype") or d.get("torch_dtype"),
            architecture=fam.architecture,
            hf_config_json=json.dumps(d),
        )

    # ----- writing -------------------------------------------------------------------------
    def to_hf_dict(self, dtype: str | None = None) -> dict[str, Any]:
        """A config.json dict that transformers reads back as this model.

        Starts from the original config.json (when this config was read from one), so keys this package
        does not model (token ids, generation settings) survive; the fields modelled here are written
        over it. The rope settings keep the layout of the original file (4.x ``rope_theta`` +
        ``rope_scaling`` or 5.x ``rope_parameters``); configs built from scratch use the 5.x layout.

        Args:
          dtype: dtype name to record (e.g. "bfloat16"); default: ``self.dtype``.
        """
        d: dict[str, Any] = json.loads(self.hf_config_json) if self.hf_config_json else {}
        legacy_rope = bool(d) and "rope_parameters" not in d
        for k in ("rope_theta", "rope_scaling", "rope_parameters"):
            d.pop(k, None)
        d.update(
            architectures=[self.architecture],
            model_type=self.model_type,
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            rms_norm_eps=self.rms_norm_eps,
            max_position_embeddings=self.max_position_embeddings,
            tie_word_embeddings=self.tie_word_embeddings,
            hidden_act=self.hidden_act,
        )
        if self.model_type == "llama":
            if self.qkv_bias != self.o_bias:
                raise CheckpointError("Llama configs cannot express q/k/v bias without o bias")
            d.update(attention_bias=self.qkv_bias, mlp_bias=self.mlp_bias)
        elif self.model_type == "qwen3":
            d.update(attention_bias=self.qkv_bias)
        if self.model_type == "mistral":
            d["sliding_window"] = self.sliding_window
        elif self.model_type in ("qwen2", "qwen3"):
            d["use_sliding_window"] = self.sliding_window is not None
            d["sliding_window"] = self.sliding_window
            d["layer_types"] = list(self.layer_types)
        rope = self.rope.to_hf_dict()
        if legacy_rope:
            d["rope_theta"] = rope.pop("rope_theta")
            d["rope_scaling"] = None if rope["rope_type"] == "default" else rope
        else:
            d["rope_parameters"] = rope
        dtype = dtype or self.dtype
        d.pop("torch_dtype", None)
        if dtype:
            d["dtype"] = dtype
        return d


def _model_type(d: dict[str, Any], source: str) -> str:
    """The supported ``model_type`` of a config.json dict, checked against its ``architectures``."""
    archs = d.get("architectures") or []
    model_type = d.get("model_type")
    supported = ", ".join(SUPPORTED_ARCHITECTURES)
    for arch in archs:
        if arch not in _ARCH_TO_TYPE:
            raise UnsupportedArchitectureError(
                f"{source}: unsupported architecture {arch!r} (model_type {model_type!r}); "
                f"supported architectures: {supported}")
    if model_type is None and archs:
        model_type = _ARCH_TO_TYPE[archs[0]]
    if model_type not in _FAMILIES:
        raise UnsupportedArchitectureError(
            f"{source}: unsupported model_type {model_type!r} (architectures {archs}); "
            f"supported architectures: {supported}")
    for arch in archs:
        if _ARCH_TO_TYPE[arch] != model_type:
            raise CheckpointError(f"{source}: architecture {arch!r} does not match model_type {model_type!r}")
    return model_type


def _sliding_layers(d: dict[str, Any], model_type: str, num_layers: int, source: str
                    ) -> tuple[int | None, tuple[str, ...] | None]:
    """``(sliding_window, layer_types)`` of a config.json dict (None, None: full attention everywhere)."""
    fam = _FAMILIES[model_type]
    sliding, layer_types = None, None
    if model_type == "mistral":
        sliding = d.get("sliding_window", fam.sliding_window)
        layer_types = ("sliding_attention" if sliding else "full_attention",) * num_layers
    elif model_type in ("qwen2", "qwen3"):
        sliding = d.get("sliding_window", fam.sliding_window) if d.get("use_sliding_window") else None
        if d.get("layer_types"):
            layer_types = tuple(d["layer_types"])
        else:
            mwl = d.get("max_window_layers", 28)
            layer_types = tuple("sliding_attention" if sliding is not None and i >= mwl else "full_attention"
                                for i in range(num_layers))
    for t in layer_types or ():
        if t not in ("full_attention", "sliding_attention"):
            raise CheckpointError(f"{source}: layer type {t!r} is not supported")
    if layer_types and "sliding_attention" in layer_types and not sliding:
        raise CheckpointError(f"{source}: layer_types has sliding_attention layers but no sliding_window")
    return sliding, layer_types


def _parse_rope(d: dict[str, Any], max_pos: int, source: str) -> RopeConfig:
    """Read rope settings from either config layout into a :class:`RopeConfig`."""
    rp = d.get("rope_parameters")
    if isinstance(rp, dict) and rp and all(isinstance(v, dict) for v in rp.values()):
        # 5.x nested per layer type: accept only when all layer types agree.
        vals = list(rp.values())
        if any(v != vals[0] for v in vals[1:]):
            raise CheckpointError(f"{source}: per-layer-type rope_parameters that differ are not supported")
        rp = vals[0]
    if not rp:
        rp = dict(d.get("rope_scaling") or {})
    rp = dict(rp)
    rope_type = rp.get("rope_type", rp.get("type", "default"))
    theta = float(rp.get("rope_theta", d.get("rope_theta", 10000.0)))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise CheckpointError(f"{source}: rope type {rope_type!r} is not supported; "
                              f"supported: {', '.join(SUPPORTED_ROPE_TYPES)}")

    def need(key):
        if rp.get(key) is None:
            raise CheckpointError(f"{source}: rope type {rope_type!r} requires {key!r} in the rope parameters")
        return float(rp[key])

    kw: dict[str, Any] = {"rope_type": rope_type, "theta": theta}
    if rope_type in ("linear", "dynamic", "llama3"):
        kw["factor"] = need("factor")
    if rope_type in ("llama3", "yarn"):
        kw["original_max_position_embeddings"] = int(
            d.get("original_max_position_embeddings") or rp.get("original_max_position_embeddings") or max_pos)
    if rope_type == "llama3":
        kw["low_freq_factor"] = need("low_freq_factor")
        kw["high_freq_factor"] = need("high_freq_factor")
    if rope_type == "yarn":
        for k in ("factor", "attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim"):
            if rp.get(k) is not None:
                kw[k] = float(rp[k])
        kw["truncate"] = bool(rp.get("truncate", True))
    return RopeConfig(**kw)
