"""Llama model configuration: read from Hugging Face `config.json` or Meta `params.json`, validated once.

The field names and defaults are those of Hugging Face's `LlamaConfig`; transformers 5.x's
`rope_parameters` is read as well as Llama 2's `rope_scaling` / `rope_theta`.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

from .errors import ExportError

ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn")
DTYPES = ("float32", "float16", "bfloat16")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    vocab_size: int = 32000
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    attention_bias: bool = False
    mlp_bias: bool = False
    pretraining_tp: int = 1
    tie_word_embeddings: bool = False
    torch_dtype: str = "float16"
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        # Fill the derived defaults the way LlamaConfig does, then validate everything once.
        if self.num_key_value_heads is None:
            object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
        if self.head_dim is None:
            if self.num_attention_heads <= 0 or self.hidden_size % self.num_attention_heads:
                raise ExportError(
                    f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                    f"{self.num_attention_heads}; set head_dim explicitly or fix the head count"
                )
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if self.rope_scaling is not None:
            scaling = dict(self.rope_scaling)
            # Older configs name the key "type"; LlamaConfig accepts both.
            if "rope_type" not in scaling and "type" in scaling:
                scaling["rope_type"] = scaling["type"]
            scaling.pop("type", None)
            scaling.setdefault("rope_type", "default")
            object.__setattr__(self, "rope_scaling", scaling)
        self._validate()

    @property
    def rope_type(self) -> str:
        return (self.rope_scaling or {}).get("rope_type", "default")

    @property
    def num_key_value_groups(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    def _validate(self) -> None:
        positive = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                    "num_key_value_heads", "head_dim", "vocab_size", "max_position_embeddings", "pretraining_tp")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ExportError(f"config value {name}={value!r} must be a positive integer")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ExportError(
                f"num_attention_heads={self.num_attention_heads} is not divisible by "
                f"num_key_value_heads={self.num_key_value_heads}; grouped-query attention needs each "
                f"key/value head to serve a whole number of query heads"
            )
        if self.head_dim % 2:
            raise ExportError(f"head_dim={self.head_dim} must be even for rotary embeddings")
        if self.torch_dtype not in DTYPES:
            raise ExportError(f"torch_dtype={self.torch_dtype!r} is not supported; use one of {', '.join(DTYPES)}")
        if self.rope_type not in ROPE_TYPES:
            raise ExportError(
                f"unknown rope type {self.rope_type!r} in rope_scaling; supported: {', '.join(ROPE_TYPES)}"
            )
        required = {"linear": ("factor",), "dynamic": ("factor",), "yarn": ("factor",),
                    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}
        for key in required.get(self.rope_type, ()):
            if key not in self.rope_scaling:
                raise ExportError(f"rope_scaling of type {self.rope_type!r} needs {key!r}: {self.rope_scaling}")
        if not (isinstance(self.rope_theta, (int, float)) and self.rope_theta > 0 and math.isfinite(self.rope_theta)):
            raise ExportError(f"rope_theta={self.rope_theta!r} must be a positive number (Llama 2: 10000.0)")
        if not (isinstance(self.rms_norm_eps, (int, float)) and 0 < self.rms_norm_eps < 1):
            raise ExportError(f"rms_norm_eps={self.rms_norm_eps!r} must be in (0, 1) (Llama 2: 1e-05)")
        self._validate_rope_factors()

    def _validate_rope_factors(self) -> None:
        """The ranges transformers' rope validation asks for: factor >= 1; llama3 low < high frequency factor."""
        scaling = self.rope_scaling or {}
        factor = scaling.get("factor")
        if factor is not None and not (isinstance(factor, (int, float)) and not isinstance(factor, bool)
                                       and math.isfinite(factor) and factor >= 1):
            raise ExportError(f"rope_scaling factor={factor!r} is out of range: it stretches the positions, so it "
                              f"must be a number >= 1 (e.g. 2.0 for twice the context)")
        if self.rope_type == "llama3":
            low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
            original = scaling["original_max_position_embeddings"]
            if not (isinstance(low, (int, float)) and isinstance(high, (int, float)) and 0 < low < high):
                raise ExportError(f"rope_scaling low_freq_factor={low!r} and high_freq_factor={high!r} are out of "
                                  f"range: llama3 scaling needs 0 < low_freq_factor < high_freq_factor (e.g. 1 and 4)")
            if not isinstance(original, int) or isinstance(original, bool) or original <= 0:
                raise ExportError(f"rope_scaling original_max_position_embeddings={original!r} must be a positive "
                                  f"integer")
        tp_dims = {"num_attention_heads": self.num_attention_heads, "num_key_value_heads": self.num_key_value_heads,
                   "intermediate_size": self.intermediate_size, "vocab_size": self.vocab_size}
        for name, value in tp_dims.items():
            if value % self.pretraining_tp:
                raise ExportError(f"pretraining_tp={self.pretraining_tp} does not divide {name}={value}")

    # ---- readers -------------------------------------------------------------------------

    @classmethod
    def from_hf_dict(cls, raw: dict[str, Any], source: str = "config.json") -> "LlamaConfig":
        model_type = raw.get("model_type", "llama")
        if model_type != "llama":
            raise ExportError(f"{source}: model_type is {model_type!r}, expected 'llama'")
        act = raw.get("hidden_act", "silu")
        if act != "silu":
            raise ExportError(f"{source}: hidden_act={act!r} is not supported; Llama uses 'silu'")
        fields = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in raw.items() if k in fields}
        # transformers 5.x: rope_parameters carries rope_theta and the scaling in one dict.
        rope_parameters = raw.get("rope_parameters")
        if isinstance(rope_parameters, dict):
            params = dict(rope_parameters)
            if "rope_theta" in params:
                values["rope_theta"] = params.pop("rope_theta")
            rope_type = params.get("rope_type", params.get("type", "default"))
            if values.get("rope_scaling") is None and rope_type != "default":
                values["rope_scaling"] = params
        dtype = values.get("torch_dtype", raw.get("dtype"))
        values["torch_dtype"] = str(dtype or "float16").replace("torch.", "")
        for key in ("bos_token_id", "eos_token_id"):
            if isinstance(values.get(key), list):
                values[key] = values[key][0]
        if values.get("rope_theta") is not None:
            values["rope_theta"] = float(values["rope_theta"])
        try:
            return cls(**values)
        except ExportError as err:
            raise ExportError(f"{source}: {err}") from None
        except TypeError as err:
            raise ExportError(f"{source}: {err}") from None

    @classmethod
    def from_meta_params(cls, raw: dict[str, Any], vocab_size: int, source: str = "params.json") -> "LlamaConfig":
        """Meta's params.json; the vocabulary size comes from the embedding when params says -1."""
        try:
            dim, n_heads, n_layers = raw["dim"], raw["n_heads"], raw["n_layers"]
        except KeyError as err:
            raise ExportError(f"{source}: missing key {err.args[0]!r}; is this a Llama params.json?") from None
        multiple_of = raw.get("multiple_of", 256)
        hidden = int(2 * (4 * dim) / 3)
        if raw.get("ffn_dim_multiplier") is not None:
            hidden = int(raw["ffn_dim_multiplier"] * hidden)
        hidden = multiple_of * ((hidden + multiple_of - 1) // multiple_of)
        if raw.get("vocab_size", -1) > 0:
            vocab_size = raw["vocab_size"]
        try:
            return cls(
                hidden_size=dim, intermediate_size=hidden, num_hidden_layers=n_layers,
                num_attention_heads=n_heads, num_key_value_heads=raw.get("n_kv_heads") or n_heads,
                vocab_size=vocab_size, rms_norm_eps=float(raw.get("norm_eps", 1e-5)),
                rope_theta=float(raw.get("rope_theta", 10000.0)),
                max_position_embeddings=int(raw.get("max_seq_len", 4096)), torch_dtype="float16",
            )
        except ExportError as err:
            raise ExportError(f"{source}: {err}") from None

    @classmethod
    def from_file(cls, path: str | Path) -> "LlamaConfig":
        return cls.from_hf_dict(read_json(path), source=str(path))

    def to_hf_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out.update(architectures=["LlamaForCausalLM"], model_type="llama", hidden_act="silu",
                   attention_dropout=0.0, initializer_range=0.02, use_cache=True)
        return out

    def replace(self, **changes: Any) -> "LlamaConfig":
        return dataclasses.replace(self, **changes)

    def num_parameters(self) -> int:
        h, i, d = self.hidden_size, self.intermediate_size, self.head_dim
        q, kv = self.num_attention_heads * d, self.num_key_value_heads * d
        attn = h * q + 2 * h * kv + q * h + (q + 2 * kv + h if self.attention_bias else 0)
        mlp = 3 * h * i + (2 * i + h if self.mlp_bias else 0)
        layer = attn + mlp + 2 * h
        embed = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return self.num_hidden_layers * layer + embed + h


def read_json(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"{path}: file not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ExportError(f"{path}: not valid JSON ({err}); re-download or repair the file") from None
    if not isinstance(data, dict):
        raise ExportError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data

