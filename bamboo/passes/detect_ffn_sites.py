"""Find ReLU-sparse FFN sites in an FX graph.

The rule underneath every kind: a down projection of a product in which a ReLU of a linear map of x makes
exact zeros, and the other factor (if any) is an elementwise function of a linear map of the same x:

    drelu     down(relu(gate x) * relu(up x))          Bamboo, TurboSparse
    reglu     down(relu(gate x) * f(up x))             ReluLLaMA, ProSparse (f: identity, silu, gelu, ...)
    relu_mlp  down(relu(fc1 x + b))                    OPT

Gate and up may be halves of one fused projection (chunk/split/slice of its output), inference identities
(eval-mode dropout, same-dtype casts) may sit between the ReLU and the down projection, and gate and up may
read two copies of the same computation (`gate(norm(x)) ... up(norm(x))`: merged here, a local CSE).

A candidate is refused, with the reason recorded, when no factor is an exact-zero ReLU (SwiGLU, GeGLU, leaky
ReLU), when its intermediate values are used elsewhere in the graph, or when shapes or dtypes disagree; any
other down projection whose input traces back to a ReLU is refused with what stands in between (no silent
refusals).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.fx as fx

from bamboo.graph.equivalence import duplicate_nodes, same_value
from bamboo.graph.inspect_graph import common_module_path
from bamboo.graph.linear_match import LinearMatch, match_linear, match_linear_part
from bamboo.graph.node_ops import (
    NON_SPARSE_ACTIVATIONS,
    arg,
    decomposed_silu,
    meta_value,
    op_name,
    relu_input,
    skip_identities,
    stacked_index,
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
    expert: Optional[int] = None  # e when the weights are w[e] of stacked expert parameters (fused MoE experts)

    @property
    def name(self) -> str:
        """The module path, with the expert index for one expert of stacked expert weights."""
        module = "(root)" if self.module == "" else (self.module or "-")
        return module if self.expert is None else f"{module}[expert {self.expert}]"


@dataclass
class SiteMatch:
    x: fx.Node
    gate: LinearMatch
    up: Optional[LinearMatch]
    down: LinearMatch
    nodes: list  # all nodes that the rewrite replaces; down.output last
    duplicates: list = field(default_factory=list)  # a second copy of x's computation that up read (dies too)


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
    node, identities = skip_identities(node)
    inner, _ = relu_input(node)
    candidates = []
    if inner is not None:
        candidates.append((match_linear_part(inner), "relu", [node]))
    name = op_name(node)
    if name in UP_ACTIVATIONS and name != "relu" and len(node.args) >= 1:
        if name == "gelu":
            approximate = arg(node, 1, "approximate", "none")
            act = "gelu_tanh" if approximate == "tanh" else "gelu"
        else:
            act = name
        candidates.append((match_linear_part(node.args[0]), act, [node]))
    u, spelled = decomposed_silu(node)
    if u is not None:
        candidates.append((match_linear_part(u), "silu", spelled))
    candidates.append((match_linear_part(node), "identity", []))
    for lin, act, extra in candidates:
        if lin and same_value(lin.input, x):
            return lin, act, extra + identities, ""
    return None, "", [], "the other factor of the product is not an elementwise function of a linear map of x"


def relu_ancestor(node, depth: int = 4) -> Optional[fx.Node]:
    """A ReLU within `depth` ops upstream of `node`, not past a linear map (that one is another FFN's)."""
    frontier = [node] if isinstance(node, fx.Node) else []
    for _ in range(depth):
        upstream = []
        for n in frontier:
            if relu_input(n)[0] is not None:
                return n
            if op_name(n) not in ("linear", "matmul", "grouped_mm") and n.op != "placeholder":
                upstream += n.all_input_nodes
        frontier = upstream
    return None


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
    duplicates = duplicate_nodes(x, up.input) if up and up.input is not x else []
    internal = [n for n in nodes + duplicates if n is not down.output]
    problem = _single_use(internal, set(nodes + duplicates))
    if problem:
        return None, problem
    module = common_module_path([gate.output, down.output] + ([up.output] if up else []))
    site = FFNSite(kind, module, xv.shape[-1], gate.out_features, down.out_features, xv.dtype, up_act,
                   SiteMatch(x, gate, up, down, nodes, duplicates), stacked_index(gate.weight))
    return site, ""


def match_site(node: fx.Node) -> tuple[Optional[FFNSite], str]:
    """(site, "") if `node` is the output of a ReLU-sparse FFN, else (None, reason); reason "" = not a candidate."""
    down = match_linear(node)
    if down is None:
        if op_name(node) == "grouped_mm" and relu_ancestor(node.args[0]) is not None:
            return None, ("grouped_mm experts (3-D expert weights, tokens grouped by offsets): the fused op takes "
                          "one expert's weights per call; run the experts one at a time (transformers: "
                          "experts_implementation='eager', or let bamboo's capture adapter do it)")
        return None, ""
    product, identities = skip_identities(down.input)
    name = op_name(product)
    if name == "mul" and len(product.args) == 2 and all(isinstance(a, fx.Node) for a in product.args):
        factors = [skip_identities(a) for a in product.args]
        factor_ops = {"silu" if decomposed_silu(a)[0] is not None else op_name(a) for a, _ in factors}
        if not factor_ops & (NON_SPARSE_ACTIVATIONS | {"relu", "clamp", "relu6"}):
            return _unmatched(product, down)  # a product of no activation (a norm's scale, say)
        reasons = []
        for (first, passed), (second, _) in (factors, factors[::-1]):
            gate_in, why = relu_input(first)
            gate = match_linear_part(gate_in) if gate_in is not None else None
            if gate is None:
                reasons.append(why if gate_in is None else "the ReLU's input is not a linear map")
                continue
            up, up_act, extra, why = _up_factor(second, gate.input)
            if up is None:
                reasons.append(why)
                continue
            kind = "drelu" if up_act == "relu" else "reglu"
            nodes = [first, product] + passed + identities + extra
            return _check_site(kind, gate.input, gate, up, down, nodes, up_act)
        acts = factor_ops & NON_SPARSE_ACTIVATIONS
        if acts:
            return None, (f"no factor of the product is a ReLU ({', '.join(sorted(acts))}: no exact zeros): "
                          "a gated FFN without ReLU cannot skip neurons losslessly")
        return None, "; ".join(dict.fromkeys(reasons))
    if name == "relu" or name == "clamp":
        inner, why = relu_input(product)
        fc1 = match_linear_part(inner) if inner is not None else None
        if fc1 is None:
            return None, why or "the ReLU's input is not a linear map"
        return _check_site("relu_mlp", fc1.input, fc1, None, down, [product] + identities, "identity")
    if name in NON_SPARSE_ACTIVATIONS or name == "relu6":
        return None, relu_input(product)[1]
    return _unmatched(product, down)


def _unmatched(product: fx.Node, down: LinearMatch) -> tuple[None, str]:
    """No known FFN shape: a candidate only when a ReLU lies upstream, then refused with what is in between."""
    relu = relu_ancestor(product)
    if relu is None:
        return None, ""
    return None, (f"the ReLU {relu.name} reaches the down projection {down.output.name} through "
                  f"{product.format_node() if product is not relu else 'itself'}, which no FFN kind expresses")


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
