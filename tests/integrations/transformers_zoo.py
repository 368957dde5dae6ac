"""Tiny random-weight transformers models of the families users bring, as each family spells its FFN:
ReGLU (Mistral, Llama, Qwen2 with hidden_act="relu"), dReLU (Bamboo's MLP patched into Mistral), OPT's ReLU MLP,
Mixtral's 3-D stacked experts (transformers-5 grouped_mm default), Phi-3's fused gate_up + chunk, T5's ReLU
MLP with an (eval-mode) dropout before the down projection; and Bamboo's own hub remote code (a fork of the
running transformers' Mistral, loaded with trust_remote_code=True; written for transformers 4.41)."""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch

H, I, V = 32, 64, 128
FAMILIES = ["mistral", "mistral_drelu", "llama", "qwen2", "opt", "mixtral", "phi3", "t5", "bamboo_remote"]
EXPECTED_SITES = {"mistral": ("reglu", 2), "mistral_drelu": ("drelu", 2), "llama": ("reglu", 2),
                  "qwen2": ("reglu", 2), "opt": ("relu_mlp", 2), "mixtral": ("reglu", 8), "phi3": ("reglu", 2),
                  "t5": ("relu_mlp", 4), "bamboo_remote": ("drelu", 2)}
REMOTE_CODE = Path(__file__).parent / "bamboo_remote_code"


class DReLUMLP(torch.nn.Module):
    """Bamboo's FFN, as a user patches it into MistralMLP's place."""

    def __init__(self, config):
        super().__init__()
        self.gate_proj = torch.nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = torch.nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = torch.nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(torch.relu(self.gate_proj(x)) * torch.relu(self.up_proj(x)))


def build(family: str, seed: int = 1) -> torch.nn.Module:
    import transformers as tf

    common = dict(hidden_size=H, intermediate_size=I, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=V, max_position_embeddings=128, hidden_act="relu",
                  bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if family in ("mistral", "mistral_drelu"):
        model = tf.MistralForCausalLM(tf.MistralConfig(**common))
        if family == "mistral_drelu":
            for layer in model.model.layers:
                layer.mlp = DReLUMLP(model.config)
    elif family == "llama":
        model = tf.LlamaForCausalLM(tf.LlamaConfig(**common))
    elif family == "qwen2":
        model = tf.Qwen2ForCausalLM(tf.Qwen2Config(**common))
    elif family == "opt":
        model = tf.OPTForCausalLM(tf.OPTConfig(hidden_size=H, ffn_dim=I, num_hidden_layers=2, num_attention_heads=4,
                                               vocab_size=V, max_position_embeddings=128, word_embed_proj_dim=H,
                                               bos_token_id=1, eos_token_id=2, pad_token_id=0))
    elif family == "mixtral":
        model = tf.MixtralForCausalLM(tf.MixtralConfig(**common, num_local_experts=4, num_experts_per_tok=2))
    elif family == "phi3":
        model = tf.Phi3ForCausalLM(tf.Phi3Config(**common))
    elif family == "t5":
        model = tf.T5ForConditionalGeneration(tf.T5Config(
            vocab_size=V, d_model=H, d_kv=8, d_ff=I, num_layers=2, num_heads=4, feed_forward_proj="relu",
            decoder_start_token_id=0, pad_token_id=0, eos_token_id=2))
    elif family == "bamboo_remote":
        model = remote_code_model(common)
    else:
        raise ValueError(family)
    randomize(model, seed)
    return model.eval()


def remote_code_model(config: dict) -> torch.nn.Module:
    """Bamboo as its hub checkpoint gives it: config.json with an auto_map naming the checkpoint's own modeling
    files, built by transformers' Auto classes with trust_remote_code=True."""
    import transformers as tf

    directory = Path(tempfile.mkdtemp(prefix="bamboo-remote-"))
    for name in ("configuration_bamboo.py", "modeling_bamboo.py"):
        shutil.copy(REMOTE_CODE / name, directory / name)
    auto_map = {"AutoConfig": "configuration_bamboo.BambooConfig",
                "AutoModelForCausalLM": "modeling_bamboo.BambooForCausalLM"}
    (directory / "config.json").write_text(json.dumps({**config, "model_type": "bamboo", "auto_map": auto_map,
                                                       "architectures": ["BambooForCausalLM"]}))
    remote_config = tf.AutoConfig.from_pretrained(directory, trust_remote_code=True)
    model = tf.AutoModelForCausalLM.from_config(remote_config, trust_remote_code=True)
    shutil.rmtree(directory, ignore_errors=True)
    return model


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Random, non-symmetric weights (no zero biases, no unit norms): a rewrite that swaps gate and up, or
    drops a bias, shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3 + 0.05)


def example_kwargs(family: str, ids: torch.Tensor) -> dict:
    return {"decoder_input_ids": ids[:, :3]} if family == "t5" else {}


def logits(output) -> torch.Tensor:
    return output.logits if hasattr(output, "logits") else (output[0] if isinstance(output, tuple) else output)
