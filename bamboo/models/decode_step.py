"""The Bamboo model's cached step as a pure function, for exporters that cannot keep state (ONNX): the KV
cache comes in as inputs and the updated cache goes out as outputs.

    step = BambooDecodeStep(model)
    logits, *cache = step(input_ids, attention_mask, position_ids, cache_position, *cache)

The same function does the prefill (input_ids [batch, prompt]) and each decode step (input_ids [batch, 1]).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from bamboo.errors import InputError


class FunctionalKVCache(nn.Module):
    """A KV cache whose update returns new tensors (out-of-place index_copy) instead of writing in place."""

    def __init__(self, k_cache: torch.Tensor, v_cache: torch.Tensor):
        super().__init__()
        self.k_cache, self.v_cache = k_cache, v_cache

    def update(self, cache_position, k, v):
        self.k_cache = self.k_cache.index_copy(2, cache_position, k)
        self.v_cache = self.v_cache.index_copy(2, cache_position, v)
        return self.k_cache, self.v_cache


class BambooDecodeStep(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    @property
    def layers(self):
        return self.model.base_model.layers

    def empty_cache(self, batch_size: int, max_seq_len: int, dtype=None, device=None) -> list[torch.Tensor]:
        param = next(self.model.parameters())
        shape = self.model.kv_cache_shape(batch_size, max_seq_len)
        return [torch.zeros(shape, dtype=dtype or param.dtype, device=device or param.device)
                for _ in range(2 * len(self.layers))]

    def example_inputs(self, max_seq_len: int, batch_size: int = 2, prompt_len: int = 3) -> tuple:
        """Example inputs for exporting the step: a prefill of `prompt_len` tokens into an empty cache of
        `max_seq_len` slots (batch and prompt of at least 2 keep those dims dynamic in the export)."""
        device = next(self.model.parameters()).device
        slots = torch.arange(prompt_len, device=device)
        ids = torch.randint(3, self.model.config.vocab_size, (batch_size, prompt_len), device=device)
        mask = torch.ones(batch_size, max_seq_len, dtype=torch.long, device=device)
        return (ids, mask, slots[None].expand(batch_size, prompt_len).contiguous(), slots,
                *self.empty_cache(batch_size, max_seq_len))

    def forward(self, input_ids, attention_mask, position_ids, cache_position, *cache):
        layers = self.layers
        if len(cache) != 2 * len(layers):
            raise InputError(f"the decode step takes 2 cache tensors per layer ({2 * len(layers)}), got {len(cache)}; "
                             "make them with empty_cache(batch, max_seq_len)")
        previous = [layer.self_attn.kv_cache for layer in layers]
        try:
            for i, layer in enumerate(layers):
                layer.self_attn.kv_cache = FunctionalKVCache(cache[2 * i], cache[2 * i + 1])
            logits = self.model(input_ids, attention_mask, position_ids, cache_position)
            updated = [t for layer in layers for t in (layer.self_attn.kv_cache.k_cache, layer.self_attn.kv_cache.v_cache)]
        finally:
            for layer, old in zip(layers, previous):
                layer.self_attn.kv_cache = old
        return (logits, *updated)


def greedy_generate_with_step(step, input_ids: torch.Tensor, max_new_tokens: int, cache) -> torch.Tensor:
    """Greedy generation driven by any callable with BambooDecodeStep's signature (a PyTorch step, or an ONNX
    Runtime session wrapped by bamboo's backend); no padding."""
    batch, prompt_len = input_ids.shape
    device = input_ids.device
    total = cache[0].shape[2]
    mask = torch.ones(batch, total, dtype=torch.long, device=device)
    slots = torch.arange(total, device=device)
    positions = slots[None].expand(batch, total).contiguous()
    outputs = step(input_ids, mask, positions[:, :prompt_len].contiguous(), slots[:prompt_len], *cache)
    logits, cache = outputs[0], list(outputs[1:])
    generated = [logits[:, -1].argmax(-1)]
    for t in range(prompt_len, prompt_len + max_new_tokens - 1):
        outputs = step(generated[-1][:, None], mask, positions[:, t:t + 1].contiguous(), slots[t:t + 1], *cache)
        logits, cache = outputs[0], list(outputs[1:])
        generated.append(logits[:, -1].argmax(-1))
    return torch.cat([input_ids, torch.stack(generated, 1)], 1)
