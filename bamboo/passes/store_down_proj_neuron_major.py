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
    `keep_original`: keep passing the [out, intermediate] weight too, so gradients reach the real parameter.
    `store_as`: "buffer" registers the copy on the graph module (export: it lands in the state dict); "input"
    adds it as a new trailing graph input and lists the tensors in stats["extra_inputs"], for Dynamo graphs,
    whose AOTAutograd accepts no buffers but those Dynamo lifted itself: the caller appends them to each call."""

    def __init__(self, constants: Optional[dict] = None, keep_original: bool = True, store_as: str = "buffer"):
        if store_as not in ("buffer", "input"):
            raise ValueError(f"store_as must be 'buffer' or 'input', got {store_as!r}")
        self.constants = constants or {}
        self.keep_original = keep_original
        self.store_as = store_as

    def call(self, gm: fx.GraphModule) -> PassResult:
        converted, skipped, nbytes = 0, [], 0
        cache: dict[int, fx.Node] = {}
        extra_inputs: list[torch.Tensor] = []
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
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
                if self.store_as == "buffer":
                    gm.register_buffer(name, neuron_major, persistent=True)
                    with gm.graph.inserting_before(node):
                        stored = gm.graph.get_attr(name)
                else:
                    last = placeholders[-1] if placeholders else None
                    with (gm.graph.inserting_after(last) if last is not None else gm.graph.inserting_before(None)):
                        stored = gm.graph.placeholder(name)
                    placeholders.append(stored)
                    extra_inputs.append(neuron_major)
                set_meta_value(stored, _fake_like(node, neuron_major), node)
                cache[key] = stored
                nbytes += weight.numel() * weight.element_size()
            args = list(node.args)
            args[DOWN_WEIGHT_NM] = cache[key]
            if not self.keep_original:
                args[DOWN_WEIGHT] = None
            node.args = tuple(args)
            if weight_node.op == "get_attr" and not weight_node.users:
                gm.graph.erase_node(weight_node)  # reading an attribute is pure: drop the dead read
            converted += 1
        stats = {"neuron_major": converted, "bytes": nbytes, "runtime_weights": skipped}
        if self.store_as == "input":
            stats["extra_inputs"] = extra_inputs
        return PassResult(gm, converted > 0, stats)


def _fake_like(node: fx.Node, real: torch.Tensor):
    """A fake tensor of `real`'s shape in the fake mode of the graph (so meta values stay consistent)."""
    from torch._subclasses.fake_tensor import FakeTensor

    for other in node.graph.nodes:
        value = other.meta.get("val", other.meta.get("example_value"))
        if isinstance(value, FakeTensor):
            return value.fake_mode.from_tensor(real)
    return real
