"""The TensorRT profile for ONNX: what bamboo exports for TensorRT's ONNX parser, a checker that validates any
ONNX file against the profile and names each violation, and an engine builder (tensorrt.OnnxParser).

The profile: only ops TensorRT 10's ONNX parser implements; no data-dependent output shapes (no NonZero:
bamboo lowers exact mode densely and predictor mode with a static TopK); TopK's k a constant of at most 3840;
every dynamic input dimension covered by an optimization profile (min/opt/max shapes, stored in the model's
metadata under `bamboo.tensorrt.profiles`, which the engine builder applies).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from bamboo.errors import CompileError, InputError, require
from bamboo.ops.sparse_ffn_onnx import TENSORRT_MAX_TOPK

PROFILE_KEY = "bamboo.tensorrt.profiles"

# Operators of TensorRT 10's ONNX parser (onnx-tensorrt's operator support table) that bamboo's exports use or
# that LLM graphs commonly contain. Anything else is reported, so the list errs on the side of caution.
TENSORRT_ONNX_OPS = frozenset("""
Abs Add And ArgMax ArgMin Cast CastLike Ceil Clip Concat Constant ConstantOfShape Cos CumSum Div Einsum Equal Erf
Exp Expand Flatten Floor Gather GatherElements GatherND Gelu Gemm Greater GreaterOrEqual Identity IsInf IsNaN
LayerNormalization LeakyRelu Less LessOrEqual Log LogSoftmax MatMul Max Mean Min Mod Mul Neg Not OneHot Or Pad Pow
Range Reciprocal ReduceL2 ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum Relu Reshape ScatterElements
ScatterND Shape Sigmoid Sign Sin Slice Softmax Softplus Split Sqrt Squeeze Sub Sum Tanh Tile TopK Transpose Trilu
Unsqueeze Where Xor
""".split())
DATA_DEPENDENT_OPS = frozenset({"NonZero", "Unique", "Compress", "NonMaxSuppression"})


@dataclass
class Violation:
    node: str
    problem: str

    def __str__(self) -> str:
        return f"{self.node}: {self.problem}"


def _constant_ints(model, name):
    """The int values of a Constant node's output or an initializer, or None if `name` is computed."""
    from onnx import numpy_helper

    for init in model.graph.initializer:
        if init.name == name:
            return numpy_helper.to_array(init).reshape(-1).tolist()
    for node in model.graph.node:
        if node.op_type == "Constant" and name in node.output:
            for attr in node.attribute:
                if attr.name == "value":
                    return numpy_helper.to_array(attr.t).reshape(-1).tolist()
                if attr.name == "value_ints":
                    return list(attr.ints)
                if attr.name == "value_int":
                    return [attr.i]
    return None


def check_tensorrt_profile(path_or_model) -> list[Violation]:
    """Every way the ONNX model leaves bamboo's TensorRT profile (empty list: it fits)."""
    onnx = require("onnx", "onnx", "the TensorRT profile checker")
    model = path_or_model if not isinstance(path_or_model, (str, Path)) else onnx.load(str(path_or_model),
                                                                                      load_external_data=False)
    violations = []
    for i, node in enumerate(model.graph.node):
        label = node.name or f"node {i} ({node.op_type})"
        if node.domain not in ("", "ai.onnx"):
            violations.append(Violation(label, f"custom-domain op {node.domain}::{node.op_type} (TensorRT needs a "
                                               "plugin for it)"))
        elif node.op_type in DATA_DEPENDENT_OPS:
            violations.append(Violation(label, f"{node.op_type} has a data-dependent output shape; the profile "
                                               "keeps shapes static (export with bamboo's TensorRT profile)"))
        elif node.op_type not in TENSORRT_ONNX_OPS:
            violations.append(Violation(label, f"op {node.op_type} is not supported by TensorRT's ONNX parser"))
        if node.op_type == "TopK":
            k = _constant_ints(model, node.input[1]) if len(node.input) > 1 else None
            if k is None:
                violations.append(Violation(label, "TopK's k is computed at run time; TensorRT needs a constant k"))
            elif k[0] > TENSORRT_MAX_TOPK:
                violations.append(Violation(label, f"TopK k={k[0]} exceeds TensorRT's limit of {TENSORRT_MAX_TOPK}"))
    profiles = json.loads(next((p.value for p in model.metadata_props if p.key == PROFILE_KEY), "{}"))
    for tensor in model.graph.input:
        dims = tensor.type.tensor_type.shape.dim
        if any(not d.HasField("dim_value") for d in dims) and tensor.name not in profiles:
            violations.append(Violation(f"input {tensor.name}", "has dynamic dimensions but no optimization profile "
                                                              f"(min/opt/max shapes in metadata {PROFILE_KEY!r})"))
    return violations


