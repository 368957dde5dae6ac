"""Find ReLU-sparse FFN sites in an FX graph.

The rule underneath every kind: a down projection of a product in which a ReLU of a linear map of x makes
exact zeros, and the other factor (if any) is an elementwise function of a linear map of the same x:

    drelu     down(relu(gate x) * relu(up x))          Bamboo, TurboSparse
    reglu     down(relu(gate x) * f(up x))             ReluLLaMA, ProSparse (f: identity, silu, gelu, ...)
    relu_mlp  down(relu(fc1 x + b))                    OPT

A candidate is refused, with the reason recorded, when no factor is an exact-zero ReLU (SwiGLU, GeGLU, leaky
ReLU), when its intermediate values are used elsewhere in the graph, or when shapes or dtypes disagree.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.fx as fx

from bamboo.graph.inspect_graph import common_module_path
from bamboo.graph.linear_match import LinearMatch, match_linear
from bamboo.graph.node_ops import (
    NON_SPARSE_ACTIVATIONS,
    arg,
    decomposed_silu,
    meta_value,
    op_name,
    relu_input,
)

# f(up x) spellings the fused op can compute, by canonical op name.
UP_ACTIVATIONS = {"relu": "relu", "silu": "silu", "sigmoid": "sigmoid", "tanh": "tanh", "gelu": "gelu"}


@dataclass
class FFNSite:
    """One matched FFN: what it is (public fields) and where it sits in the graph (`match`)."""

    kind: str
    module: Optional[str]
    hidden_size: int
    intermediate_size: int
    out_features: int
    dtype: torch.dtype
    up_act: str
    match: "SiteMatch" = field(repr=False, compare=False)


@dataclass
class SiteMatch:
    x: fx.Node
    gate: LinearMatch
    up: Optional[LinearMatch]
    down: LinearMatch
    nodes: list  # all nodes that the rewrite replaces; down.output last


@dataclass
class Rejection:
    node: str
    module: Optional[str]
    reason: str


@dataclass
class DetectionReport:
    sites: list
    rejected: list


def _up_factor(node: fx.Node, x: fx.Node) -> tuple[Optional[LinearMatch], str, list, str]:
    """The non-gate factor: (linear, activation, extra nodes, reason when it is not a factor of x)."""
    inner, _ = relu_input(node)
    if inner is not None:
        lin = match_linear(inner)
        if lin and lin.input is x:
            return lin, "relu", [node], ""
    name = op_name(node)
    if name in UP_ACTIVATIONS and name != "relu" and len(node.args) >= 1:
        if name == "gelu":
            approximate = arg(node, 1, "approximate", "none")
            act = "gelu_tanh" if approximate == "tanh" else "gelu"
        else:
            act = name
        lin = match_linear(node.args[0])
        if lin and lin.input is x:
            return lin, act, [node], ""
    u, spelled = decomposed_silu(node)
    lin = match_linear(u) if u is not None else None
    if lin and lin.input is x:
        return lin, "silu", spelled, ""
    lin = match_linear(node)
    if lin and lin.input is x:
        return lin, "identity", [], ""
    return None, "", [], "the other factor of the product is not an elementwise function of a linear map of x"


def _single_use(nodes: list, site_nodes: set) -> Optional[str]:
    for n in nodes:
        outside = [u for u in n.users if u not in site_nodes]
        if outside:
            return f"intermediate value {n.name} is also used by {outside[0].name} outside the FFN"
    return None


def _check_site(kind, x, gate, up, down, extra, up_act) -> tuple[Optional[FFNSite], str]:
    xv = meta_value(x)
    if xv is None:
        return None, "the input has no recorded shape"
    if not xv.is_floating_point():
        return None, f"input dtype {xv.dtype} is not floating point"
    if gate.in_features != xv.shape[-1] or (up and up.in_features != xv.shape[-1]):
        return None, "gate/up weights do not match the input width"
    if up and up.out_features != gate.out_features:
        return None, f"gate ({gate.out_features}) and up ({up.out_features}) widths differ"
    if down.in_features != gate.out_features:
        return None, f"down takes {down.in_features} inputs but the gate has {gate.out_features} neurons"
    for lin in (gate, up, down):
        if lin is not None:
            for t in (lin.weight, lin.bias):
                if t is not None and meta_value(t) is not None and meta_value(t).dtype != xv.dtype:
                    return None, f"weight {t.name} is {meta_value(t).dtype} but the input is {xv.dtype}"
    nodes = list(dict.fromkeys(gate.nodes + (up.nodes if up else []) + extra + down.nodes))
    internal = [n for n in nodes if n is not down.output]
    problem = _single_use(internal, set(nodes))
    if problem:
        return None, problem
    module = common_module_path([gate.output, down.output] + ([up.output] if up else []))
    site = FFNSite(kind, module, xv.shape[-1], gate.out_features, down.out_features, xv.dtype, up_act,
                   SiteMatch(x, gate, up, down, nodes))
    return site, ""


def match_site(node: fx.Node) -> tuple[Optional[FFNSite], str]:
    """(site, "") if `node` is the output of a ReLU-sparse FFN, else (None, reason); reason "" = not a candidate."""
    down = match_linear(node)
    if down is None:
        return None, ""
    product = down.input
    name = op_name(product)
    if name == "mul" and len(product.args) == 2 and all(isinstance(a, fx.Node) for a in product.args):
        factor_ops = {"silu" if decomposed_silu(a)[0] is not None else op_name(a) for a in product.args}
        if not factor_ops & (NON_SPARSE_ACTIVATIONS | {"relu", "clamp", "relu6"}):
            return None, ""  # a product of no activation (a norm's scale, say): not an FFN candidate
        reasons = []
        for first, second in (product.args, product.args[::-1]):
            gate_in, why = relu_input(first)
            gate = match_linear(gate_in) if gate_in is not None else None
            if gate is None:
                reasons.append(why if gate_in is None else "the ReLU's input is not a linear map")
                continue
            up, up_act, extra, why = _up_factor(second, gate.input)
            if up is None:
                reasons.append(why)
                continue
            kind = "drelu" if up_act == "relu" else "reglu"
            return _check_site(kind, gate.input, gate, up, down, [first, product] + extra, up_act)
        acts = factor_ops & NON_SPARSE_ACTIVATIONS
        if acts:
            return None, (f"no factor of the product is a ReLU ({', '.join(sorted(acts))}: no exact zeros): "
                          "a gated FFN without ReLU cannot skip neurons losslessly")
        return None, "; ".join(dict.fromkeys(reasons))
    if name == "relu" or name == "clamp":
        inner, why = relu_input(product)
        fc1 = match_linear(inner) if inner is not None else None
        if fc1 is None:
            return None, why or "the ReLU's input is not a linear map"
        return _check_site("relu_mlp", fc1.input, fc1, None, down, [product], "identity")
    if name in NON_SPARSE_ACTIVATIONS or name == "relu6":
        return None, relu_input(product)[1]
    return None, ""


def detect_ffn_sites(graph: fx.Graph) -> DetectionReport:
    sites, rejected, claimed = [], [], set()
    # Last node first, so that `h @ W.T + b` is matched with its bias before the bare matmul is.
    for node in reversed(graph.nodes):
        site, reason = match_site(node)
        if site is not None and not (set(site.match.nodes) & claimed):
            sites.append(site)
            claimed.update(site.match.nodes)
        elif reason:
            rejected.append(Rejection(node.name, common_module_path([node]), reason))
    return DetectionReport(sites[::-1], rejected[::-1])
