"""Switch fused FFN nodes to predictor mode: attach each site's calibrated predictor (checked against the
site's gate weight, so predictors of another model are refused) and its threshold and cap."""
from __future__ import annotations

from typing import Optional

import torch
import torch.fx as fx

from bamboo.errors import CompileError
from bamboo.graph.constants import ConstantStore, constant_value
from bamboo.graph.node_ops import meta_value
from bamboo.passes.infra import GraphPass, PassResult
from bamboo.passes.rewrite_to_sparse_ffn import SPARSE_FFN

GATE_WEIGHT, PREDICTOR_IN, PREDICTOR_OUT, PREDICTOR_BIAS, MODE, THRESHOLD, TOP_K = 1, 8, 9, 10, 12, 14, 15


def _gate_weight(gm, node: fx.Node, constants) -> Optional[torch.Tensor]:
    source = node.args[GATE_WEIGHT]
    if isinstance(source, fx.Node) and source.target is torch.ops.aten.t.default:  # a weight stored [in, out]
        inner = constant_value(gm, source.args[0], constants)
        return None if inner is None else inner.t()
    return constant_value(gm, source, constants)


class AttachPredictors(GraphPass):
    def __init__(self, predictors, constants: Optional[dict] = None, store_as: str = "buffer"):
        self.predictors = predictors
        self.constants = constants or {}
        self.store_as = store_as

    def call(self, gm: fx.GraphModule) -> PassResult:
        store = ConstantStore(gm, self.store_as)
        attached = []
        for node in list(gm.graph.nodes):
            if node.target is not SPARSE_FFN:
                continue
            module = node.meta.get("bamboo_site_module")
            gate = _gate_weight(gm, node, self.constants)
            if gate is None:
                raise CompileError(f"predictor mode needs the FFN weights of {module!r} as model parameters or "
                                   "buffers, but its gate weight is a runtime input")
            predictor = self.predictors.check_fits(module, gate)
            dtype = meta_value(node.args[0]).dtype
            device = gate.device
            index = len(attached)
            args = list(node.args)
            for position, name, tensor in ((PREDICTOR_IN, "in", predictor.w_in), (PREDICTOR_OUT, "out", predictor.w_out),
                                           (PREDICTOR_BIAS, "bias", predictor.bias)):
                args[position] = store.add(f"_bamboo_predictor_{index}_{name}",
                                           tensor.detach().to(dtype=dtype, device=device).contiguous(), node)
            args[MODE], args[THRESHOLD], args[TOP_K] = "predictor", float(predictor.threshold), int(predictor.top_k)
            node.args = tuple(args)
            attached.append(module)
        stats = {"attached": attached}
        if self.store_as == "input":
            stats["extra_inputs"] = store.extra_inputs
        return PassResult(gm, bool(attached), stats)
