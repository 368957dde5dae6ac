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
from bamboo.backends.registry import check_backend_options
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

        return (predictors if isinstance(predictors, Predictors) else Predictors.load(predictors)).check()
    if predictors is not None:
        raise InputError(f"predictors= only applies to sparsity='predictor', not {sparsity!r}")
    return None


def _model_name(model) -> str:
    return type(model).__name__ if isinstance(model, torch.nn.Module) else getattr(model, "__name__", "model")


def make_dynamo_backend(backend: str, sparsity: str, report: CompileReport, name: str, dump_dir=None,
                        binder=None, table: int = 0, keep_dense_where_faster: bool = True, **backend_options):
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
        manager = PassManager(dynamo_passes(sparsity, binder, table, constants, keep_dense_where_faster),
                              dump_dir=dump_dir)
        result = manager(copy_graph_module(gm))
        rewrite = result.stats.get("RewriteToSparseFFN", {})
        report.graphs.append({**rewrite, "history": manager.history})
        if not report.sites:
            warnings.warn(f"bamboo.compile: no ReLU-sparse FFN found in {name}; it runs unchanged (dense). "
                          + describe_rejections(rewrite.get("rejected", [])), stacklevel=2)
        return lowering.compile_graph(result.graph_module, list(example_inputs))

    return bamboo_backend


def _gate_candidates(weight: torch.Tensor, shapes: set):
    """The views of a 2-D weight that can reach the op as a gate weight of one of `shapes`: the weight, its
    transpose (a gate stored [in, out], x @ W), and equal row blocks of either (gate of a fused gate_up)."""
    for view in (weight, weight.t()):
        for intermediate, hidden in shapes:
            if view.shape[1] == hidden and view.shape[0] % intermediate == 0:
                yield from view.split(intermediate)


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
    for weight in list(model.parameters()) + list(model.buffers()):
        if weight.dim() != 2:
            continue
        for gate in _gate_candidates(weight, shapes):
            try:
                binder(gate)  # matched once, and the match kept for the first call
            except InputError:
                pass  # an up weight, or another matrix of the same shape
    matched = binder.matched
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
            dynamic: Optional[bool] = None, fullgraph: bool = False, dump_dir=None,
            keep_dense_where_faster: bool = True, **backend_options):
    """A module with `model`'s call signature whose FFNs run as bamboo::sparse_ffn.

    For an nn.Module the result is a shallow copy sharing the parameters, with forward compiled, so its other
    methods (the Bamboo model's generate) go through the compiled forward; `model` itself is not changed.
    Compilation happens lazily at the first call (per input shape); `result.bamboo_report` says what matched.
    Nothing computed from the weights is baked into a compiled graph: the op reads the weights of each call
    (and keeps a neuron-major copy of each down weight while it is unchanged), so a graph that Dynamo reuses
    for another layer reads that layer's weights, and weights loaded after compiling are used.
    sparsity="predictor" takes `predictors` (from bamboo.calibrate, or a saved file); each is bound to the gate
    weight it was calibrated for (by fingerprint), and another model's predictors are refused.
    On a CPU, an FFN the sparse op cannot beat at its size (measured once per machine, kernels/cpu_crossover.py)
    is left as the model wrote it and listed in `bamboo_report` with the reason; keep_dense_where_faster=False
    rewrites every FFN found.
    """
    check_backend_options(backend, backend_options)
    predictors = _check_sparsity(sparsity, predictors)
    if backend in ("onnxruntime", "tensorrt"):
        return _program_backend(model, backend, sparsity, predictors, backend_options)
    if not (isinstance(model, torch.nn.Module) or callable(model)):
        raise InputError(f"bamboo.compile needs an nn.Module or a callable, got {type(model).__name__}")
    _raise_recompile_limit()
    report = CompileReport()
    binder = _bind_predictors(model, predictors) if predictors is not None else None
    table = register_predictor_table(binder) if binder is not None else 0
    dynamo_backend = make_dynamo_backend(backend, sparsity, report, _model_name(model), dump_dir, binder, table,
                                         keep_dense_where_faster, **backend_options)
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


