"""Pass infrastructure in the shape of torch.fx.passes.infra: a pass is a callable GraphModule -> PassResult,
and a PassManager runs an ordered list, checks the graph after each pass and can dump it before and after."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
import torch.fx as fx

from bamboo.errors import CompileError
from bamboo.graph.inspect_graph import format_graph, op_counts

log = logging.getLogger("bamboo.passes")


@dataclass
class PassResult:
    graph_module: fx.GraphModule
    modified: bool
    stats: dict = field(default_factory=dict)


class GraphPass:
    """Base class: subclasses implement `call(gm) -> PassResult`; `__call__` adds nothing but a name."""

    @property
    def name(self) -> str:
        return type(self).__name__

    def call(self, gm: fx.GraphModule) -> PassResult:
        raise NotImplementedError

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        return self.call(gm)


@dataclass
class PassRecord:
    name: str
    modified: bool
    stats: dict
    ops_before: dict
    ops_after: dict


def value_less_nodes(gm: fx.GraphModule) -> set:
    """Call and get_attr nodes without a fake value. Captured graphs hold some (Dynamo's
    `_log_api_usage_once`, `setitem`, autocast enter/exit, get_attr of a `wrap_with_set_grad_enabled`
    subgraph): they produce no tensor a pass reads, so only the ones a pass adds are errors."""
    return {n for n in gm.graph.nodes if n.op in ("call_function", "call_method", "get_attr")
            and "val" not in n.meta and "example_value" not in n.meta}


def check_graph(gm: fx.GraphModule, require_meta: bool = True, value_less_before: frozenset = frozenset()) -> None:
    """Graph lint, and every node a pass created carries a fake value (torch.compile needs it later);
    `value_less_before`: the nodes that had none when the graph was captured."""
    gm.graph.lint()
    if require_meta:
        added = value_less_nodes(gm) - value_less_before
        missing = [n.name for n in gm.graph.nodes if n in added]
        if missing:
            raise CompileError(f"nodes without meta['val'] after a pass: {missing[:10]}")


class PassManager:
    def __init__(self, passes: Sequence[Callable[[fx.GraphModule], PassResult]], run_checks_after_each_pass=True,
                 require_meta: bool = True, dump_dir: Optional[str | Path] = None):
        self.passes = list(passes)
        self.run_checks_after_each_pass = run_checks_after_each_pass
        self.require_meta = require_meta
        self.dump_dir = Path(dump_dir) if dump_dir else None
        self.history: list[PassRecord] = []

    def _dump(self, index: int, name: str, when: str, gm: fx.GraphModule) -> None:
        text = format_graph(gm)
        if self.dump_dir is not None:
            self.dump_dir.mkdir(parents=True, exist_ok=True)
            graph_id = len(list(self.dump_dir.glob(f"*_{index:02d}_{name}_{when}.txt")))
            (self.dump_dir / f"g{graph_id}_{index:02d}_{name}_{when}.txt").write_text(text + "\n")
        if log.isEnabledFor(logging.DEBUG):
            log.debug("graph %s pass %d (%s):\n%s", when, index, name, text)

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        modified = False
        stats = {}
        captured_value_less = frozenset(value_less_nodes(gm))
        for index, graph_pass in enumerate(self.passes):
            name = getattr(graph_pass, "name", getattr(graph_pass, "__name__", type(graph_pass).__name__))
            before = dict(op_counts(gm))
            self._dump(index, name, "before", gm)
            result = graph_pass(gm)
            if not isinstance(result, PassResult):
                raise CompileError(f"pass {name} returned {type(result).__name__}, not PassResult")
            gm = result.graph_module
            if result.modified:
                # No global dead-code elimination: FX's treats in-place method calls (the KV cache's
                # index_copy_) as pure. Each pass erases the nodes it made dead.
                gm.recompile()
            self._dump(index, name, "after", gm)
            if self.run_checks_after_each_pass:
                check_graph(gm, self.require_meta, captured_value_less)
            self.history.append(PassRecord(name, result.modified, result.stats, before, dict(op_counts(gm))))
            stats[name] = result.stats
            modified |= result.modified
            log.info("pass %s: modified=%s %s", name, result.modified, _loggable(result.stats))
        return PassResult(gm, modified, stats)


def _loggable(stats: dict) -> dict:
    """Stats with tensors (the weights a pass adds as inputs) shown by shape, not by value."""
    def show(value):
        if isinstance(value, torch.Tensor):
            return f"tensor{list(value.shape)}"
        if isinstance(value, (list, tuple)):
            return [show(v) for v in value]
        return value

    return {key: show(value) for key, value in stats.items()}
