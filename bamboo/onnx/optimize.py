"""Rewrite the ReLU-sparse FFNs of an ONNX model that bamboo did not write (for example a plain
torch.onnx.export) into the sparse form, with onnxscript's rewriter: one rule per FFN spelling, each a
pattern, a check that says why it refused, and a rewrite that emits the same subgraph as bamboo's own export.

Patterns (weights are initializers stored [in, out], as exporters write MatMul weights):
    drelu  MatMul(Mul(Relu(MatMul(x, Wg)), Relu(MatMul(x, Wu))), Wd)
    reglu  MatMul(Mul(Relu(MatMul(x, Wg)), MatMul(x, Wu)), Wd)
The Mul is matched in either operand order. A SwiGLU (Sigmoid/Mul instead of Relu) does not match.
"""
from __future__ import annotations

from pathlib import Path

from bamboo.errors import require
from bamboo.ops.sparse_ffn_onnx import Weight, emit_sparse_ffn


def _is_constant(value) -> bool:
    return value is not None and (value.const_value is not None or value.is_initializer())


def _rules(mode: str):
    rewriter = require("onnxscript.rewriter", "onnx", "bamboo.onnx.optimize")
    from onnxscript.rewriter import pattern as orp

    def check(context, x, wg, wu, wd, **_):
        result = orp.MatchResult()
        for name, w in (("gate", wg), ("up", wu), ("down", wd)):
            if not _is_constant(w):
                return result.fail(f"the {name} weight is not an initializer: its rows cannot be gathered")
            if w.shape is None or len(w.shape) != 2:
                return result.fail(f"the {name} weight is not 2-D")
        if wg.shape != wu.shape or wg.shape[1] != wd.shape[0]:
            return result.fail("gate, up and down weight shapes do not form one FFN")
        return result

    def drelu_pattern(op, x, wg, wu, wd):
        return op.MatMul(op.Mul(op.Relu(op.MatMul(x, wg)), op.Relu(op.MatMul(x, wu))), wd)

    def reglu_pattern(op, x, wg, wu, wd):
        return op.MatMul(op.Mul(op.Relu(op.MatMul(x, wg)), op.MatMul(x, wu)), wd)

    def rewrite(kind, up_act):
        def build(op, x, wg, wu, wd, **_):
            return emit_sparse_ffn(op, x, Weight(wg, "in_out"), Weight(wu, "in_out"), wd, None, kind, mode, up_act)
        return build

    rules = [
        orp.RewriteRule(drelu_pattern, rewrite("drelu", "relu"), check, name="SparseDReluFFN"),
        orp.RewriteRule(reglu_pattern, rewrite("reglu", "identity"), check, name="SparseReGLUFFN"),
    ]
    return rewriter, [r for rule in rules for r in rule.commute()]


def optimize(in_path, out_path, mode: str = "exact") -> dict:
    """Rewrite `in_path` into `out_path`; returns {"rewritten": n, "rules": {rule name: count}}."""
    if mode not in ("exact", "dense"):
        raise ValueError("foreign graphs have no predictors: mode must be 'exact' or 'dense'")
    require("onnx", "onnx", "bamboo.onnx.optimize")
    import onnx
    import onnx_ir as ir
    from onnxscript.rewriter import pattern as orp

    _, rules = _rules(mode)
    model = ir.load(str(in_path))
    counts: dict[str, int] = {}
    for rule in rules:
        applied = orp.RewriteRuleSet([rule]).apply_to_model(model)
        if applied:
            counts[rule.name] = counts.get(rule.name, 0) + applied
    out_path = Path(out_path)
    ir.save(model, str(out_path))
    onnx.checker.check_model(str(out_path), full_check=True)
    return {"rewritten": sum(counts.values()), "rules": counts}
