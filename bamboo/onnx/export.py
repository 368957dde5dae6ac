"""ONNX from an ExportedProgram with its FFNs rewritten (bamboo.export_onnx exports the model, then calls
lower_to_onnx and save_onnx): the torch.onnx dynamo exporter with bamboo::sparse_ffn lowered to standard ONNX
ops, checked with onnx.checker."""
from __future__ import annotations

import contextlib
import logging
import warnings
from pathlib import Path

import torch

from bamboo.errors import CompileError, require

OPSET = 18
TWO_GB = 2 * 1024**3


def lower_to_onnx(program: torch.export.ExportedProgram, args: tuple, kwargs: dict | None = None, *,
                  opset: int = OPSET, static_shapes: bool = False):
    """The torch.onnx (dynamo) export of a program, with bamboo::sparse_ffn lowered to standard ops;
    static_shapes=True lowers it without data-dependent shapes (the TensorRT profile). Raises what the exporter
    raises: the caller may retry under other adapters (api.export_onnx)."""
    require("onnxscript", "onnx", "ONNX export")
    from bamboo.ops.sparse_ffn_onnx import sparse_ffn_translation, sparse_ffn_translation_static

    check_opset(opset)
    translation = sparse_ffn_translation_static if static_shapes else sparse_ffn_translation
    with warnings.catch_warnings(), without_torchvision_notice():
        warnings.simplefilter("ignore")
        return torch.onnx.export(program, args, kwargs=kwargs or None, dynamo=True, opset_version=opset,
                                 verbose=False, custom_translation_table={torch.ops.bamboo.sparse_ffn.default:
                                                                          translation})


def save_onnx(onnx_program, program: torch.export.ExportedProgram, path: Path, *, external_data: bool | None = None,
              dynamic: bool = True) -> Path:
    """Save a lowered program at `path` (already checked writable) and check the file with onnx.checker. Weights
    go to an external data file beside `path` when the program is over 2 GB (or when external_data=True)."""
    onnx = require("onnx", "onnx", "ONNX export")
    fixed = _inputs_with_fixed_unit_dims(onnx_program.model_proto) if dynamic else []
    if fixed:
        warnings.warn(f"bamboo.export_onnx: in {path.name}, input(s) {'; '.join(fixed)} have batch or sequence fixed to 1: "
                      "torch.export specializes dims whose example size is 1, so the file only runs on that size; "
                      "export from examples with batch and sequence >= 2 (e.g. torch.zeros(2, 8, dtype=torch.long)) "
                      "to keep them dynamic", stacklevel=3)
    size = sum(p.numel() * p.element_size() for p in program.state_dict.values())
    size += sum(t.numel() * t.element_size() for t in program.constants.values() if isinstance(t, torch.Tensor))
    use_external = external_data if external_data is not None else size > TWO_GB
    onnx_program.save(str(path), external_data=use_external)
    onnx.checker.check_model(str(path), full_check=True)
    return path


def first_line(exc: Exception) -> str:
    """The line of an exporter error that says what failed (its messages open with a long summary)."""
    lines = [line for line in str(exc).splitlines() if "Exception summary" not in line and line.strip()]
    detail = next((line for line in lines if "Error" in line and ":" in line), lines[0] if lines else "")
    return detail.strip()[:200]


def onnx_error(model, exc: Exception) -> CompileError:
    summary = "\n".join(str(exc).strip().splitlines()[:6])
    return CompileError(f"ONNX export of {type(model).__name__} failed:\n{summary}")


def check_opset(opset: int) -> None:
    if opset < OPSET:
        raise CompileError(f"bamboo.export_onnx needs opset >= {OPSET}, got {opset}")


def warn_if_bfloat16(model, args) -> None:
    tensors = list(model.parameters()) if isinstance(model, torch.nn.Module) else []
    tensors += [a for a in args if isinstance(a, torch.Tensor)]
    if any(t.dtype == torch.bfloat16 for t in tensors):
        warnings.warn("bamboo.export_onnx: the model is bfloat16; ONNX Runtime's CPU execution provider has no "
                      "bfloat16 kernels (Mul, MatMul, ...), so it cannot run this file: export model.float() for "
                      "the CPU, or model.half() for the CUDA execution provider", stacklevel=3)


def _inputs_with_fixed_unit_dims(proto) -> list[str]:
    """Inputs whose batch or sequence dim (the first two) the export fixed to 1, as 'name (shape)'."""
    fixed = []
    for tensor in proto.graph.input:
        dims = [d.dim_param or d.dim_value for d in tensor.type.tensor_type.shape.dim]
        if any(d == 1 for d in dims[:2]):
            fixed.append(f"{tensor.name} ({', '.join(map(str, dims))})")
    return fixed


class _DropTorchvisionNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("torchvision is not installed")


@contextlib.contextmanager
def without_torchvision_notice():
    """The ONNX exporter logs "torchvision is not installed. Skipping torchvision::nms" (and three more) on every
    export; bamboo never exports torchvision ops, so those lines are dropped while bamboo exports (only there)."""
    logger = logging.getLogger("torch.onnx._internal.exporter._registration")
    notice = _DropTorchvisionNotice()
    logger.addFilter(notice)
    try:
        yield
    finally:
        logger.removeFilter(notice)
