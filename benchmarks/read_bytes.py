"""Bytes a decode step reads, counted the way each backend's code reads them (the floors' numerators).

FFN rows per layer, from the layer's real input (the prompt's last token of every batch row, union over rows):
  dense             every gate, up and down row
  exact, Triton     the whole gate; up rows of the gate-active neurons (not -inf < gate <= 0 in some row);
                    down rows of the neurons whose product h is nonzero in some row (the down kernel skips h == 0)
  exact, ORT        the whole gate; up and down rows of the gate-active neurons (Gather by the gate's ids)
  predictor, Triton the predictor; gate and up rows of the selected neurons; down rows of those with h != 0
  predictor, ORT    the predictor; gate, up and down rows of the selected neurons
Outside the FFN: every other weight except the input embedding (decode gathers one row of it per token; a tied
embedding is read whole as the LM head) and the static KV cache, which attention reads whole at every step.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from bamboo.ops.sparse_ffn import exact_active, predictor_selection
from benchmarks.common import predictor_bytes


@dataclass
class FFNInput:
    mlp: torch.nn.Module
    x: torch.Tensor  # [rows, hidden]: what the layer's FFN sees at one decode step


def ffn_inputs(model, prompt) -> dict[str, FFNInput]:
    """{module path: FFNInput} of a Bamboo causal LM for the prompt's last token (a full forward, no cache)."""
    inputs = {}
    model.clear_cache()  # the next generate sets the cache up again

    def hook_for(name):
        def hook(mlp, args):
            inputs[name] = FFNInput(mlp, args[0][:, -1].detach())
        return hook

    handles = [layer.mlp.register_forward_pre_hook(hook_for(f"model.layers.{i}.mlp"))
               for i, layer in enumerate(model.model.layers)]
    try:
        with torch.no_grad():
            model(prompt)
    finally:
        for h in handles:
            h.remove()
    return inputs


def layer_rows(x, gate_weight, up_weight, mode, backend="triton", predictor=None, gate_bias=None, up_bias=None):
    """(gate rows, up rows, down rows) one dReLU FFN layer reads for input x [rows, hidden]; `predictor` has the
    fields of a LayerPredictor (w_in, w_out, bias, threshold, top_k)."""
    gate_pre = F.linear(x, gate_weight, gate_bias)
    product = torch.relu(gate_pre) * torch.relu(F.linear(x, up_weight, up_bias))
    intermediate = gate_pre.shape[-1]
    if mode == "dense":
        return intermediate, intermediate, intermediate
    if mode == "exact":
        gate_active = exact_active(gate_pre)
        down = gate_active if backend == "ort" else gate_active & (product != 0).any(0)
        return intermediate, int(gate_active.sum()), int(down.sum())
    chosen = predictor_selection(x, predictor.w_in, predictor.w_out, predictor.bias, predictor.threshold,
                                 predictor.top_k)
    down = chosen.numel() if backend == "ort" else int((product.index_select(1, chosen) != 0).any(0).sum())
    return chosen.numel(), chosen.numel(), down


@dataclass
class FFNReads:
    bytes: int            # all layers, one step
    gate_rows: float      # per layer, averaged
    up_rows: float
    down_rows: float
    intermediate: int

    def describe(self) -> str:
        i = self.intermediate
        return (f"rows read per layer: gate {self.gate_rows / i:.0%}, up {self.up_rows / i:.0%}, "
                f"down {self.down_rows / i:.0%}")


def ffn_reads(inputs: dict[str, FFNInput], mode: str, backend: str = "triton", predictors=None) -> FFNReads:
    """Bytes the FFNs read at one step (mode dense / exact / predictor; backend triton / ort)."""
    total, sums = 0, [0, 0, 0]
    intermediate = 0
    with torch.no_grad():
        for name, item in inputs.items():
            predictor = predictors[name] if mode == "predictor" else None
            mlp = item.mlp
            gate, up, down = mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight
            rows = layer_rows(item.x, gate, up, mode, backend, predictor, mlp.gate_proj.bias, mlp.up_proj.bias)
            intermediate = gate.shape[0]
            total += (rows[0] * gate.shape[1] * gate.element_size() + rows[1] * up.shape[1] * up.element_size()
                      + rows[2] * down.shape[0] * down.element_size())
            sums = [s + r for s, r in zip(sums, rows)]
    if mode == "predictor":  # each layer's predictor is read whole
        total += predictor_bytes({name: predictors[name] for name in inputs})
    n = max(len(inputs), 1)
    return FFNReads(total, sums[0] / n, sums[1] / n, sums[2] / n, intermediate)


def outside_ffn_bytes(model) -> int:
    """Weights a decode step reads outside the FFNs: all but the FFNs' and the input embedding (unless tied)."""
    embedding, head = model.model.embed_tokens.weight, model.lm_head.weight
    seen, total = set(), 0
    for name, p in model.named_parameters():
        if ".mlp." in name or (p is embedding and p is not head) or id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel() * p.element_size()
    return total


def kv_cache_bytes(config, batch: int, cache_len: int, element_size: int) -> int:
    """The static KV cache, keys and values of every layer: SDPA reads all `cache_len` slots (masked) per step."""
    head_dim = config.resolved_head_dim
    return 2 * config.num_hidden_layers * batch * config.num_key_value_heads * cache_len * head_dim * element_size
