"""The pattern language: name what an FX node computes, whatever IR level it comes from.

Dynamo graphs hold torch-level calls (torch._C._nn.linear, operator.mul, method calls such as x.relu_());
torch.export graphs hold ATen overloads (aten.linear.default, aten.mul.Tensor). `op_name` maps both onto
one small vocabulary so that a pattern is written once.
"""
from __future__ import annotations

import operator
from typing import Optional

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

aten = torch.ops.aten

_FUNCTIONS: dict[object, str] = {
    F.linear: "linear", aten.linear.default: "linear",
    operator.matmul: "matmul", torch.matmul: "matmul", aten.matmul.default: "matmul", torch.mm: "matmul",
    aten.mm.default: "matmul", aten.addmm.default: "addmm", torch.addmm: "addmm",
    aten.reshape.default: "reshape", aten.view.default: "reshape", aten._unsafe_view.default: "reshape",
    torch.t: "transpose", aten.t.default: "transpose", aten.numpy_T.default: "transpose",
    torch.transpose: "transpose", aten.transpose.int: "transpose", torch.permute: "transpose",
    aten.permute.default: "transpose",
    F.relu: "relu", torch.relu: "relu", torch.relu_: "relu", F.relu_: "relu", aten.relu.default: "relu",
    aten.relu_.default: "relu",
    torch.clamp: "clamp", torch.clip: "clamp", torch.clamp_min: "clamp", aten.clamp.default: "clamp",
    aten.clamp_.default: "clamp", aten.clamp_min.default: "clamp", aten.clamp_min_.default: "clamp",
    aten.clip.default: "clamp",
    operator.mul: "mul", torch.mul: "mul", aten.mul.Tensor: "mul", operator.imul: "mul",
    operator.add: "add", torch.add: "add", aten.add.Tensor: "add", operator.iadd: "add",
    aten.div.Tensor: "div", operator.truediv: "div", aten.exp.default: "exp", aten.neg.default: "neg",
    F.silu: "silu", aten.silu.default: "silu", torch.sigmoid: "sigmoid", aten.sigmoid.default: "sigmoid",
    torch.tanh: "tanh", aten.tanh.default: "tanh", F.gelu: "gelu", aten.gelu.default: "gelu",
    F.leaky_relu: "leaky_relu", aten.leaky_relu.default: "leaky_relu", F.elu: "elu", F.relu6: "relu6",
    aten.hardtanh.default: "relu6", aten.relu6.default: "relu6", F.hardtanh: "relu6", F.softplus: "softplus", F.mish: "mish",
    # the pieces of a fused gate_up projection: chunk / split / slice of its output
    operator.getitem: "getitem", torch.chunk: "chunk", aten.chunk.default: "chunk", torch.split: "split",
    aten.split.Tensor: "split", aten.split_with_sizes.default: "split", aten.slice.Tensor: "slice",
    aten.narrow.default: "narrow", torch.narrow: "narrow",
    # one expert of stacked (3-D) expert weights
    aten.select.int: "select", torch.select: "select",
    # ops that are the identity in inference (eval-mode dropout, same-dtype casts)
    F.dropout: "dropout", torch.dropout: "dropout", aten.dropout.default: "dropout",
    aten.clone.default: "clone", torch.clone: "clone", aten.alias.default: "clone",
    aten._to_copy.default: "to", aten.to.dtype: "to", aten.to.dtype_layout: "to",
}
_METHODS = {
    "matmul": "matmul", "mm": "matmul", "t": "transpose", "transpose": "transpose", "permute": "transpose",
    "relu": "relu", "relu_": "relu", "clamp": "clamp", "clamp_": "clamp", "clamp_min": "clamp",
    "clamp_min_": "clamp", "clip": "clamp", "mul": "mul", "mul_": "mul", "add": "add", "add_": "add",
    "sigmoid": "sigmoid", "tanh": "tanh", "chunk": "chunk", "split": "split", "narrow": "narrow",
    "clone": "clone", "contiguous": "clone", "to": "to", "type": "to", "float": "to", "type_as": "to",
}
_MODULES = {nn.Linear: "linear", nn.ReLU: "relu", nn.SiLU: "silu", nn.GELU: "gelu", nn.LeakyReLU: "leaky_relu",
            nn.Dropout: "dropout"}

# Activations that never produce exact zeros except at isolated points: no sparsity to exploit.
NON_SPARSE_ACTIVATIONS = {"silu", "gelu", "sigmoid", "tanh", "leaky_relu", "elu", "softplus", "mish"}


def op_name(node: fx.Node) -> Optional[str]:
    if node.op == "call_function":
        if node.target is getattr and len(node.args) == 2 and node.args[1] in ("T", "mT"):
            return "transpose"
        name = _FUNCTIONS.get(node.target)
        if name is None and "grouped_mm" in getattr(node.target, "__name__", str(node.target)):
            return "grouped_mm"  # F.grouped_mm, torch._grouped_mm, and the fallback ops libraries register
        return name
    if node.op == "call_method":
        return _METHODS.get(node.target)
    if node.op == "call_module":
        module = node.graph.owning_module.get_submodule(node.target)
        return _MODULES.get(type(module))
    return None


