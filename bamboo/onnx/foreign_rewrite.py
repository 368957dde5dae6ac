"""Rewrite the ReLU-sparse FFNs of an ONNX model that bamboo did not write (for example a plain
torch.onnx.export) into the sparse form, with onnxscript's rewriter: one rule per FFN spelling, each a
pattern, a check that says why it refused, and a rewrite that emits the same subgraph as bamboo's own export.

Patterns (weights are initializers; exporters write MatMul with [in, out] weights for 3-D inputs and
Gemm(transB=1) with [out, in] weights for 2-D inputs):
    drelu  MatMul(Mul(Relu(MatMul(x, Wg)), Relu(MatMul(x, Wu))), Wd)       and the Gemm spelling
    reglu  MatMul(Mul(Relu(MatMul(x, Wg)), MatMul(x, Wu)), Wd)             and the Gemm spelling
The Mul is matched in either operand order. A SwiGLU (Sigmoid/Mul instead of Relu) does not match.
"""
from __future__ import annotations

from pathlib import Path

from bamboo.errors import InputError, require
from bamboo.ops.sparse_ffn_onnx import Weight, emit_sparse_ffn
from bamboo.outputs import prepare_output


def _is_constant(value) -> bool:
    return value is not None and (value.const_value is not None or value.is_initializer())


def _rules(mode: str):
    rewriter = require("onnxscript.rewriter", "onnx", "bamboo.onnx.optimize")
    from onnxscript.rewriter import pattern as orp

    def checker(layout):
        def check(context, x, wg, wu, wd, **_):
            result = orp.MatchResult()
            for name, w in (("gate", wg), ("up", wu), ("down", wd)):
                if not _is_constant(w):
                    return result.fail(f"the {name} weight is not an initializer: its rows cannot be gathered")
                if w.shape is None or len(w.shape) != 2:
                    return result.fail(f"the {name} weight is not 2-D")
            neurons = wg.shape[1] if layout == "in_out" else wg.shape[0]
            down_in = wd.shape[0] if layout == "in_out" else wd.shape[1]
            if wg.shape != wu.shape or neurons != down_in:
                return result.fail("gate, up and down weight shapes do not form one FFN")
            return result
        return check

    def linear(op, x, w, layout):
        return op.MatMul(x, w) if layout == "in_out" else op.Gemm(x, w, transB=1)

    def drelu_pattern(layout):
        def pattern(op, x, wg, wu, wd):
            return linear(op, op.Mul(op.Relu(linear(op, x, wg, layout)), op.Relu(linear(op, x, wu, layout))), wd, layout)
        return pattern

    def reglu_pattern(layout):
        def pattern(op, x, wg, wu, wd):
            return linear(op, op.Mul(op.Relu(linear(op, x, wg, layout)), linear(op, x, wu, layout)), wd, layout)
        return pattern

    def rewrite(kind, up_act, layout):
        def build(op, x, wg, wu, wd, **_):
            down_rows = wd if layout == "in_out" else op.Transpose(wd, perm=[1, 0])
            return emit_sparse_ffn(op, x, Weight(wg, layout), Weight(wu, layout), down_rows, None, kind, mode, up_act)
        return build

    rules = []
    for layout in ("in_out", "out_in"):
        rules += [
            orp.RewriteRule(drelu_pattern(layout), rewrite("drelu", "relu", layout), checker(layout),
                            name="SparseDReluFFN"),
            orp.RewriteRule(reglu_pattern(layout), rewrite("reglu", "identity", layout), checker(layout),
                            name="SparseReGLUFFN"),
        ]
    return rewriter, [r for rule in rules for r in rule.commute()]


def optimize(in_path, out_path, mode: str = "exact") -> dict:
    """Rewrite `in_path` into `out_path`; returns {"rewritten": n, "rules": {rule name: count}}."""
    if mode not in ("exact", "dense"):
        raise InputError(f"mode={mode!r}: foreign graphs have no predictors, so mode must be 'exact' or 'dense'")
    require("onnx", "onnx", "bamboo.onnx.optimize")
    import onnx
    import onnx_ir as ir
    from onnxscript.rewriter import pattern as orp

    in_path = Path(in_path)
    if not in_path.is_file():
        raise InputError(f"{in_path} does not exist or is not a file; pass the path of an .onnx model")
    out_path = prepare_output(out_path, "optimized ONNX file")
    _, rules = _rules(mode)
    try:
        model = ir.load(str(in_path))
    except Exception as exc:  # protobuf's DecodeError and the like: the bytes are not an ONNX model
        raise InputError(f"{in_path} is not an ONNX model ({type(exc).__name__}: {exc}); pass a file written by an "
                         "ONNX exporter (torch.onnx.export, bamboo export-onnx)") from None
    counts: dict[str, int] = {}
    for rule in rules:
        applied = orp.RewriteRuleSet([rule]).apply_to_model(model)
        if applied:
            counts[rule.name] = counts.get(rule.name, 0) + applied
    ir.save(model, str(out_path))
    onnx.checker.check_model(str(out_path), full_check=True)
    return {"rewritten": sum(counts.values()), "rules": counts}
