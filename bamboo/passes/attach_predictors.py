"""Switch fused FFN nodes to predictor mode.

Two ways, by what the graph is (bamboo/ops/bound_weights.py states the rule):
- a Dynamo graph may serve several layers, so nothing layer-specific is stored in it: each node gets the id of
  a predictor table and the op looks up, at every call, the predictor bound to the gate weight passed in.
  The example's gate weight is looked up once here, so predictors of another model are refused at compile.
- an exported program has one node per site and must carry everything: each site's own predictor (matched
  to its gate weight by fingerprint, the site's module path settling shared weights) is stored as buffers,
  with its threshold and cap as the node's scalars.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.fx as fx

from bamboo.errors import CompileError, InputError
from bamboo.graph.constants import add_buffer, constant_value
from bamboo.passes.infra import GraphPass, PassResult
from bamboo.passes.rewrite_to_sparse_ffn import SPARSE_FFN

GATE_WEIGHT, PREDICTOR_IN, PREDICTOR_OUT, PREDICTOR_BIAS, MODE, THRESHOLD, TOP_K, PREDICTOR_TABLE = (
    1, 8, 9, 10, 12, 14, 15, 16)


def _gate_weight(gm, node: fx.Node, constants) -> Optional[torch.Tensor]:
    """The gate weight the node reads, through views (stored [in, out], rows of a fused gate_up)."""
    return constant_value(gm, node.args[GATE_WEIGHT], constants)


POSITIONS = {"predictor_in": PREDICTOR_IN, "predictor_out": PREDICTOR_OUT, "predictor_bias": PREDICTOR_BIAS,
             "mode": MODE, "threshold": THRESHOLD, "top_k": TOP_K, "predictor_table": PREDICTOR_TABLE}


def _with_args(node: fx.Node, **changes) -> None:
    args = list(node.args) + [0] * (PREDICTOR_TABLE + 1 - len(node.args))  # the table arg may be left out
    for name, value in changes.items():
        args[POSITIONS[name]] = value
    node.args = tuple(args)


class AttachPredictors(GraphPass):
    """`bind(gate_weight, module)` -> BoundPredictor (calibrate.predictors.PredictorBinder). `table` > 0: the
    registered table id that Dynamo graphs carry; 0: store each site's predictor as buffers (export).
    `constants`: placeholder name -> example tensor, for graphs whose weights are inputs."""

    def __init__(self, bind, constants: Optional[dict] = None, table: int = 0):
        self.bind, self.constants, self.table = bind, constants or {}, table

    def call(self, gm: fx.GraphModule) -> PassResult:
        attached = []
        for node in list(gm.graph.nodes):
            if node.target is not SPARSE_FFN:
                continue
            module = node.meta.get("bamboo_site_module")
            gate = _gate_weight(gm, node, self.constants)
            if self.table:
                if gate is not None:  # refuse another model's predictors now, not at the first call
                    self.bind(gate)
                _with_args(node, mode="predictor", predictor_table=self.table)
            else:
                if gate is None:
                    raise CompileError(f"predictor mode needs the FFN weights of {module!r} as model parameters "
                                       "or buffers, but its gate weight is a runtime input")
                try:
                    predictor = self.bind(gate, module)
                except InputError as exc:
                    raise InputError(f"{exc} (FFN at {module!r})") from None
                index = len(attached)
                stored = {name: add_buffer(gm, f"_bamboo_predictor_{index}_{name}", tensor, node)
                          for name, tensor in (("in", predictor.w_in), ("out", predictor.w_out),
                                               ("bias", predictor.bias))}
                _with_args(node, mode="predictor", predictor_in=stored["in"], predictor_out=stored["out"],
                           predictor_bias=stored["bias"], threshold=predictor.threshold, top_k=predictor.top_k,
                           predictor_table=0)
            attached.append(module)
        return PassResult(gm, bool(attached), {"attached": attached, "table": self.table})