def arg(node: fx.Node, index: int, name: str, default=None):
    """Positional-or-keyword argument of a call node."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def meta_value(node) -> Optional[torch.Tensor]:
    """The fake tensor recorded for a node: 'val' (torch.export) or 'example_value' (Dynamo)."""
    if not isinstance(node, fx.Node):
        return None
    value = node.meta.get("val", node.meta.get("example_value"))
    return value if isinstance(value, torch.Tensor) else None


def set_meta_value(node: fx.Node, value: torch.Tensor, like: fx.Node) -> None:
    """Record a new node's fake value under the key(s) the graph uses (`like` is a node of that graph)."""
    node.meta["val"] = value
    if "example_value" in like.meta:
        node.meta["example_value"] = value


def is_transpose_2d(node: fx.Node) -> bool:
    """A transpose that swaps the two dims of a 2-D tensor (W.T, W.t(), W.transpose(0, 1), W.permute(1, 0))."""
    if op_name(node) != "transpose":
        return False
    source = meta_value(node.args[0])
    if source is None or source.dim() != 2:
        return False
    if node.op == "call_module":
        return False
    extra = [a for a in node.args[1:] if a not in ("T", "mT")]
    if len(extra) == 1 and isinstance(extra[0], (list, tuple)):
        extra = list(extra[0])
    return extra in ([], [0, 1], [1, 0], [-1, -2], [-2, -1], [1, -2], [-1, 0])


def stacked_index(weight: fx.Node) -> Optional[int]:
    """e when `weight` is `w[e]` of a 3-D stacked parameter (one expert of fused MoE experts), seen through
    transposes; None for any other weight."""
    node = weight
    while isinstance(node, fx.Node) and op_name(node) == "transpose":
        node = node.args[0]
    if not isinstance(node, fx.Node) or node.op != "call_function" or not node.args:
        return None
    source = meta_value(node.args[0])
    if source is None or source.dim() != 3:
        return None
    if op_name(node) == "select" and arg(node, 1, "dim") in (0, -3):
        index = arg(node, 2, "index")
    elif op_name(node) == "getitem":
        index = node.args[1]
    else:
        return None
    return index if isinstance(index, int) and not isinstance(index, bool) else None


def relu_input(node: fx.Node) -> tuple[Optional[fx.Node], str]:
    """If `node` is a ReLU in any spelling (relu, relu_, nn.ReLU, clamp(min=0)), its input; else the reason."""
    name = op_name(node)
    if name == "relu":
        return node.args[0], ""
    if name == "clamp":
        low = arg(node, 1, "min")
        high = arg(node, 2, "max")
        if low in (0, 0.0) and high is None:
            return node.args[0], ""
        return None, f"clamp(min={low}, max={high}) is not a ReLU"
    if name in NON_SPARSE_ACTIVATIONS or name == "relu6":
        return None, f"{name} makes no exact zeros" if name != "relu6" else "relu6 (clamp with a max) is not a ReLU"
    return None, f"{node.format_node() if isinstance(node, fx.Node) else node} is not a ReLU"


def decomposed_silu(node: fx.Node) -> tuple[Optional[fx.Node], list]:
    """silu as Inductor's post-grad graph spells it, u / (1 + exp(-u)) or u * sigmoid(u): (u, the nodes of the
    spelling, outermost last), or (None, [])."""
    name = op_name(node)
    if name == "div" and len(node.args) == 2 and isinstance(node.args[1], fx.Node):
        u, denominator = node.args
        if op_name(denominator) == "add" and len(denominator.args) == 2:
            for e, one in (denominator.args, denominator.args[::-1]):
                if (one == 1 and isinstance(e, fx.Node) and op_name(e) == "exp" and isinstance(e.args[0], fx.Node)
                        and op_name(e.args[0]) == "neg" and e.args[0].args[0] is u):
                    return u, [e.args[0], e, denominator, node]
    if name == "mul" and len(node.args) == 2:
        for u, s in (node.args, node.args[::-1]):
            if isinstance(s, fx.Node) and op_name(s) == "sigmoid" and s.args[0] is u:
                return u, [s, node]
    return None, []


def identity_input(node: fx.Node) -> Optional[fx.Node]:
    """If `node` is the identity in inference, its input: dropout that is not training, clone/contiguous, a cast
    to the dtype the value already has. Otherwise None."""
    name = op_name(node)
    if name == "dropout":
        if node.op == "call_module":
            return None if node.graph.owning_module.get_submodule(node.target).training else node.args[0]
        training = arg(node, 2, "training", arg(node, 2, "train", True))
        return node.args[0] if training is False else None
    if name in ("clone", "to") and node.args and isinstance(node.args[0], fx.Node):
        before, after = meta_value(node.args[0]), meta_value(node)
        if before is not None and after is not None and (before.dtype, before.device, before.shape) == (
                after.dtype, after.device, after.shape):
            return node.args[0]
    return None


def skip_identities(node) -> tuple:
    """(the first node upstream of `node` that is not an inference identity, the identity nodes passed)."""
    passed = []
    while isinstance(node, fx.Node) and (inner := identity_input(node)) is not None:
        passed.append(node)
        node = inner
    return node, passed
