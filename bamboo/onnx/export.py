"""bamboo.export_onnx: the model with its FFNs rewritten, through the torch.onnx dynamo exporter, with
bamboo::sparse_ffn lowered to standard ONNX ops; checked with onnx.checker."""
from __future__ import annotations

import warnings
from pathlib import Path

import torch

from bamboo.errors import CompileError, require

OPSET = 18
TWO_GB = 2 * 1024**3


def export_onnx(model: torch.nn.Module, example_inputs, path, *, example_kwargs: dict | None = None,
                sparsity: str = "exact", predictors=None, dynamic: bool = True, opset: int = OPSET,
                external_data: bool | None = None, static_shapes: bool = False) -> Path:
    """Write `model` as ONNX to `path` and return the path.

    sparsity: "exact" | "predictor" (with predictors=) | "dense". With dynamic=True, batch and sequence dims
    stay dynamic (use examples with both >= 2). Weights go to an external data file beside `path` when the
    model is over 2 GB (or when external_data=True). `example_kwargs` go to forward by name (a T5's
    decoder_input_ids); the ONNX inputs are the tensors of args and kwargs, named as forward's parameters.
    static_shapes=True lowers the FFN without data-dependent shapes (the TensorRT profile; see
    bamboo.onnx.tensorrt_profile). A program the ONNX exporter cannot decompose is exported again under the
    library adapters' ONNX fallback (transformers: eager attention), then with static shapes, with a warning.
    """
    require("onnx", "onnx", "bamboo.export_onnx")
    require("onnxscript", "onnx", "bamboo.export_onnx")
    import onnx

    from bamboo.api import export
    from bamboo.graph.capture import adapted, normalize_example_inputs
    from bamboo.ops.sparse_ffn_onnx import sparse_ffn_translation, sparse_ffn_translation_static

    if opset < OPSET:
        raise CompileError(f"bamboo.export_onnx needs opset >= {OPSET}, got {opset}")
    args = normalize_example_inputs(example_inputs)
    translation = sparse_ffn_translation_static if static_shapes else sparse_ffn_translation
    # Some programs fail the ONNX exporter's decomposition (T5: SDPA's strides then a reshape it cannot view):
    # retry under the library adapters' "onnx-retry" (transformers: eager attention), then with static shapes.
    attempts = [("export", dynamic), ("onnx-retry", dynamic)] + ([("onnx-retry", False)] if dynamic else [])
    first_error = None
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", module="torch.*")
        for purpose, dynamic_dims in attempts:
            with adapted(model, example_kwargs, purpose) as kwargs:
                program = export(model, args, kwargs, sparsity=sparsity, predictors=predictors, dynamic=dynamic_dims)
                try:
                    onnx_program = _to_onnx(program, args, kwargs, opset, translation)
                except Exception as exc:
                    first_error = first_error or exc
                    continue
            if first_error is not None:
                warnings.warn(f"bamboo.export_onnx: the ONNX exporter failed on {type(model).__name__} "
                              f"({_first_line(first_error)}); exported again with library adapters for ONNX"
                              + ("" if dynamic_dims == dynamic else " and static shapes (the example's)"),
                              stacklevel=2)
            break
        else:
            raise _onnx_error(model, first_error) from first_error
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    size = sum(p.numel() * p.element_size() for p in program.state_dict.values())
    size += sum(t.numel() * t.element_size() for t in program.constants.values() if isinstance(t, torch.Tensor))
    use_external = external_data if external_data is not None else size > TWO_GB
    onnx_program.save(str(path), external_data=use_external)
    onnx.checker.check_model(str(path), full_check=True)
    return path


def _to_onnx(program, args, kwargs, opset, translation):
    return torch.onnx.export(program, args, kwargs=kwargs, dynamo=True, opset_version=opset, verbose=False,
                             custom_translation_table={torch.ops.bamboo.sparse_ffn.default: translation})


def _first_line(exc: Exception) -> str:
    lines = [line for line in str(exc).splitlines() if "Exception summary" not in line and line.strip()]
    detail = next((line for line in lines if "Error" in line and ":" in line), lines[0] if lines else "")
    return detail.strip()[:200]


def _onnx_error(model, exc: Exception) -> CompileError:
    summary = "\n".join(str(exc).strip().splitlines()[:6])
    return CompileError(f"ONNX export of {type(model).__name__} failed:\n{summary}")
