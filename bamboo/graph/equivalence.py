"""Whether two FX nodes compute the same value: the same pure op on equivalent arguments. A model that feeds
gate and up from the same normalized input computed twice (`gate(norm(x)) ... up(norm(x))`) holds two norm
chains; the FFN matcher treats them as one input (common-subexpression elimination, local to the match)."""
from __future__ import annotations

import torch
import torch.fx as fx

# name fragments of ops with effects or randomness: never merged
_IMPURE = ("rand", "dropout", "bernoulli", "normal", "multinomial", "uniform", "poisson", "exponential",
           "setitem", "log_api_usage", "print", "empty")


def is_pure(node: fx.Node) -> bool:
    if node.op not in ("call_function", "call_method"):
        return False
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        return not target._schema.is_mutable and torch.Tag.nondeterministic_seeded not in target.tags
    name = target if isinstance(target, str) else getattr(target, "__name__", "")
    if not name or name.endswith("_") and not name.startswith("__") or "out" in node.kwargs:
        return False
    return not any(word in name for word in _IMPURE)


def _same_arg(a, b, seen: dict, depth: int) -> bool:
    if isinstance(a, fx.Node) or isinstance(b, fx.Node):
        return isinstance(a, fx.Node) and isinstance(b, fx.Node) and _same(a, b, seen, depth)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same_arg(x, y, seen, depth) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same_arg(a[k], b[k], seen, depth) for k in a)
    return type(a) is type(b) and a == b


def _same(a: fx.Node, b: fx.Node, seen: dict, depth: int) -> bool:
    if a is b:
        return True
    if a.op == "get_attr" and b.op == "get_attr":
        return a.target == b.target
    if depth <= 0 or a.op != b.op or a.target != b.target or not is_pure(a):
        return False
    key = (a, b)
    if key not in seen:
        seen[key] = False  # a cycle cannot occur in a DAG; this guards the recursion anyway
        seen[key] = (_same_arg(a.args, b.args, seen, depth - 1) and _same_arg(a.kwargs, b.kwargs, seen, depth - 1))
    return seen[key]


def same_value(a, b, depth: int = 24) -> bool:
    """True when `a` and `b` are the same node or provably compute the same value."""
    return isinstance(a, fx.Node) and isinstance(b, fx.Node) and _same(a, b, {}, depth)


def duplicate_nodes(keep: fx.Node, twin: fx.Node) -> list:
    """The nodes of `twin`'s computation that are not shared with `keep`'s (what dies when users of `twin` read
    `keep` instead), in graph order."""
    keep_side: set = set()
    stack = [keep]
    while stack:
        n = stack.pop()
        if n not in keep_side:
            keep_side.add(n)
            stack.extend(n.all_input_nodes)
    found: list = []
    stack = [twin]
    while stack:
        n = stack.pop()
        if n in keep_side or n in found or not is_pure(n):
            continue
        found.append(n)
        stack.extend(n.all_input_nodes)
    order = {n: i for i, n in enumerate(twin.graph.nodes)}
    return sorted(found, key=order.__getitem__)
