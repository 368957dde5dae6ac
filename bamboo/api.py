"""The public entry points: compile, inspect, export."""
from __future__ import annotations

import copy
import logging
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.fx as fx

from bamboo.backends import get_backend
from bamboo.errors import CompileError, InputError
from bamboo.graph.capture import (
    adapted,
    copy_graph_module,
    export_program,
    normalize_example_inputs,
    placeholder_constants,
)
from bamboo.graph.site_table import SiteTable, describe_rejections
from bamboo.ops.bound_weights import register_predictor_table, unregister_predictor_table
from bamboo.passes import PassManager, default_passes, detect_ffn_sites, dynamo_passes

SPARSITY_MODES = ("exact", "dense", "predictor")
log = logging.getLogger("bamboo.compile")


@dataclass
class CompileReport:
    """What the passes did to each graph Dynamo captured (one entry per compiled graph)."""

    graphs: list = field(default_factory=list)
    compiles: int = 0  # graphs compiled so far, dense ones included

    @property
    def sites(self) -> SiteTable:
        sites, rejected = [], []
        for g in self.graphs:
            sites += g.get("sites", [])
            rejected += g.get("rejected", [])
        return SiteTable(sites, rejected)


def _check_sparsity(sparsity: str, predictors=None):
    """Validate the mode; load predictors given as a path."""
    if sparsity not in SPARSITY_MODES:
        raise InputError(f"sparsity must be one of {SPARSITY_MODES}, got {sparsity!r}")
    if sparsity == "predictor":
        if predictors is None:
            raise InputError("sparsity='predictor' needs predictors=: a Predictors object from bamboo.calibrate or "
                             "the path of a file saved by `bamboo calibrate`")
        from bamboo.calibrate.predictors import Predictors

        return predictors if isinstance(predictors, Predictors) else Predictors.load(predictors)
    if predictors is not None:
        raise InputError(f"predictors= only applies to sparsity='predictor', not {sparsity!r}")
    return None


def _model_name(model) -> str:
    return type(model).__name__ if isinstance(model, torch.nn.Module) else getattr(model, "__name__", "model")


def make_dynamo_backend(backend: str, sparsity: str, report: CompileReport, name: str, dump_dir=None,
                        binder=None, table: int = 0, **backend_options):
    """A torch.compile backend: run the passes on the captured graph, then hand it to the bamboo backend.

    A graph Dynamo hands over may later run for other layers (parameters are its inputs, unguarded), so the
    passes store nothing layer-specific in it (bamboo/ops/bound_weights.py)."""
    lowering = get_backend(backend, **backend_options)

    def bamboo_backend(gm: fx.GraphModule, example_inputs: list):
        # one line per graph Dynamo hands over: a new shape bucket or a recompile shows up here
        # (TORCH_LOGS=recompiles says why Dynamo recompiled)
        shapes = [tuple(t.shape) for t in example_inputs
                  if isinstance(t, torch.Tensor) and not isinstance(t, torch.nn.Parameter)]
        log.info("bamboo.compile: compiling graph %d of %s (%s, %s backend), activation shapes %s",
                 report.compiles + 1, name, sparsity, backend, shapes[:6])
        report.compiles += 1
        if sparsity == "dense":
            return lowering.compile_graph(gm, example_inputs)
        constants = placeholder_constants(gm, example_inputs)
        manager = PassManager(dynamo_passes(sparsity, binder, table, constants), dump_dir=dump_dir)
        result = manager(copy_graph_module(gm))
        rewrite = result.stats.get("RewriteToSparseFFN", {})
        report.graphs.append({**rewrite, "history": manager.history})
        if not report.sites:
            warnings.warn(f"bamboo.compile: no ReLU-sparse FFN found in {name}; it runs unchanged (dense). "
                          + describe_rejections(rewrite.get("rejected", [])), stacklevel=2)
        return lowering.compile_graph(result.graph_module, list(example_inputs))

    return bamboo_backend


