"""Activation profiling: how many FFN neurons are exactly zero, per layer, over a stream of batches."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch
from tqdm.auto import tqdm

from bamboo.models.modeling import BambooMLP


@dataclass
class LayerSparsity:
    layer: str
    tokens: int = 0
    gate_zeros: float = 0.0      # share of relu(gate x) == 0 over all tokens and neurons
    up_zeros: float = 0.0        # share of act(up x) == 0
    product_zeros: float = 0.0   # share of the dReLU product == 0: the neurons a token does not need
    union_active: float = 0.0    # share of neurons nonzero for at least one token of a batch (mean over batches)
    batches: int = 0


def _accumulate(stats: LayerSparsity, mlp: BambooMLP, x: torch.Tensor) -> None:
    x = x.reshape(-1, x.shape[-1])
    gate = mlp.act_fn(mlp.gate_proj(x))
    up = mlp.act_fn(mlp.up_proj(x))
    product = gate * up
    n, old = x.shape[0], stats.tokens
    total = old + n

    def mean(prev, new):
        return (prev * old + new * n) / total

    stats.gate_zeros = mean(stats.gate_zeros, (gate == 0).float().mean().item())
    stats.up_zeros = mean(stats.up_zeros, (up == 0).float().mean().item())
    stats.product_zeros = mean(stats.product_zeros, (product == 0).float().mean().item())
    union = (product != 0).any(0).float().mean().item()
    stats.union_active = (stats.union_active * stats.batches + union) / (stats.batches + 1)
    stats.batches += 1
    stats.tokens = total


@torch.no_grad()
def measure_ffn_sparsity(model: torch.nn.Module, batches: Iterable, progress: bool = True) -> list[LayerSparsity]:
    """Run `model` on each batch (a tensor of input ids, or a dict of keyword arguments) and measure, for every
    BambooMLP, the share of exact zeros in its activations."""
    mlps = [(name, m) for name, m in model.named_modules() if isinstance(m, BambooMLP)]
    stats = {name: LayerSparsity(name) for name, _ in mlps}
    hooks = [m.register_forward_pre_hook(lambda mod, args, name=name: _accumulate(stats[name], mod, args[0]))
             for name, m in mlps]
    try:
        for batch in tqdm(list(batches), desc="profiling FFN activations", disable=not progress, unit="batch"):
            model(**batch) if isinstance(batch, dict) else model(batch)
    finally:
        for h in hooks:
            h.remove()
    return list(stats.values())


def format_sparsity_table(rows: list[LayerSparsity]) -> str:
    from bamboo.graph.site_table import format_table

    body = [[r.layer, r.tokens, f"{r.gate_zeros:.1%}", f"{r.up_zeros:.1%}", f"{r.product_zeros:.1%}",
             f"{r.union_active:.1%}"] for r in rows]
    return format_table(["layer", "tokens", "relu(gate)=0", "act(up)=0", "product=0", "active (batch union)"], body)