def _program_backend(model, backend: str, sparsity: str, predictors, options: dict):
    """A program backend fed by bamboo's export of `model` with the examples it is built from."""
    if not isinstance(model, torch.nn.Module):
        raise InputError(f"backend {backend!r} exports the model: it needs an nn.Module, got {type(model).__name__}")
    if backend == "onnxruntime":
        from bamboo.backends.onnxruntime import BFLOAT16_REFUSAL, OnnxRuntimeModule

        if any(p.dtype == torch.bfloat16 for p in model.parameters()):
            raise CompileError(BFLOAT16_REFUSAL)

        def write(args, kwargs, path):
            return export_onnx(model, args, path, example_kwargs=kwargs, sparsity=sparsity, predictors=predictors)

        return OnnxRuntimeModule(write, signature_of=model, **options)
    from bamboo.backends.tensorrt import TensorRTModule

    return TensorRTModule(lambda args: export(model, args, sparsity=sparsity, predictors=predictors), **options)


def export_onnx(model: torch.nn.Module, example_inputs, path, *, example_kwargs: Optional[dict] = None,
                sparsity: str = "exact", predictors=None, dynamic: bool = True, opset: int | None = None,
                external_data: bool | None = None, static_shapes: bool = False):
    """Write `model` as ONNX to `path` (checked writable first) and return the path: bamboo.export, then the
    ONNX lowering of bamboo::sparse_ffn in standard ops, checked with onnx.checker.

    sparsity: "exact" | "predictor" (with predictors=) | "dense". With dynamic=True, batch and sequence dims
    stay dynamic (use examples with both >= 2). `example_kwargs` go to forward by name (a T5's
    decoder_input_ids); the ONNX inputs are the tensors of args and kwargs, named as forward's parameters.
    Weights go to an external data file beside `path` when the model is over 2 GB (or when external_data=True).
    static_shapes=True lowers the FFN without data-dependent shapes (the TensorRT profile; see
    export_tensorrt_onnx). A program the ONNX exporter cannot decompose is exported again under the library
    adapters' ONNX fallback (transformers: eager attention), then with static shapes, with a warning.
    """
    from bamboo.errors import require
    from bamboo.onnx.export import (
        OPSET,
        check_opset,
        first_line,
        lower_to_onnx,
        onnx_error,
        save_onnx,
        warn_if_bfloat16,
        without_torchvision_notice,
    )
    from bamboo.outputs import prepare_output

    require("onnx", "onnx", "bamboo.export_onnx")
    require("onnxscript", "onnx", "bamboo.export_onnx")
    opset = OPSET if opset is None else opset
    check_opset(opset)
    path = prepare_output(path, "ONNX file")  # before the export, which takes minutes on a large model
    args = normalize_example_inputs(example_inputs)
    warn_if_bfloat16(model, args)
    # Some programs fail the ONNX exporter's decomposition (T5: SDPA's strides then a reshape it cannot view):
    # retry under the library adapters' "onnx-retry" (transformers: eager attention), then with static shapes.
    attempts = [("export", dynamic), ("onnx-retry", dynamic)] + ([("onnx-retry", False)] if dynamic else [])
    first_error = None
    for purpose, dynamic_dims in attempts:
        with warnings.catch_warnings(), without_torchvision_notice(), \
                adapted(model, example_kwargs, purpose) as kwargs:
            warnings.filterwarnings("ignore", module="torch.*")
            program = export(model, args, kwargs, sparsity=sparsity, predictors=predictors, dynamic=dynamic_dims)
            try:
                onnx_program = lower_to_onnx(program, args, kwargs, opset=opset, static_shapes=static_shapes)
            except Exception as exc:
                first_error = first_error or exc
                continue
        if first_error is not None:
            warnings.warn(f"bamboo.export_onnx: the ONNX exporter failed on {_model_name(model)} "
                          f"({first_line(first_error)}); exported again with library adapters for ONNX"
                          + ("" if dynamic_dims == dynamic else " and static shapes (the example's)"), stacklevel=2)
        return save_onnx(onnx_program, program, path, external_data=external_data, dynamic=dynamic_dims)
    raise onnx_error(model, first_error) from first_error


