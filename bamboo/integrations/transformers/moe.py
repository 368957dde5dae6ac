"""An experts implementation for transformers-5 MoE blocks (3-D stacked `gate_up_proj` / `down_proj`) that runs
each expert as its own FFN on the tokens routed to it: `linear(x, gate_up_proj[e])`, chunk, act, multiply,
`linear(., down_proj[e])`. transformers' `grouped_mm` (its default) multiplies all experts in one call with
tokens grouped by offsets, which the fused op cannot take; its `eager` loop iterates over a data-dependent
tensor, which torch.export cannot capture. This loop has a static trip count, so both capture paths see every
expert, and the op receives `w[e]` views of the stacked weights on each call (never a baked copy)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

NAME = "bamboo"


def _linear(x, weight, bias, transposed: bool):
    return x @ weight + bias if transposed and bias is not None else (
        x @ weight if transposed else F.linear(x, weight, bias))


def per_expert_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                       top_k_weights: torch.Tensor) -> torch.Tensor:
    final = torch.zeros_like(hidden_states)
    transposed = getattr(self, "is_transposed", False)
    has_gate, has_bias = getattr(self, "has_gate", True), getattr(self, "has_bias", False)
    for e in range(self.num_experts):
        token_idx, k_pos = torch.where(top_k_index == e)
        x = hidden_states[token_idx]
        if has_gate:
            h = _linear(x, self.gate_up_proj[e], self.gate_up_proj_bias[e] if has_bias else None, transposed)
            h = self._apply_gate(h)
        else:
            h = self.act_fn(_linear(x, self.up_proj[e], self.up_proj_bias[e] if has_bias else None, transposed))
        y = _linear(h, self.down_proj[e], self.down_proj_bias[e] if has_bias else None, transposed)
        y = y * top_k_weights[token_idx, k_pos, None]
        final.index_add_(0, token_idx, y.to(final.dtype))
    return final


def register() -> None:
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    ALL_EXPERTS_FUNCTIONS.register(NAME, per_expert_forward)
