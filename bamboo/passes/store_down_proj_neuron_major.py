"""Store each fused FFN's down projection neuron-major ([intermediate, out], one contiguous row per neuron),
once, at compile time, so the sparse path reads whole rows of the active neurons and never transposes per call.
"""
from __future__ import annotations

from typing import Optional

import torch.fx as fx

from bamboo.graph.constants import ConstantStore, constant_value
from bamboo.passes.infra import GraphPass, PassResult
from bamboo.passes.rewrite_to_sparse_ffn import SPARSE_FFN

DOWN_WEIGHT, DOWN_WEIGHT_NM = 5, 6


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
        store = ConstantStore(gm, self.store_as)
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
                cache[key] = store.add(f"_bamboo_down_nm_{len(cache)}", weight.detach().t().contiguous(), node)
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
            stats["extra_inputs"] = store.extra_inputs
        return PassResult(gm, converted > 0, stats)
