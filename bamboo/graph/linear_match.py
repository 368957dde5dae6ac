"""Recognise a linear map in any spelling: F.linear(x, W, b), x @ W.T (+ b), x @ W (W stored [in, out]); the
post-grad ATen forms Inductor hands a custom pass: addmm(b, x, W.T), and x of any rank flattened to 2-D around
an mm (`reshape(mm(reshape(x, [-1, in]), permute(W)), [..., out])`), matched as a map of x; and a part of
one: the gate or up half of a fused gate_up projection taken by chunk, split or slicing its output (Phi-3,
transformers-5 MoE experts, vLLM-style merged projections)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch.fx as fx

from bamboo.graph.node_ops import arg, is_transpose_2d, meta_value, op_name


@dataclass
class LinearMatch:
    output: fx.Node          # the node whose value is x W^T + b
    input: fx.Node           # x
    weight: fx.Node          # W as stored
    layout: str              # "out_in" (nn.Linear's [out, in]) or "in_out" ([in, out])
    bias: Optional[fx.Node]
    nodes: list = field(default_factory=list)  # every node of the match, output last
    rows: Optional[tuple] = None  # (start, stop): the output features this part takes of a fused projection

    @property
    def out_features(self) -> int:
        if self.rows is not None:
            return self.rows[1] - self.rows[0]
        w = meta_value(self.weight)
        return w.shape[0] if self.layout == "out_in" else w.shape[1]

    @property
    def in_features(self) -> int:
        w = meta_value(self.weight)
        return w.shape[1] if self.layout == "out_in" else w.shape[0]


def _is_2d(node) -> bool:
    value = meta_value(node)
    return value is not None and value.dim() == 2


def _match_unbiased(node: fx.Node) -> Optional[LinearMatch]:
    name = op_name(node)
    if name == "linear":
        if node.op == "call_module":
            return None  # an un-inlined nn.Linear: its weights are not values of this graph
        x, weight, bias = node.args[0], arg(node, 1, "weight"), arg(node, 2, "bias")
        if not isinstance(x, fx.Node) or not _is_2d(weight):
            return None
        return LinearMatch(node, x, weight, "out_in", bias if isinstance(bias, fx.Node) else None, [node])
    if name == "matmul" and len(node.args) == 2:
        return _weight_product(node, *node.args)
    if name == "addmm" and len(node.args) == 3 and arg(node, 3, "beta", 1) == 1 and arg(node, 4, "alpha", 1) == 1:
        bias, x, w = node.args
        match = _weight_product(node, x, w)
        b = meta_value(bias)
        if match is None or b is None or b.dim() != 1 or b.shape[0] != match.out_features:
            return None
        match.bias = bias
        return match
    if name == "reshape":
        return _flattened(node)
    return None


def _weight_product(node: fx.Node, x, w) -> Optional[LinearMatch]:
    """node = x @ w with w a 2-D weight, stored transposed ([out, in]) or as it is ([in, out])."""
    if not isinstance(x, fx.Node) or not isinstance(w, fx.Node):
        return None
    if is_transpose_2d(w) and len(w.users) == 1:
        return LinearMatch(node, x, w.args[0], "out_in", None, [w, node])
    if _is_2d(w):
        return LinearMatch(node, x, w, "in_out", None, [node])
    return None


def _flattened(node: fx.Node) -> Optional[LinearMatch]:
    """reshape(mm(reshape(x, [rows, in]), W), x.shape[:-1] + [out]): a linear map of x itself."""
    inner = node.args[0] if node.args else None
    if not isinstance(inner, fx.Node) or op_name(inner) not in ("matmul", "addmm") or len(inner.users) != 1:
        return None
    match = _match_unbiased(inner)
    flat = match.input if match else None
    if flat is None or op_name(flat) != "reshape" or len(flat.users) != 1 or not isinstance(flat.args[0], fx.Node):
        return None
    x, xv, fv, yv = flat.args[0], meta_value(flat.args[0]), meta_value(flat), meta_value(node)
    if xv is None or fv is None or yv is None or xv.dim() < 2 or fv.dim() != 2:
        return None
    if fv.shape[-1] != xv.shape[-1] or tuple(xv.shape[:-1]) != tuple(yv.shape[:-1]):
        return None  # not a pure flatten of the leading dims
    match.output, match.input = node, x
    match.nodes = [flat] + match.nodes + [node]
    return match


def match_linear(node) -> Optional[LinearMatch]:
    if not isinstance(node, fx.Node):
        return None
    match = _match_unbiased(node)
    if match is not None:
        return match
    # x @ W.T + b, with b a 1-D tensor of out_features
    if op_name(node) == "add" and len(node.args) == 2 and arg(node, 2, "alpha", 1) == 1:
        for inner, bias in (node.args, node.args[::-1]):
            match = _match_unbiased(inner) if isinstance(inner, fx.Node) else None
            b = meta_value(bias)
            if (match and match.bias is None and len(inner.users) == 1 and b is not None and b.dim() == 1
                    and b.shape[0] == match.out_features):
                match.output, match.bias = node, bias
                match.nodes.append(node)
                return match
    return None


def _last_dim(dim, value) -> bool:
    return value is not None and isinstance(dim, int) and dim % value.dim() == value.dim() - 1


def _piece(node: fx.Node) -> Optional[tuple]:
    """(source, start, stop) when `node` takes features [start, stop) of the last dim of `source` (a getitem of
    chunk/split, a slice, a narrow); None otherwise."""
    name = op_name(node)
    if name == "getitem" and len(node.args) == 2 and isinstance(node.args[0], fx.Node):
        parts, index = node.args
        value = meta_value(node)
        if isinstance(index, int) and op_name(parts) in ("chunk", "split") and value is not None:
            source = parts.args[0]
            width = meta_value(source).shape[-1] if meta_value(source) is not None else None
            dim = arg(parts, 2, "dim", 0)
            if width is None or not _last_dim(dim, meta_value(source)):
                return None
            if op_name(parts) == "chunk":
                step = -(-width // arg(parts, 1, "chunks"))
                sizes = [min(step, width - i) for i in range(0, width, step)]
            else:
                size = arg(parts, 1, "split_size_or_sections", arg(parts, 1, "split_size", None))
                sizes = list(size) if isinstance(size, (list, tuple)) else [min(size, width - i)
                                                                            for i in range(0, width, size)]
            if not all(isinstance(n, int) for n in sizes) or index >= len(sizes):
                return None
            start = sum(sizes[:index % len(sizes)])
            return source, start, start + sizes[index % len(sizes)]
        # y[..., a:b] (Dynamo keeps Python slicing as getitem)
        source = parts
        value_in = meta_value(source)
        if value_in is None or not isinstance(index, tuple) or not index or not isinstance(index[-1], slice):
            return None
        leading = index[:-1]
        if not (leading in ((Ellipsis,),) or all(i == slice(None) for i in leading) and len(index) == value_in.dim()):
            return None
        cut = index[-1]
        if cut.step not in (None, 1):
            return None
        start, stop, _ = cut.indices(value_in.shape[-1])
        return source, start, stop
    if name in ("slice", "narrow") and isinstance(node.args[0], fx.Node):
        source = node.args[0]
        value_in = meta_value(source)
        dim = arg(node, 1, "dim", 0)
        if not _last_dim(dim, value_in):
            return None
        if name == "slice":
            start, stop = arg(node, 2, "start", 0) or 0, arg(node, 3, "end", None)
            if arg(node, 4, "step", 1) != 1:
                return None
            start, stop, _ = slice(start, stop).indices(value_in.shape[-1])
        else:
            start = arg(node, 2, "start")
            stop = start + arg(node, 3, "length") if isinstance(start, int) else None
        if isinstance(start, int) and isinstance(stop, int):
            return source, start, stop
    return None


def match_linear_part(node) -> Optional[LinearMatch]:
    """A linear map, or the output features [start, stop) of one (`rows` set; the chunk/split/slice nodes join
    `nodes`). A full-width part is the whole projection."""
    match = match_linear(node)
    if match is not None or not isinstance(node, fx.Node):
        return match
    piece = _piece(node)
    if piece is None:
        return None
    source, start, stop = piece
    whole = match_linear(source)
    if whole is None or not 0 <= start < stop <= whole.out_features:
        return None
    parts = [node.args[0]] if op_name(node) == "getitem" and op_name(node.args[0]) in ("chunk", "split") else []
    whole.nodes = whole.nodes + parts + [node]
    whole.output = node
    whole.rows = (start, stop)
    return whole
