"""BambooConfig: the fields of a Bamboo checkpoint's config.json, with validation and named presets."""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, Optional

from bamboo.errors import ConfigError

MODEL_TYPE = "bamboo"


@dataclass
class BambooConfig:
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 14336
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: Optional[int] = None  # None: hidden_size // num_attention_heads
    hidden_act: str = "relu"
    max_position_embeddings: int = 32768
    sliding_window: Optional[int] = 4096
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    initializer_range: float = 0.02
    tie_word_embeddings: bool = False
    attention_dropout: float = 0.0
    bos_token_id: Optional[int] = 1
    eos_token_id: Optional[int] = 2
    pad_token_id: Optional[int] = None
    use_cache: bool = True
    torch_dtype: Optional[str] = "bfloat16"
    num_labels: int = 2
    model_type: str = MODEL_TYPE
    architectures: list = field(default_factory=lambda: ["BambooForCausalLM"])
    # Keys of config.json that bamboo does not use (auto_map, transformers_version, ...): kept for round trips.
    extra: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        self.validate()

    # -- derived sizes ------------------------------------------------------------------------------
    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_attention_heads

    # -- validation -----------------------------------------------------------------------------------
    def validate(self) -> None:
        if self.model_type != MODEL_TYPE:
            raise ConfigError(
                f"config has model_type={self.model_type!r}, expected {MODEL_TYPE!r}: this is not a Bamboo "
                "checkpoint. Point bamboo at a Bamboo model directory, or set model_type to 'bamboo' if the "
                "architecture really is Bamboo's."
            )
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"config field {name} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of num_key_value_heads "
                f"({self.num_key_value_heads}) for grouped-query attention"
            )
        if self.head_dim is None and self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"hidden_size ({self.hidden_size}) is not divisible by num_attention_heads "
                f"({self.num_attention_heads}); set head_dim explicitly"
            )
        if self.resolved_head_dim % 2:
            raise ConfigError(f"head_dim must be even for rotary embeddings, got {self.resolved_head_dim}")
        if self.sliding_window is not None and (not isinstance(self.sliding_window, int) or self.sliding_window <= 0):
            raise ConfigError(f"sliding_window must be a positive integer or null, got {self.sliding_window!r}")
        if self.hidden_act not in ACTIVATIONS:
            raise ConfigError(
                f"hidden_act={self.hidden_act!r} is not supported; use one of {sorted(ACTIVATIONS)} "
                "(Bamboo uses 'relu')"
            )
        if not (self.rms_norm_eps > 0 and self.rope_theta > 0):
            raise ConfigError("rms_norm_eps and rope_theta must be positive")
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = getattr(self, name)
            if value is not None and not (0 <= value < self.vocab_size):
                raise ConfigError(f"{name}={value} is outside the vocabulary (size {self.vocab_size})")

    # -- JSON ---------------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        return {**self.extra, **data}

    @classmethod
    def from_dict(cls, data: dict) -> "BambooConfig":
        if not isinstance(data, dict):
            raise ConfigError(f"a config must be a JSON object, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        kwargs = {k: v for k, v in data.items() if k in known}
        extra = {k: v for k, v in data.items() if k not in known}
        kwargs.setdefault("model_type", data.get("model_type", MODEL_TYPE))
        if isinstance(kwargs.get("eos_token_id"), list):  # some configs list several eos ids
            extra["eos_token_ids"] = kwargs["eos_token_id"]
            kwargs["eos_token_id"] = kwargs["eos_token_id"][0]
        try:
            return cls(**kwargs, extra=extra)
        except TypeError as exc:
            raise ConfigError(f"invalid config: {exc}") from None

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def save(self, path: str | os.PathLike) -> None:
        with open(path, "w", encoding="utf-8") as f:
            f.write(self.to_json_string())

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> "BambooConfig":
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except FileNotFoundError:
            raise ConfigError(f"no config file at {path}: a Bamboo checkpoint directory needs config.json") from None
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path} is not valid JSON ({exc}); re-save or re-download the checkpoint") from None
        return cls.from_dict(data)

    def replace(self, **changes: Any) -> "BambooConfig":
        return dataclasses.replace(self, **changes)

    # -- presets --------------------------------------------------------------------------------------
    @classmethod
    def named(cls, name: str, **overrides: Any) -> "BambooConfig":
        if name not in NAMED_CONFIGS:
            raise ConfigError(f"unknown config name {name!r}; choose one of {sorted(NAMED_CONFIGS)}")
        return cls(**{**NAMED_CONFIGS[name], **overrides})


ACTIVATIONS = {"relu", "silu", "gelu", "gelu_pytorch_tanh"}

NAMED_CONFIGS: dict[str, dict] = {
    # PowerInfer/Bamboo-base-v0_1 and Bamboo-DPO-v0_1.
    "bamboo-7b": {},
    # Same architecture, small enough for tests and the demo on a CPU (about 9M parameters, most in the embedding).
    "tiny": dict(
        hidden_size=128, intermediate_size=448, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=2048, sliding_window=4096, torch_dtype="float32",
    ),
    # The small dReLU model bamboo trains on Jane Austen's novels (examples/train_small_bamboo.py): 14M parameters.
    "austen-small": dict(
        hidden_size=256, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=2048, sliding_window=4096, tie_word_embeddings=True, torch_dtype="bfloat16",
    ),
}
