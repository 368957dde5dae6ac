"""Rewrite each detected FFN site into one bamboo::sparse_ffn node (the rest becomes dead code)."""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.fx as fx

import bamboo.ops  # noqa: F401  (registers torch.ops.bamboo)
from bamboo.graph.linear_match import LinearMatch
from bamboo.graph.node_ops import meta_value, set_meta_value
from bamboo.passes.detect_ffn_sites import FFNSite, Rejection, detect_ffn_sites
from bamboo.passes.infra import GraphPass, PassResult

SPARSE_FFN = torch.ops.bamboo.sparse_ffn.default


def _call(graph: fx.Graph, op, args: tuple, value, like: fx.Node) -> fx.Node:
    node = graph.call_function(op, args)
    set_meta_value(node, value, like)
    return node


def _rows(graph: fx.Graph, tensor, dim: int, rows, like: fx.Node):
    """`tensor` narrowed to the output features `rows` of a fused projection: a view taken in the graph from the
    tensor of each call (never a copy made at compile time: the graph may serve other layers)."""
    if rows is None or tensor is None:
        return tensor
    start, stop = rows
    return _call(graph, torch.ops.aten.slice.Tensor, (tensor, dim, start, stop),
                 meta_value(tensor).narrow(dim, start, stop - start), like)


def _as_out_in(graph: fx.Graph, lin: LinearMatch, like: fx.Node) -> tuple:
    """(weight, bias) of `lin` in nn.Linear's [out, in] layout (gate/up weights stored as [in, out] are
    transposed), narrowed to its rows when it is part of a fused gate_up projection."""
    bias = _rows(graph, lin.bias, 0, lin.rows, like)
    if lin.layout == "out_in":
        return _rows(graph, lin.weight, 0, lin.rows, like), bias
    weight = _rows(graph, lin.weight, 1, lin.rows, like)
    return _call(graph, torch.ops.aten.t.default, (weight,), meta_value(weight).t(), like), bias


def rewrite_site(graph: fx.Graph, site: FFNSite, mode: str, replaced: dict | None = None) -> fx.Node:
    """`replaced`: down outputs already rewritten -> their fused node (an FFN fed by another FFN's output,
    `f(f(x))`, was matched against the node the first rewrite removed)."""
    m = site.match
    out = m.down.output
    x = (replaced or {}).get(m.x, m.x)
    with graph.inserting_before(out):
        gate_w, gate_b = _as_out_in(graph, m.gate, out)
        up_w, up_b = _as_out_in(graph, m.up, out) if m.up else (None, None)
        # A down weight stored [intermediate, out] is already neuron-major.
        down_w, down_nm = (m.down.weight, None) if m.down.layout == "out_in" else (None, m.down.weight)
        # Predictor tensors and scalars are filled in by AttachPredictors; until then the site runs exact.
        args = (x, gate_w, gate_b, up_w, up_b, down_w, down_nm, m.down.bias,
                None, None, None, site.kind, "exact" if mode == "predictor" else mode, site.up_act, 0.0, 0)
        fused = graph.call_function(SPARSE_FFN, args)
    fused.meta.update({k: v for k, v in out.meta.items() if k in ("nn_module_stack", "stack_trace", "source_fn_stack")})
    fused.meta["bamboo_site_module"] = site.module
    set_meta_value(fused, meta_value(out), out)
    out.replace_all_uses_with(fused)
    order = {node: i for i, node in enumerate(graph.nodes)}
    for node in sorted(m.nodes + m.duplicates, key=order.__getitem__, reverse=True):  # users before inputs
        if not node.users:
            graph.erase_node(node)
    return fused


class RewriteToSparseFFN(GraphPass):
    """Rewrite every detected FFN site into bamboo::sparse_ffn. `keep_dense(site, mode)` may return a reason to
    leave a site as it is (the site then joins the refusals with that reason, never silently dense)."""

    def __init__(self, mode: str = "exact", keep_dense: Optional[Callable[[FFNSite, str], str]] = None):
        self.mode, self.keep_dense = mode, keep_dense

    def call(self, gm: fx.GraphModule) -> PassResult:
        report = detect_ffn_sites(gm.graph)
        sites, rejected = [], list(report.rejected)
        for site in report.sites:
            reason = self.keep_dense(site, self.mode) if self.keep_dense else ""
            if reason:
                rejected.append(Rejection(site.match.down.output.name, site.name, reason))
            else:
                sites.append(site)
        replaced: dict = {}
        for site in sites:
            replaced[site.match.down.output] = rewrite_site(gm.graph, site, self.mode, replaced)
        return PassResult(gm, bool(sites), {
            "rewritten": len(sites),
            "sites": sites,
            "rejected": rejected,
        })
