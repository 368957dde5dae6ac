"""The Bamboo model family: config, models, checkpoints, generation and the tokenizer wrapper."""
from bamboo.models.config import NAMED_CONFIGS, BambooConfig
from bamboo.models.modeling import (
    BambooForCausalLM,
    BambooForSequenceClassification,
    BambooMLP,
    BambooModel,
)

__all__ = [
    "NAMED_CONFIGS",
    "BambooConfig",
    "BambooForCausalLM",
    "BambooForSequenceClassification",
    "BambooMLP",
    "BambooModel",
]
