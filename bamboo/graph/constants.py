"""Tensors a pass computes at compile time (a neuron-major weight, a predictor) and the weights it reads."""
from __future__ import annotations

from typing import Optional

import torch
import torch.fx as fx

from bamboo.graph.node_ops import set_meta_value


def constant_value(gm: fx.GraphModule, node: fx.Node, constants: dict) -> Optional[torch.Tensor]:
    """The tensor behind a weight node: a module attribute (get_attr) or a known constant input (placeholder)."""
    if not isinstance(node, fx.Node):
        return None
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


class ConstantStore:
    """Adds compile-time tensors to a graph module.

    store_as="buffer": registered buffers read through get_attr (export: they land in the state dict).
    store_as="input": new trailing placeholders; `extra_inputs` lists the tensors the caller must append to
    every call (Dynamo graphs: AOTAutograd accepts no buffers but those Dynamo lifted itself).
    """

    def __init__(self, gm: fx.GraphModule, store_as: str = "buffer"):
        if store_as not in ("buffer", "input"):
            raise ValueError(f"store_as must be 'buffer' or 'input', got {store_as!r}")
        self.gm, self.store_as = gm, store_as
        self.extra_inputs: list[torch.Tensor] = []

    def add(self, name: str, tensor: torch.Tensor, before: fx.Node) -> fx.Node:
        graph = self.gm.graph
        if self.store_as == "buffer":
            self.gm.register_buffer(name, tensor, persistent=True)
            with graph.inserting_before(before):
                node = graph.get_attr(name)
        else:
            placeholders = [n for n in graph.nodes if n.op == "placeholder"]
            anchor = graph.inserting_after(placeholders[-1]) if placeholders else graph.inserting_before(None)
            with anchor:
                node = graph.placeholder(name)
            # no user source, and static: the same tensor comes with every call (CUDA graphs keep its address)
            node._dynamo_source = None
            node.meta["tensor_dict"] = {"_dynamo_static_input_type": "unguarded"}
            self.extra_inputs.append(tensor)
        set_meta_value(node, fake_like(graph, tensor), before)
        return node
