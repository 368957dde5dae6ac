"""The Bamboo model family: config, models, checkpoints, generation and the tokenizer wrapper."""
from bamboo.models.config import NAMED_CONFIGS, BambooConfig
from bamboo.models.modeling import (
    BambooForCausalLM,
    BambooForSequenceClassification,
    BambooMLP,
    BambooModel,
)


def pretrained_path(name: str = "austen-small"):
    """Directory of a checkpoint that ships with bamboo (the small dReLU model it trains itself)."""
    from pathlib import Path

    from bamboo.errors import InputError

    path = Path(__file__).parent / "pretrained" / name
    if not (path / "config.json").exists():
        raise InputError(f"no bundled checkpoint named {name!r}; bundled: "
                         f"{sorted(p.name for p in (Path(__file__).parent / 'pretrained').iterdir())}")
    return path


__all__ = [
    "pretrained_path",
    "NAMED_CONFIGS",
    "BambooConfig",
    "BambooForCausalLM",
    "BambooForSequenceClassification",
    "BambooMLP",
    "BambooModel",
]
