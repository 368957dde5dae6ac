"""The elementwise functions the fused FFN supports on its non-ReLU factor, with their derivatives."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _gelu_grad(x, approximate):
    return torch.ops.aten.gelu_backward.default(torch.ones_like(x), x, approximate=approximate)


ACTIVATIONS = {
    "identity": (lambda x: x, lambda x: torch.ones_like(x)),
    "relu": (torch.relu, lambda x: (x > 0).to(x.dtype)),
    "silu": (F.silu, lambda x: torch.sigmoid(x) * (1 + x * (1 - torch.sigmoid(x)))),
    "gelu": (F.gelu, lambda x: _gelu_grad(x, "none")),
    "gelu_tanh": (lambda x: F.gelu(x, approximate="tanh"), lambda x: _gelu_grad(x, "tanh")),
    "sigmoid": (torch.sigmoid, lambda x: torch.sigmoid(x) * (1 - torch.sigmoid(x))),
    "tanh": (torch.tanh, lambda x: 1 - torch.tanh(x) ** 2),
}


def apply(name: str, x: torch.Tensor) -> torch.Tensor:
    return ACTIVATIONS[name][0](x)


def derivative(name: str, x: torch.Tensor) -> torch.Tensor:
    return ACTIVATIONS[name][1](x)
