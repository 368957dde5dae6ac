"""Store each fused FFN's down projection neuron-major ([intermediate, out], one contiguous row per neuron) in
an exported program, in place of the [out, intermediate] weight, so the program holds each weight once and the
sparse path reads whole rows of the active neurons.

Only for programs whose weights are attributes (torch.export's unlifted module): there each site reads its
own weight. Dynamo graphs get no such pass: one graph may serve several layers, so the op derives the
neuron-major rows from the weight passed in on each call (bamboo/ops/bound_weights.py).
"""
from __future__ import annotations

import torch.fx as fx

from bamboo.graph.constants import add_buffer, constant_value
from bamboo.passes.infra import GraphPass, PassResult
from bamboo.passes.rewrite_to_sparse_ffn import SPARSE_FFN

DOWN_WEIGHT, DOWN_WEIGHT_NM = 5, 6


class StoreDownProjNeuronMajor(GraphPass):
    """`keep_original`: keep passing the [out, intermediate] weight too (gradients reach the real parameter)."""

    def __init__(self, keep_original: bool = False):
        self.keep_original = keep_original

    def call(self, gm: fx.GraphModule) -> PassResult:
        converted, skipped, nbytes = 0, [], 0
        cache: dict[tuple, fx.Node] = {}
        for node in list(gm.graph.nodes):
            if node.target is not SPARSE_FFN or node.args[DOWN_WEIGHT_NM] is not None:
                continue
            weight_node = node.args[DOWN_WEIGHT]
            weight = constant_value(gm, weight_node, {})
            if weight is None:
                skipped.append(weight_node.name)  # a runtime input: the op derives the rows at each call
                continue
            # one buffer per distinct weight (tied or shared ones share it): keyed by where its values live, not by
            # id(), since a view (one expert of stacked weights) is a fresh tensor whose id a later one may reuse
            key = (weight.untyped_storage().data_ptr(), weight.storage_offset(), tuple(weight.shape),
                   tuple(weight.stride()), weight.dtype)
            if key not in cache:
                cache[key] = add_buffer(gm, f"_bamboo_down_nm_{len(cache)}", weight.detach().t().contiguous(), node)
                nbytes += weight.numel() * weight.element_size()
            args = list(node.args)
            args[DOWN_WEIGHT_NM] = cache[key]
            if not self.keep_original:
                args[DOWN_WEIGHT] = None
            node.args = tuple(args)
            if weight_node.op == "get_attr" and not weight_node.users:
                gm.graph.erase_node(weight_node)  # reading an attribute is pure: drop the dead read
            converted += 1
        return PassResult(gm, converted > 0, {"neuron_major": converted, "bytes": nbytes, "runtime_weights": skipped})
