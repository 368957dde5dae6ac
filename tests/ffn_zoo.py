"""FFN modules in every spelling the compiler must recognise (and some it must refuse)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

RELU_SPELLINGS = ["F.relu", "nn.ReLU", "torch.relu", "clamp", "relu_", "clamp_min"]
LINEAR_SPELLINGS = ["F.linear", "nn.Linear", "x@W.T", "matmul_t", "x@W_in_out"]
KINDS = ["drelu", "reglu_identity", "reglu_silu", "reglu_gelu", "relu_mlp"]
NEGATIVES = ["swiglu", "geglu", "leaky_relu", "product_used_twice", "gate_used_twice", "relu6"]


def apply_relu(x, spelling, module=None):
    if spelling == "F.relu":
        return F.relu(x)
    if spelling == "nn.ReLU":
        return module(x)
    if spelling == "torch.relu":
        return torch.relu(x)
    if spelling == "clamp":
        return torch.clamp(x, min=0)
    if spelling == "relu_":
        return x.relu_()
    if spelling == "clamp_min":
        return x.clamp_min(0)
    raise ValueError(spelling)


class SpelledLinear(nn.Module):
    def __init__(self, fan_in, fan_out, spelling, weights_as="parameter", bias=False):
        super().__init__()
        self.spelling = spelling
        shape = (fan_in, fan_out) if spelling == "x@W_in_out" else (fan_out, fan_in)
        w = torch.randn(shape) / fan_in ** 0.5
        b = torch.randn(fan_out) * 0.1 if bias else None
        if spelling == "nn.Linear":
            self.lin = nn.Linear(fan_in, fan_out, bias=bias)
            with torch.no_grad():
                self.lin.weight.copy_(w)
                if bias:
                    self.lin.bias.copy_(b)
            return
        if weights_as == "buffer":
            self.register_buffer("weight", w)
            self.register_buffer("bias", b)
        else:
            self.weight = nn.Parameter(w)
            self.bias = nn.Parameter(b) if bias else None

    def forward(self, x):
        s = self.spelling
        if s == "nn.Linear":
            return self.lin(x)
        if s == "F.linear":
            return F.linear(x, self.weight, self.bias)
        if s == "x@W.T":
            y = x @ self.weight.T
        elif s == "matmul_t":
            y = torch.matmul(x, self.weight.t())
        else:
            y = x @ self.weight
        return y + self.bias if self.bias is not None else y


class ZooFFN(nn.Module):
    def __init__(self, kind="drelu", relu="F.relu", linear="F.linear", weights_as="parameter", gate_first=True,
                 bias=False, hidden=16, intermediate=48, out=None, up_relu=None):
        super().__init__()
        self.kind, self.relu, self.gate_first, self.up_relu = kind, relu, gate_first, up_relu or relu
        out = out or hidden
        self.gate = SpelledLinear(hidden, intermediate, linear, weights_as, bias)
        if kind != "relu_mlp":
            self.up = SpelledLinear(hidden, intermediate, linear, weights_as, bias)
        self.down = SpelledLinear(intermediate, out, linear, weights_as, bias)
        self.act = nn.ReLU()

    def forward(self, x):
        k = self.kind
        g = self.gate(x)
        if k == "relu_mlp":
            return self.down(apply_relu(g, self.relu, self.act))
        u = self.up(x)
        if k == "drelu":
            a, b = apply_relu(g, self.relu, self.act), apply_relu(u, self.up_relu, self.act)
        elif k == "reglu_identity":
            a, b = apply_relu(g, self.relu, self.act), u
        elif k == "reglu_silu":
            a, b = apply_relu(g, self.relu, self.act), F.silu(u)
        elif k == "reglu_gelu":
            a, b = apply_relu(g, self.relu, self.act), F.gelu(u)
        elif k == "swiglu":
            a, b = F.silu(g), u
        elif k == "geglu":
            a, b = F.gelu(g), u
        elif k == "leaky_relu":
            a, b = F.leaky_relu(g, 0.01), F.leaky_relu(u, 0.01)
        elif k == "relu6":
            a, b = F.relu6(g), F.relu6(u)
        elif k == "product_used_twice":
            h = F.relu(g) * F.relu(u)
            return self.down(h) + h.sum(-1, keepdim=True)
        elif k == "gate_used_twice":
            r = F.relu(g)
            return self.down(r * F.relu(u)) + r.mean(-1, keepdim=True)
        else:
            raise ValueError(k)
        return self.down(a * b if self.gate_first else b * a)


EXPECTED_KIND = {"drelu": "drelu", "reglu_identity": "reglu", "reglu_silu": "reglu", "reglu_gelu": "reglu",
                 "relu_mlp": "relu_mlp"}
EXPECTED_REASON = {
    "swiglu": "no exact zeros",
    "geglu": "no exact zeros",
    "leaky_relu": "no exact zeros",
    "relu6": "not a ReLU",
    "product_used_twice": "used by",
    "gate_used_twice": "used by",
}


class TinyMoE(nn.Module):
    """A dense-dispatch mixture of dReLU experts: every expert runs, weighted by the router."""

    def __init__(self, hidden=16, intermediate=32, experts=3):
        super().__init__()
        self.router = nn.Linear(hidden, experts, bias=False)
        self.experts = nn.ModuleList(ZooFFN("drelu", "F.relu", "nn.Linear", hidden=hidden, intermediate=intermediate)
                                     for _ in range(experts))

    def forward(self, x):
        weights = torch.softmax(self.router(x), dim=-1)
        return sum(weights[..., i:i + 1] * expert(x) for i, expert in enumerate(self.experts))


class FusedGateUp(torch.nn.Module):
    """Phi-3 / vLLM-style: one projection, split into gate and up by `split`."""

    def __init__(self, split="chunk", hidden=16, intermediate=24):
        super().__init__()
        self.split, self.intermediate = split, intermediate
        self.gate_up = torch.nn.Linear(hidden, 2 * intermediate, bias=True)
        self.down = torch.nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x):
        h = self.gate_up(x)
        if self.split == "chunk":
            gate, up = h.chunk(2, dim=-1)
        elif self.split == "split":
            gate, up = torch.split(h, self.intermediate, dim=-1)
        else:
            gate, up = h[..., :self.intermediate], h[..., self.intermediate:]
        return self.down(up * torch.relu(gate))


class DropoutBeforeDown(torch.nn.Module):
    """T5's DenseActDense: relu, then a dropout (identity in eval mode), then the down projection."""

    def __init__(self):
        super().__init__()
        self.wi, self.wo, self.dropout = torch.nn.Linear(16, 32), torch.nn.Linear(32, 16), torch.nn.Dropout(0.1)

    def forward(self, x):
        return self.wo(self.dropout(torch.relu(self.wi(x))))


class NormTwice(torch.nn.Module):
    """gate(norm(x)) * up(norm(x)) with the norm computed twice."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.rand(16) + 0.5)
        self.gate, self.up, self.down = (torch.nn.Linear(16, 32, bias=False), torch.nn.Linear(16, 32, bias=False),
                                         torch.nn.Linear(32, 16, bias=False))

    def norm(self, x):
        return self.scale * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)

    def forward(self, x):
        return self.down(torch.relu(self.gate(self.norm(x))) * torch.relu(self.up(self.norm(x))))


class ReluThenSoftmax(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = torch.nn.Linear(16, 32), torch.nn.Linear(32, 16)

    def forward(self, x):
        return self.fc2(torch.softmax(torch.relu(self.fc1(x)), dim=-1))