def default_profiles(example_inputs, names, max_batch: int = 16, max_seq: int = 2048) -> dict:
    """min 1 / opt the example / max (max_batch, max_seq) for the first two dims of each input."""
    profiles = {}
    for name, tensor in zip(names, example_inputs):
        if not isinstance(tensor, torch.Tensor):
            continue
        shape = list(tensor.shape)
        limits = [max_batch, max_seq]
        low = [1 if i < 2 else d for i, d in enumerate(shape)]
        high = [max(limits[i], d) if i < 2 else d for i, d in enumerate(shape)]
        profiles[name] = {"min": low, "opt": shape, "max": high}
    return profiles


def check_predictor_caps(predictors) -> None:
    """TensorRT's TopK takes a static k of at most 3840: refuse larger caps before exporting."""
    for p in (predictors or {}).values():
        if p.top_k > TENSORRT_MAX_TOPK:
            raise InputError(f"predictor cap k={p.top_k} for {p.module!r} exceeds TensorRT's TopK limit of "
                             f"{TENSORRT_MAX_TOPK}; lower the cap (or use 0: then every neuron is computed and "
                             "masked by the threshold)")


def finish_tensorrt_profile(path, example_inputs, profiles: dict | None = None, max_batch: int = 16,
                            max_seq: int = 2048) -> Path:
    """Store the optimization profiles in an exported ONNX file's metadata and check the file against the
    profile; raises CompileError listing violations if any remain."""
    onnx = require("onnx", "onnx", "the TensorRT ONNX export")
    proto = onnx.load(str(path), load_external_data=False)
    names = [i.name for i in proto.graph.input]
    examples = example_inputs if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    chosen = profiles or default_profiles(examples, names, max_batch, max_seq)
    entry = proto.metadata_props.add()
    entry.key, entry.value = PROFILE_KEY, json.dumps(chosen)
    onnx.save(proto, str(path))
    violations = check_tensorrt_profile(proto)
    if violations:
        raise CompileError("the export left TensorRT's profile:\n  " + "\n  ".join(map(str, violations)))
    return Path(path)


def _tensorrt():
    trt = require("tensorrt", "tensorrt", "building a TensorRT engine")
    if not torch.cuda.is_available():
        raise CompileError("building a TensorRT engine needs an NVIDIA GPU with CUDA; none is visible here")
    return trt


def build_tensorrt_engine(onnx_path, engine_path, fp16: bool = False, workspace_gb: float = 4.0) -> Path:
    """Parse the ONNX file with tensorrt.OnnxParser, apply its optimization profiles, build and save the engine."""
    trt = _tensorrt()
    onnx = require("onnx", "onnx", "building a TensorRT engine")
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    major = int(trt.__version__.split(".")[0])
    flags = 0 if major >= 10 else 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise CompileError(f"TensorRT's ONNX parser rejected {onnx_path}:\n  " + "\n  ".join(errors))
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * 2**30))
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    proto = onnx.load(str(onnx_path), load_external_data=False)
    profiles = json.loads(next((p.value for p in proto.metadata_props if p.key == PROFILE_KEY), "{}"))
    if profiles:
        profile = builder.create_optimization_profile()
        for name, shapes in profiles.items():
            profile.set_shape(name, shapes["min"], shapes["opt"], shapes["max"])
        config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise CompileError(f"TensorRT could not build an engine from {onnx_path} (see the TensorRT log above)")
    engine_path = Path(engine_path)
    engine_path.write_bytes(bytes(serialized))
    return engine_path
