"""Graph utilities: op counts, readable printing, and each node's source module path."""
from __future__ import annotations

import re
from collections import Counter
from typing import Optional

import torch
import torch.fx as fx

from bamboo.graph.node_ops import op_name

_DYNAMO_ROOT = re.compile(r"^L\['[^']*'\]\.?")


def module_path(node: fx.Node) -> Optional[str]:
    """Dotted path of the innermost module that produced `node` (e.g. 'model.layers.3.mlp'); None if unknown."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path = list(stack.values())[-1][0]
    path = _DYNAMO_ROOT.sub("", path)  # Dynamo writes L['self'].layers.0.mlp
    path = re.sub(r"\[(\d+)\]", r".\1", path).replace("._modules['", ".").replace("']", "")
    return path


def common_module_path(nodes: list[fx.Node]) -> Optional[str]:
    """The innermost module containing all of `nodes` ('' for the root module)."""
    paths = [p for p in (module_path(n) for n in nodes) if p is not None]
    if not paths:
        return None
    parts = [p.split(".") if p else [] for p in paths]
    common = []
    for level in zip(*parts):
        if len(set(level)) != 1:
            break
        common.append(level[0])
    return ".".join(common)


def target_name(node: fx.Node) -> str:
    if node.op == "call_method":
        return f"Tensor.{node.target}"
    if node.op == "call_module":
        return f"module:{node.target}"
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        return f"{target.namespace}.{target._opname}"
    canonical = op_name(node)
    return canonical or getattr(target, "__name__", str(target))


def op_counts(gm: fx.GraphModule) -> Counter:
    """How many call nodes of each op the graph holds ('aten.linear', 'bamboo.sparse_ffn', 'relu', ...)."""
    return Counter(target_name(n) for n in gm.graph.nodes if n.op in ("call_function", "call_method", "call_module"))


def format_graph(gm: fx.GraphModule) -> str:
    """One line per node: `name = op(args)  # module path`."""
    lines = []
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            lines.append(f"input {node.name}")
        elif node.op == "output":
            lines.append(f"return {node.args[0]}")
        elif node.op == "get_attr":
            lines.append(f"{node.name} = self.{node.target}")
        else:
            args = ", ".join(str(a) for a in node.args)
            kwargs = ", ".join(f"{k}={v}" for k, v in node.kwargs.items())
            where = module_path(node)
            lines.append(f"{node.name} = {target_name(node)}({', '.join(filter(None, [args, kwargs]))})"
                         + (f"  # {where}" if where else ""))
    return "\n".join(lines)