def _bind_predictors(model, predictors):
    """A PredictorBinder for `predictors`, with every gate weight of `model` matched up front (the table built
    at compile time over the model's FFNs): another model's predictors are refused before the first call, and
    predictors that match no weight of the model are named."""
    from bamboo.calibrate.predictors import PredictorBinder
    from bamboo.errors import InputError

    binder = PredictorBinder(predictors)
    if not isinstance(model, torch.nn.Module):
        return binder
    shapes = {(p.w_out.shape[0], p.w_in.shape[1]) for p in predictors.values()}
    matched = set()
    for weight in list(model.parameters()) + list(model.buffers()):
        if weight.dim() != 2:
            continue
        for gate in (weight, weight.t()):  # a gate stored [in, out] (x @ W) reaches the op transposed
            if tuple(gate.shape) in shapes:
                try:
                    matched.add(binder.find(gate).module)
                    binder(gate)  # keep the match for the first call
                except InputError:
                    pass  # an up weight, or another matrix of the same shape
    if predictors and not matched:
        raise InputError(f"none of the {len(predictors)} predictors fits a gate weight of {_model_name(model)}: "
                         "they belong to another model (or to weights changed since calibration); run "
                         "`bamboo calibrate` for this one")
    missing = sorted(set(predictors) - matched)
    if missing:
        warnings.warn(f"bamboo.compile: {len(missing)} predictor(s) match no gate weight of {_model_name(model)} "
                      f"({missing[:4]}); FFNs whose gate matches none stop with an error", stacklevel=3)
    return binder


def _raise_recompile_limit(minimum: int = 64) -> None:
    """Every bamboo.compile of a model class adds cache entries to the same forward code object; past Dynamo's
    default limit of 8 it silently runs eager (dense). Compiling several variants in one process is normal
    here (dense, exact, predictor at several thresholds), so allow more."""
    config = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(config, name) and getattr(config, name) < minimum:
            setattr(config, name, minimum)


def _surface_bamboo_errors(compiled_fn):
    """Dynamo wraps whatever a backend raises in BackendCompilerFailed with a long trace; a BambooError (wrong
    predictors, a bad argument) is re-raised as itself, so the user reads the problem and the fix."""
    import functools

    from torch._dynamo.exc import BackendCompilerFailed

    from bamboo.errors import BambooError

    @functools.wraps(compiled_fn)
    def run(*args, **kwargs):
        try:
            return compiled_fn(*args, **kwargs)
        except BackendCompilerFailed as exc:
            if isinstance(exc.inner_exception, BambooError):
                raise exc.inner_exception from None
            raise

    return run


def _under_adapters(model, compiled_fn):
    """Each call runs under the capture adapters registered for the model's library (bamboo.integrations:
    a transformers MoE runs its experts one at a time, so Dynamo sees each expert's FFN)."""
    import functools

    @functools.wraps(compiled_fn)
    def run(*args, **kwargs):
        with adapted(model, {}, "compile"):
            return compiled_fn(*args, **kwargs)

    return run


def compile(model, backend: str = "eager", sparsity: str = "exact", *, predictors=None,
            dynamic: Optional[bool] = None, fullgraph: bool = False, dump_dir=None, **backend_options):
    """A module with `model`'s call signature whose FFNs run as bamboo::sparse_ffn.

    For an nn.Module the result is a shallow copy sharing the parameters, with forward compiled, so its other
    methods (the Bamboo model's generate) go through the compiled forward; `model` itself is not changed.
    Compilation happens lazily at the first call (per input shape); `result.bamboo_report` says what matched.
    Nothing computed from the weights is baked into a compiled graph: the op reads the weights of each call
    (and keeps a neuron-major copy of each down weight while it is unchanged), so a graph that Dynamo reuses
    for another layer reads that layer's weights, and weights loaded after compiling are used.
    sparsity="predictor" takes `predictors` (from bamboo.calibrate, or a saved file); each is bound to the gate
    weight it was calibrated for (by fingerprint), and another model's predictors are refused.
    """
    predictors = _check_sparsity(sparsity, predictors)
    if backend == "onnxruntime":
        from bamboo.backends.onnxruntime import OnnxRuntimeModule

        return OnnxRuntimeModule(model, sparsity=sparsity, predictors=predictors, **backend_options)
    if backend == "tensorrt":
        from bamboo.backends.tensorrt import TensorRTModule

        return TensorRTModule(model, sparsity=sparsity, predictors=predictors, **backend_options)
    if not (isinstance(model, torch.nn.Module) or callable(model)):
        raise InputError(f"bamboo.compile needs an nn.Module or a callable, got {type(model).__name__}")
    _raise_recompile_limit()
    report = CompileReport()
    binder = _bind_predictors(model, predictors) if predictors is not None else None
    table = register_predictor_table(binder) if binder is not None else 0
    dynamo_backend = make_dynamo_backend(backend, sparsity, report, _model_name(model), dump_dir, binder, table,
                                         **backend_options)
    if isinstance(model, torch.nn.Module):
        compiled = copy.copy(model)
        compiled.forward = _under_adapters(model, _surface_bamboo_errors(
            torch.compile(model.forward, backend=dynamo_backend, dynamic=dynamic, fullgraph=fullgraph)))
    else:
        compiled = _surface_bamboo_errors(torch.compile(model, backend=dynamo_backend, dynamic=dynamic,
                                                        fullgraph=fullgraph))
    compiled.bamboo_report = report
    if table:  # the predictor table lives as long as the compiled model
        weakref.finalize(compiled, unregister_predictor_table, table)
    return compiled


