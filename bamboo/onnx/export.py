"""bamboo.export_onnx: the model with its FFNs rewritten, through the torch.onnx dynamo exporter, with
bamboo::sparse_ffn lowered to standard ONNX ops; checked with onnx.checker."""
from __future__ import annotations

import warnings
from pathlib import Path

import torch

from bamboo.errors import CompileError, require

OPSET = 18
TWO_GB = 2 * 1024**3


def export_onnx(model: torch.nn.Module, example_inputs, path, *, sparsity: str = "exact", predictors=None,
                dynamic: bool = True, opset: int = OPSET, external_data: bool | None = None,
                static_shapes: bool = False) -> Path:
    """Write `model` as ONNX to `path` and return the path.

    sparsity: "exact" | "predictor" (with predictors=) | "dense". With dynamic=True, batch and sequence dims
    stay dynamic (use examples with both >= 2). Weights go to an external data file beside `path` when the
    model is over 2 GB (or when external_data=True). static_shapes=True lowers the FFN without data-dependent
    shapes (the TensorRT profile; see bamboo.onnx.tensorrt_profile).
    """
    require("onnx", "onnx", "bamboo.export_onnx")
    require("onnxscript", "onnx", "bamboo.export_onnx")
    import onnx

    from bamboo.api import export
    from bamboo.graph.capture import normalize_example_inputs
    from bamboo.ops.sparse_ffn_onnx import sparse_ffn_translation, sparse_ffn_translation_static

    if opset < OPSET:
        raise CompileError(f"bamboo.export_onnx needs opset >= {OPSET}, got {opset}")
    args = normalize_example_inputs(example_inputs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = export(model, args, sparsity=sparsity, predictors=predictors, dynamic=dynamic)
        try:
            onnx_program = torch.onnx.export(
                program, args, dynamo=True, opset_version=opset, verbose=False,
                custom_translation_table={torch.ops.bamboo.sparse_ffn.default:
                                          sparse_ffn_translation_static if static_shapes else sparse_ffn_translation})
        except Exception as exc:
            summary = "\n".join(str(exc).strip().splitlines()[:6])
            raise CompileError(f"ONNX export of {type(model).__name__} failed:\n{summary}") from exc
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    size = sum(p.numel() * p.element_size() for p in program.state_dict.values())
    size += sum(t.numel() * t.element_size() for t in program.constants.values() if isinstance(t, torch.Tensor))
    use_external = external_data if external_data is not None else size > TWO_GB
    onnx_program.save(str(path), external_data=use_external)
    onnx.checker.check_model(str(path), full_check=True)
    return path
