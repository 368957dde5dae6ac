"""Capture a model as an FX graph: torch.export (dynamic batch and sequence dims) or Dynamo (a torch.compile
backend that receives the captured graph)."""
from __future__ import annotations

import contextlib
import re
import warnings
from typing import Callable, Optional

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


# Capture adapters, registered by bamboo.integrations (this layer knows no model library). An adapter is
# `adapter(model, kwargs, purpose) -> context manager yielding kwargs`: purpose "export" (torch.export: it may
# add example kwargs, say turning a cache off) or "compile" (around each call of a Dynamo-compiled forward).
CaptureAdapter = Callable[[torch.nn.Module, dict, str], contextlib.AbstractContextManager]
_ADAPTERS: list[CaptureAdapter] = []


def register_capture_adapter(adapter: CaptureAdapter) -> CaptureAdapter:
    if adapter not in _ADAPTERS:
        _ADAPTERS.append(adapter)
    return adapter


@contextlib.contextmanager
def adapted(model, kwargs: Optional[dict], purpose: str):
    """Run the registered adapters for `model`; yields the kwargs to capture with."""
    kwargs = dict(kwargs or {})
    with contextlib.ExitStack() as stack:
        for adapter in _ADAPTERS:
            kwargs = stack.enter_context(adapter(model, kwargs, purpose))
        yield kwargs


def _export(model, args, kwargs, dynamic_shapes):
    return torch.export.export(model, args, kwargs, dynamic_shapes=dynamic_shapes, strict=False)


def _static_sequence(spec):
    """Keep dim 0 (batch) dynamic, make every other dim static."""
    return pytree.tree_map(lambda d: {0: d[0]} if isinstance(d, dict) and 0 in d else d, spec,
                           is_leaf=lambda d: isinstance(d, dict) and all(isinstance(k, int) for k in d))


def export_program(model: torch.nn.Module, example_inputs, example_kwargs: Optional[dict] = None,
                   dynamic: bool = True) -> ExportedProgram:
    """torch.export with dynamic batch and sequence dims. A model whose code cannot take a dynamic sequence
    (a guard torch.export cannot keep symbolic, such as `is_causal=... and q_len > 1` handed to SDPA as a
    SymBool) is exported with a static sequence dim, then fully static, with a warning saying why."""
    args = normalize_example_inputs(example_inputs)
    kwargs = example_kwargs or {}
    if not isinstance(model, torch.nn.Module):
        raise CompileError(f"bamboo.export needs an nn.Module, got {type(model).__name__}")
    attempts = [None]
    if dynamic:
        arg_spec, kwarg_spec = automatic_dynamic_shapes(args, kwargs)
        full = _by_signature(model, arg_spec, kwarg_spec)
        attempts = [full, _static_sequence(full), None]
    first_error = None
    for index, dynamic_shapes in enumerate(attempts):
        try:
            program = _export(model, args, kwargs, dynamic_shapes)
        except Exception as exc:  # export errors are long; keep the first lines
            first_error = first_error or exc
            if _not_shape_related(exc) or index == len(attempts) - 1:
                raise _capture_error(model, first_error) from exc
            continue
        if index > 0:
            what = "a static sequence dim (batch stays dynamic)" if index == 1 else "static shapes"
            warnings.warn(f"bamboo: torch.export could not keep {type(model).__name__}'s dims dynamic "
                          f"({_first_line(first_error)}); exported with {what}: the program runs only for "
                          "inputs of the example's shapes in those dims", stacklevel=3)
        return program
    raise AssertionError("unreachable")


def _first_line(exc: Exception) -> str:
    return next((line for line in str(exc).strip().splitlines() if line.strip()), type(exc).__name__)[:200]


def _not_shape_related(exc: Exception) -> bool:
    """Errors no choice of static dims can fix: a non-pytree output, wrong arguments."""
    text = str(exc)
    return "which is not a known type" in text or isinstance(exc, TypeError) and "argument" in text


def _capture_error(model, exc: Exception) -> CompileError:
    summary = "\n".join(str(exc).strip().splitlines()[:6])
    name = type(model).__name__
    unknown = re.search(r"Found <class '([^']+)'> in output, which is not a known type", str(exc))
    if unknown:
        return CompileError(f"torch.export could not capture {name}: its forward returns a {unknown.group(1)}, "
                            "which is not a pytree (torch.export returns only tensors and containers of them). "
                            "Pass example kwargs that turn it off (for a cache: use_cache=False), or register the "
                            "type with torch.utils._pytree.")
    return CompileError(f"torch.export could not capture {name} with these example inputs:\n"
                        f"{summary}\nCheck that the example inputs are what forward() takes.")


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
