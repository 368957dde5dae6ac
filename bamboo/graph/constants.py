"""The weights a pass reads, and tensors it stores in an exported program (a neuron-major weight, a
predictor). Dynamo graphs get no stored tensors: one graph may serve several layers (ops/bound_weights.py)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.fx as fx

from bamboo.graph.node_ops import set_meta_value

# Views a weight reaches the op through (a transpose, a fused gate_up's rows, one expert of stacked weights).
_VIEWS = {torch.ops.aten.t.default, torch.ops.aten.transpose.int, torch.ops.aten.permute.default,
          torch.ops.aten.slice.Tensor, torch.ops.aten.select.int, torch.ops.aten.narrow.default,
          torch.ops.aten.alias.default}


def constant_value(gm: fx.GraphModule, node: fx.Node, constants: dict) -> Optional[torch.Tensor]:
    """The tensor behind a weight node: a module attribute (get_attr), a known example input (placeholder), or
    a view of one of those."""
    if not isinstance(node, fx.Node):
        return None
    if node.op == "call_function" and node.target in _VIEWS:
        args = [constant_value(gm, a, constants) if isinstance(a, fx.Node) else a for a in node.args]
        if any(v is None for v, a in zip(args, node.args) if isinstance(a, fx.Node)):
            return None
        return node.target(*args, **node.kwargs)
    if node.op == "get_attr":
        value = gm
        for part in node.target.split("."):
            value = getattr(value, part)
        return value
    if node.op == "placeholder":
        return constants.get(node.name)
    return None


def fake_like(graph: fx.Graph, real: torch.Tensor):
    """A fake tensor of `real`'s shape in the graph's fake mode (so meta values stay consistent)."""
    from torch._subclasses.fake_tensor import FakeTensor

    for other in graph.nodes:
        value = other.meta.get("val", other.meta.get("example_value"))
        if isinstance(value, FakeTensor):
            return value.fake_mode.from_tensor(real)
    return real


def add_buffer(gm: fx.GraphModule, name: str, tensor: torch.Tensor, before: fx.Node) -> fx.Node:
    """Register `tensor` as a persistent buffer of `gm` (it lands in the exported state dict) and read it
    through a get_attr node placed before `before`."""
    gm.register_buffer(name, tensor, persistent=True)
    with gm.graph.inserting_before(before):
        node = gm.graph.get_attr(name)
    set_meta_value(node, fake_like(gm.graph, tensor), before)
    return node
