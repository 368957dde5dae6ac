"""Capture a model as an FX graph: torch.export (dynamic batch and sequence dims) or Dynamo (a torch.compile
backend that receives the captured graph)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch.export import Dim, ExportedProgram

from bamboo.errors import CompileError


def automatic_dynamic_shapes(args: tuple, kwargs: Optional[dict] = None):
    """Every dim of every tensor input marked Dim.AUTO: export keeps dynamic what the model allows (batch,
    sequence) and specialises the rest (hidden size). Dims of size 0 or 1 in the examples specialise."""

    def spec(value):
        if isinstance(value, torch.Tensor):
            return {i: Dim.AUTO for i in range(value.dim())}
        return None

    return pytree.tree_map(spec, args), pytree.tree_map(spec, kwargs or {})


def normalize_example_inputs(example_inputs) -> tuple:
    """A tuple of positional examples, tensors made contiguous: export records the examples' strides, and a
    sliced example (ids[:, :6]) makes the ONNX exporter's decomposition fail in its input guards."""
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    elif isinstance(example_inputs, list):
        example_inputs = tuple(example_inputs)
    elif not isinstance(example_inputs, tuple):
        raise CompileError(f"example_inputs must be a tensor or a tuple of positional arguments, got "
                           f"{type(example_inputs).__name__}")
    return tuple(a.contiguous() if isinstance(a, torch.Tensor) else a for a in example_inputs)


def export_program(model: torch.nn.Module, example_inputs, example_kwargs: Optional[dict] = None,
                   dynamic: bool = True) -> ExportedProgram:
    args = normalize_example_inputs(example_inputs)
    kwargs = example_kwargs or {}
    if not isinstance(model, torch.nn.Module):
        raise CompileError(f"bamboo.export needs an nn.Module, got {type(model).__name__}")
    dynamic_shapes = None
    if dynamic:
        arg_spec, kwarg_spec = automatic_dynamic_shapes(args, kwargs)
        dynamic_shapes = _by_signature(model, arg_spec, kwarg_spec)
    try:
        return torch.export.export(model, args, kwargs, dynamic_shapes=dynamic_shapes, strict=False)
    except Exception as exc:  # export errors are long; keep the first lines
        summary = "\n".join(str(exc).strip().splitlines()[:6])
        raise CompileError(f"torch.export could not capture {type(model).__name__} with these example inputs:\n"
                           f"{summary}\nCheck that the example inputs are what forward() takes.") from exc


def _by_signature(model, arg_spec, kwarg_spec):
    """dynamic_shapes shaped like forward's signature, as torch.export wants: one entry per positional
    parameter, the trailing ones grouped into a tuple for *args, or a dict by name when kwargs are given."""
    import inspect

    params = list(inspect.signature(model.forward).parameters.values())
    fixed = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    varargs = any(p.kind is p.VAR_POSITIONAL for p in params)
    specs = list(arg_spec)
    if varargs and len(specs) > len(fixed):
        specs = specs[:len(fixed)] + [tuple(specs[len(fixed):])]
    if not kwarg_spec:
        return tuple(specs)
    names = [p.name for p in fixed] + ([next(p.name for p in params if p.kind is p.VAR_POSITIONAL)] if varargs else [])
    return {**dict(zip(names, specs)), **kwarg_spec}




def placeholder_constants(gm: fx.GraphModule, example_inputs: list) -> dict[str, torch.Tensor]:
    """Placeholders that Dynamo lifted from module parameters and buffers (static inputs), by name."""
    constants = {}
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for node, value in zip(placeholders, example_inputs):
        if isinstance(value, torch.Tensor) and (
                isinstance(value, torch.nn.Parameter) or getattr(value, "_dynamo_static_input_type", None)):
            constants[node.name] = value
    return constants


def copy_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A GraphModule with its own graph (node meta shared): Dynamo keeps reading the graph it handed to the
    backend, so passes must not change that one's inputs in place."""
    graph = fx.Graph()
    copies: dict = {}
    output = graph.graph_copy(gm.graph, copies)
    graph.output(output)
    copy = fx.GraphModule(gm, graph)
    # What AOTAutograd reads to tell Dynamo graphs apart: without it, it marks no input static, and CUDA graphs
    # (mode="reduce-overhead") would copy every weight into graph memory on each replay.
    copy.meta.update(gm.meta)
    if hasattr(gm, "_param_name_to_source"):
        copy._param_name_to_source = gm._param_name_to_source
    for old, new in copies.items():
        if old.op == "placeholder" and hasattr(old, "_dynamo_source"):
            new._dynamo_source = old._dynamo_source
    return copy