def inspect(model: torch.nn.Module, example_inputs, example_kwargs: Optional[dict] = None,
            predictors=None) -> SiteTable:
    """The FFN sites bamboo would rewrite (and the candidates it refused, with the reason). With `predictors`,
    the table also shows each site's predictor threshold, cap and measured recall and density."""
    with adapted(model, example_kwargs, "export") as example_kwargs:
        program = export_program(model, example_inputs, example_kwargs, dynamic=False)
    report = detect_ffn_sites(program.graph)
    extra = None
    if predictors is not None:
        predictors = _check_sparsity("predictor", predictors)
        found = [predictors.find(s.module) for s in report.sites]
        extra = {
            "threshold": [f"{p.threshold:.3f}" if p else "-" for p in found],
            "cap k": [(p.top_k or "-") if p else "-" for p in found],
            "recall": [f"{p.stats.get('recall', float('nan')):.3f}" if p else "-" for p in found],
            "predicted active": [f"{p.stats.get('density', float('nan')):.1%}" if p else "-" for p in found],
        }
    return SiteTable(report.sites, report.rejected, extra)


def _drop_unused_parameters(gm: fx.GraphModule) -> None:
    """Remove parameters and buffers no node reads (the [out, in] down weights after the layout pass)."""
    for node in list(gm.graph.nodes):
        if node.op == "get_attr" and not node.users:  # dead reads (a tied weight read under both names)
            gm.graph.erase_node(node)
    gm.recompile()
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for name, _ in list(gm.named_parameters(remove_duplicate=False)) + list(gm.named_buffers(remove_duplicate=False)):
        if name not in used:
            owner_path, _, attr = name.rpartition(".")
            owner = gm.get_submodule(owner_path) if owner_path else gm
            if attr in owner._parameters:
                del owner._parameters[attr]
            elif attr in owner._buffers:
                del owner._buffers[attr]


def export(model: torch.nn.Module, example_inputs, example_kwargs: Optional[dict] = None, *,
           sparsity: str = "exact", predictors=None, dynamic: bool = True, dump_dir=None):
    """An ExportedProgram with the FFNs rewritten; save it with torch.export.save (load needs `import bamboo`).

    The down projections are stored neuron-major only (the [out, in] copies are dropped), so the program holds
    each weight once. With dynamic=True, batch and sequence dims stay dynamic (use examples with both >= 2).
    """
    predictors = _check_sparsity(sparsity, predictors)
    args = normalize_example_inputs(example_inputs)
    with adapted(model, example_kwargs, "export") as example_kwargs:
        return _export_rewritten(model, args, example_kwargs, sparsity, predictors, dynamic, dump_dir)


def _export_rewritten(model, args, example_kwargs, sparsity, predictors, dynamic, dump_dir):
    program = export_program(model, args, example_kwargs, dynamic)
    if sparsity == "dense":
        return program
    gm = program.module()
    from bamboo.calibrate.predictors import PredictorBinder

    binder = PredictorBinder(predictors) if predictors is not None else None
    result = PassManager(default_passes(sparsity, binder), dump_dir=dump_dir)(gm)
    gm = result.graph_module
    rewrite = result.stats.get("RewriteToSparseFFN", {})
    if not rewrite.get("rewritten"):
        warnings.warn(f"bamboo.export: no ReLU-sparse FFN found in {_model_name(model)}; exported unchanged. "
                      + describe_rejections(rewrite.get("rejected", [])), stacklevel=2)
        return program
    _drop_unused_parameters(gm)
    rewritten = export_program(gm, args, example_kwargs, dynamic)
    if not any(n.target is torch.ops.bamboo.sparse_ffn.default for n in rewritten.graph.nodes):
        raise CompileError("re-export lost the bamboo::sparse_ffn nodes; please report this with the model")
    return rewritten
