"""Store each fused FFN's down projection neuron-major ([intermediate, out], one contiguous row per neuron),
once, at compile time, so the sparse path reads whole rows of the active neurons and never transposes per call.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.fx as fx

from bamboo.graph.node_ops import set_meta_value
from bamboo.passes.infra import GraphPass, PassResult
from bamboo.passes.rewrite_to_sparse_ffn import SPARSE_FFN

DOWN_WEIGHT, DOWN_WEIGHT_NM = 5, 6


def constant_value(gm: fx.GraphModule, node: fx.Node, constants: dict) -> Optional[torch.Tensor]:
    """The tensor behind a weight node: a module attribute (get_attr) or a known constant input (placeholder)."""
    if node.op == "get_attr":
        value = gm
        for part in node.target.split("."):
            value = getattr(value, part)
        return value
    if node.op == "placeholder":
        return constants.get(node.name)
    return None


class StoreDownProjNeuronMajor(GraphPass):
    """`constants`: placeholder name -> tensor, for graphs whose weights are inputs (Dynamo lifts parameters).
    `keep_original`: keep passing the [out, intermediate] weight too, so gradients reach the real parameter."""

    def __init__(self, constants: Optional[dict] = None, keep_original: bool = True):
        self.constants = constants or {}
        self.keep_original = keep_original

    def call(self, gm: fx.GraphModule) -> PassResult:
        converted, skipped, nbytes = 0, [], 0
        cache: dict[int, fx.Node] = {}
        for node in list(gm.graph.nodes):
            if node.target is not SPARSE_FFN or node.args[DOWN_WEIGHT_NM] is not None:
                continue
            weight_node = node.args[DOWN_WEIGHT]
            weight = constant_value(gm, weight_node, self.constants)
            if weight is None:
                skipped.append(weight_node.name)  # a runtime input: the op reads it in place
                continue
            key = id(weight)
            if key not in cache:
                name = f"_bamboo_down_nm_{len(cache)}"
                neuron_major = weight.detach().t().contiguous()
                gm.register_buffer(name, neuron_major, persistent=True)
                with gm.graph.inserting_before(node):
                    get = gm.graph.get_attr(name)
                set_meta_value(get, _fake_like(node, neuron_major), node)
                cache[key] = get
                nbytes += weight.numel() * weight.element_size()
            args = list(node.args)
            args[DOWN_WEIGHT_NM] = cache[key]
            if not self.keep_original:
                args[DOWN_WEIGHT] = None
            node.args = tuple(args)
            converted += 1
        return PassResult(gm, converted > 0, {"neuron_major": converted, "bytes": nbytes, "runtime_weights": skipped})


def _fake_like(node: fx.Node, real: torch.Tensor):
    """A fake tensor of `real`'s shape in the fake mode of the graph (so meta values stay consistent)."""
    from torch._subclasses.fake_tensor import FakeTensor

    for other in node.graph.nodes:
        value = other.meta.get("val", other.meta.get("example_value"))
        if isinstance(value, FakeTensor):
            return value.fake_mode.from_tensor(real)
    return real
