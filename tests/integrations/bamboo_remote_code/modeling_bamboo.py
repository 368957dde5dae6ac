"""Bamboo's hub remote code, reconstructed for the tests (see configuration_bamboo.py): transformers' Mistral of
the running version (4.41 for the hub code: SDPA attention with `is_causal=... and q_len > 1`,
`DynamicCache.from_legacy_cache`) with the dReLU MLP in every layer."""
import torch.nn as nn
from transformers.activations import ACT2FN
from transformers.models.mistral.modeling_mistral import MistralForCausalLM, MistralModel

from .configuration_bamboo import BambooConfig


class BambooMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.hidden_size = config.hidden_size
        self.intermediate_size = config.intermediate_size
        self.gate_proj = nn.Linear(self.hidden_size, self.intermediate_size, bias=False)
        self.up_proj = nn.Linear(self.hidden_size, self.intermediate_size, bias=False)
        self.down_proj = nn.Linear(self.intermediate_size, self.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.act_fn(self.up_proj(x)))


class BambooModel(MistralModel):
    config_class = BambooConfig

    def __init__(self, config: BambooConfig):
        super().__init__(config)
        for layer in self.layers:
            layer.mlp = BambooMLP(config)
        self.post_init()


class BambooForCausalLM(MistralForCausalLM):
    config_class = BambooConfig

    def __init__(self, config: BambooConfig):
        super().__init__(config)
        self.model = BambooModel(config)
        self.post_init()