def export_tensorrt_onnx(model, example_inputs, path, *, sparsity: str = "exact", predictors=None,
                         profiles: dict | None = None, max_batch: int = 16, max_seq: int = 2048):
    """ONNX in bamboo's TensorRT profile (static shapes, static TopK k <= 3840, optimization profiles in the
    metadata), checked against it: what TensorRT's ONNX parser and bamboo.onnx.tensorrt_profile's
    build_tensorrt_engine take."""
    from bamboo.onnx.tensorrt_profile import check_predictor_caps, finish_tensorrt_profile

    predictors = _check_sparsity(sparsity, predictors)
    check_predictor_caps(predictors)
    path = export_onnx(model, example_inputs, path, sparsity=sparsity, predictors=predictors, static_shapes=True)
    return finish_tensorrt_profile(path, example_inputs, profiles, max_batch, max_seq)


def export_tensorrt(model: torch.nn.Module, example_inputs, path, *, sparsity: str = "exact", predictors=None,
                    **trt_options):
    """Compile `model` with torch-tensorrt (bamboo::sparse_ffn through bamboo's converter) and save it with
    torch_tensorrt.save: an ExportedProgram holding the engines. Needs torch-tensorrt, TensorRT and a GPU; the
    checks run before any export."""
    from bamboo.backends.tensorrt import TensorRTModule
    from bamboo.outputs import prepare_output

    predictors = _check_sparsity(sparsity, predictors)
    path = prepare_output(path, "TensorRT program")
    args = normalize_example_inputs(example_inputs)
    module = TensorRTModule(lambda a: export(model, a, sparsity=sparsity, predictors=predictors), **trt_options)
    return module.save(path, args)


def inductor_pass(sparsity: str = "exact", predictors=None):
    """bamboo as an Inductor post-grad pass for any torch.compile pipeline:
    `torch.compile(model, options={"post_grad_custom_post_pass": bamboo.inductor_pass()})`. The returned pass
    lists what it matched in `.sites` (with the refusals) and warns for a graph with no site."""
    from bamboo.calibrate.predictors import PredictorBinder
    from bamboo.passes.inductor_pass import BambooInductorPass

    if sparsity not in ("exact", "predictor"):
        raise InputError(f"inductor_pass takes sparsity='exact' or 'predictor', got {sparsity!r} (for dense, "
                         "leave the pass out)")
    predictors = _check_sparsity(sparsity, predictors)
    if predictors is None:
        return BambooInductorPass(sparsity)
    binder = PredictorBinder(predictors)
    table = register_predictor_table(binder)
    graph_pass = BambooInductorPass(sparsity, binder, table, predictors.digest())
    weakref.finalize(graph_pass, unregister_predictor_table, table)
    return graph_pass


def inspect(model: torch.nn.Module, example_inputs, example_kwargs: Optional[dict] = None,
            predictors=None) -> SiteTable:
    """The FFN sites bamboo would rewrite (and the candidates it refused, with the reason). With `predictors`,
    the table also shows each site's predictor threshold, cap and measured recall and density."""
    with adapted(model, example_kwargs, "export") as example_kwargs:
        program = export_program(model, example_inputs, example_kwargs, dynamic=False)
    report = detect_ffn_sites(program.graph)
    extra = None
    if predictors is not None:
        from bamboo.calibrate.train_predictors import predictors_for_sites

        predictors = _check_sparsity("predictor", predictors)
        found = predictors_for_sites(model, program, report.sites, predictors)  # the checks compile makes
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
