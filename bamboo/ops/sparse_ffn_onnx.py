"""The ONNX lowering of bamboo::sparse_ffn, in standard ops (opset 18): MatMul, Relu, Mul, NonZero, Gather,
TopK, ReduceMax. One emitter serves two callers that share onnxscript's `op.X(...)` builder interface: the
torch.onnx translation of the op (bamboo.export_onnx) and the rewrite of foreign ONNX graphs
(bamboo.onnx.optimize). Predictor scores are computed in float32 (ONNX Runtime's CUDA EP has no bf16 TopK)."""
from __future__ import annotations

import math

FLOAT = 1  # onnx.TensorProto.FLOAT
TENSORRT_MAX_TOPK = 3840  # TensorRT's TopK takes a static k up to this


def _int64s(op, values):
    return op.Constant(value_ints=list(values))


def _activation(op, name: str, u):
    if name == "identity":
        return u
    if name == "relu":
        return op.Relu(u)
    if name == "silu":
        return op.Mul(u, op.Sigmoid(u))
    if name == "sigmoid":
        return op.Sigmoid(u)
    if name == "tanh":
        return op.Tanh(u)
    if name == "gelu":
        half, root2 = op.CastLike(op.Constant(value_float=0.5), u), op.CastLike(op.Constant(value_float=math.sqrt(2)), u)
        one = op.CastLike(op.Constant(value_float=1.0), u)
        return op.Mul(op.Mul(half, u), op.Add(one, op.Erf(op.Div(u, root2))))
    if name == "gelu_tanh":
        c = op.CastLike(op.Constant(value_float=math.sqrt(2 / math.pi)), u)
        a = op.CastLike(op.Constant(value_float=0.044715), u)
        half, one = op.CastLike(op.Constant(value_float=0.5), u), op.CastLike(op.Constant(value_float=1.0), u)
        inner = op.Mul(c, op.Add(u, op.Mul(a, op.Mul(u, op.Mul(u, u)))))
        return op.Mul(op.Mul(half, u), op.Add(one, op.Tanh(inner)))
    raise ValueError(f"no ONNX lowering for activation {name!r}")


class Weight:
    """A linear map's weight as the graph holds it: `out_in` ([out, in], rows are neurons) or `in_out`."""

    def __init__(self, value, layout: str, bias=None):
        self.value, self.layout, self.bias = value, layout, bias

    def apply(self, op, x2, ids=None):
        """x2 @ W^T (+ b), for all neurons or only those in `ids`."""
        w, b = self.value, self.bias
        if ids is not None:
            w = op.Gather(w, ids, axis=0 if self.layout == "out_in" else 1)
            b = op.Gather(b, ids, axis=0) if b is not None else None
        y = op.MatMul(x2, op.Transpose(w, perm=[1, 0]) if self.layout == "out_in" else w)
        return op.Add(y, b) if b is not None else y


def emit_sparse_ffn(op, x, gate: Weight, up: Weight | None, down_rows, down_bias, kind: str, mode: str,
                    up_act: str, predictor=None, threshold: float = 0.0, top_k: int = 0, max_rows: int = 16,
                    static_shapes: bool = False):
    """Emit the FFN; `down_rows` is the down projection as [intermediate, out] (neuron-major), `predictor` is
    (p_in, p_out, p_bias or None). Returns the output value, shaped like x with the last dim `out`.

    static_shapes=True is the TensorRT profile: no data-dependent shapes (no NonZero). Exact mode is lowered
    densely (lossless); predictor mode takes a static TopK of `top_k` neurons (k <= 3840) and zeroes those
    under the threshold; without a cap it computes every neuron and masks by the threshold.
    """
    x2 = op.Reshape(x, op.Concat(_int64s(op, [-1]), op.Shape(x, start=-1), axis=0))
    act = "identity" if kind == "relu_mlp" else up_act

    def product(ids):
        g = op.Relu(gate.apply(op, x2, ids))
        return g if up is None else op.Mul(g, _activation(op, act, up.apply(op, x2, ids)))

    if static_shapes and mode == "exact":
        mode = "dense"
    if static_shapes and mode == "predictor":
        y = _static_predictor(op, x2, product, down_rows, predictor, threshold, top_k, max_rows)
    elif mode == "dense":
        y = op.MatMul(product(None), down_rows)
    elif mode == "exact":
        pre = gate.apply(op, x2)
        g = op.Relu(pre)
        # skipped only where -inf < gate <= 0 in every row: NaN and -inf stay (bamboo/ops/sparse_ffn.py)
        zero = op.CastLike(op.Constant(value_float=0.0), pre)
        skip = op.And(op.LessOrEqual(pre, zero), op.Not(op.IsInf(pre, detect_positive=0, detect_negative=1)))
        active = op.ReduceMax(op.Cast(op.Not(skip), to=FLOAT), _int64s(op, [0]), keepdims=0)
        ids = op.Reshape(op.NonZero(active), _int64s(op, [-1]))
        h = op.Gather(g, ids, axis=1)
        if up is not None:
            h = op.Mul(h, _activation(op, act, up.apply(op, x2, ids)))
        y = op.MatMul(h, op.Gather(down_rows, ids, axis=0))
    elif mode == "predictor":
        best = _best_scores(op, x2, predictor)
        # Calls with more than max_rows rows (prefill) compute every neuron, as the op does.
        rows = op.Shape(x2, start=0, end=1)
        prefill = op.Greater(rows, _int64s(op, [max_rows]))
        thr = op.Where(prefill, op.Constant(value_floats=[-math.inf]), op.Constant(value_floats=[float(threshold)]))
        neurons = op.Shape(best)
        if top_k and top_k > 0:
            k = op.Where(prefill, neurons, op.Min(_int64s(op, [int(top_k)]), neurons))
            _, order = op.TopK(best, k, axis=0, largest=1, sorted=1)
            keep = op.Reshape(op.NonZero(op.Greater(op.Gather(best, order, axis=0), thr)), _int64s(op, [-1]))
            ids = op.Gather(order, keep, axis=0)
        else:
            ids = op.Reshape(op.NonZero(op.Greater(best, thr)), _int64s(op, [-1]))
        y = op.MatMul(product(ids), op.Gather(down_rows, ids, axis=0))
    else:
        raise ValueError(f"no ONNX lowering for mode {mode!r}")
    if down_bias is not None:
        y = op.Add(y, down_bias)
    out_shape = op.Concat(op.Shape(x, end=-1), op.Shape(down_rows, start=1), axis=0)
    return op.Reshape(y, out_shape)


def _best_scores(op, x2, predictor):
    """Each neuron's largest predictor score over the rows, relu(x P_in^T) P_out^T + b, in float32."""
    p_in, p_out, p_bias = predictor
    xf = op.Cast(x2, to=FLOAT)
    scores = op.MatMul(op.Relu(op.MatMul(xf, op.Transpose(op.Cast(p_in, to=FLOAT), perm=[1, 0]))),
                       op.Transpose(op.Cast(p_out, to=FLOAT), perm=[1, 0]))
    if p_bias is not None:
        scores = op.Add(scores, op.Cast(p_bias, to=FLOAT))
    # a NaN score counts as +inf (selected), as in the op; done before ReduceMax, whose NaN handling varies
    scores = op.Where(op.IsNaN(scores), op.Constant(value_float=math.inf), scores)
    return op.ReduceMax(scores, _int64s(op, [0]), keepdims=0)


def _static_predictor(op, x2, product, down_rows, predictor, threshold, top_k, max_rows):
    best = _best_scores(op, x2, predictor)
    thr = op.Constant(value_floats=[float(threshold) if math.isfinite(threshold) else -3.0e38])
    dense = op.MatMul(product(None), down_rows)
    if not top_k or top_k <= 0 or top_k > TENSORRT_MAX_TOPK:
        keep = op.CastLike(op.Cast(op.Greater(best, thr), to=FLOAT), down_rows)
        sparse = op.MatMul(op.Mul(product(None), keep), down_rows)
    else:
        values, order = op.TopK(best, _int64s(op, [int(top_k)]), axis=0, largest=1, sorted=1)
        keep = op.CastLike(op.Cast(op.Greater(values, thr), to=FLOAT), down_rows)
        sparse = op.MatMul(op.Mul(product(order), keep), op.Gather(down_rows, order, axis=0))
    # prefill-sized calls compute every neuron, as the op does (both branches run: shapes stay static)
    prefill = op.Greater(op.Shape(x2, start=0, end=1), _int64s(op, [max_rows]))
    return op.Where(prefill, dense, sparse)


def sparse_ffn_translation_static(x, gate_weight, gate_bias, up_weight, up_bias, down_weight, down_weight_nm,
                                  down_bias, predictor_in, predictor_out, predictor_bias, kind, mode, up_act,
                                  threshold, top_k, predictor_table=0):
    """The TensorRT-profile translation: static shapes only (see emit_sparse_ffn)."""
    return sparse_ffn_translation(x, gate_weight, gate_bias, up_weight, up_bias, down_weight, down_weight_nm,
                                  down_bias, predictor_in, predictor_out, predictor_bias, kind, mode, up_act,
                                  threshold, top_k, static_shapes=True)


def sparse_ffn_translation(x, gate_weight, gate_bias, up_weight, up_bias, down_weight, down_weight_nm, down_bias,
                           predictor_in, predictor_out, predictor_bias, kind, mode, up_act, threshold, top_k,
                           predictor_table=0, static_shapes: bool = False):
    """torch.onnx custom_translation_table entry for bamboo::sparse_ffn (traced with onnxscript's opset18)."""
    from onnxscript import opset18 as op

    if predictor_table:
        raise ValueError("a sparse_ffn bound to a predictor table (a bamboo.compile graph) cannot be exported: "
                         "export with bamboo.export_onnx, which stores each layer's predictor")

    down_rows = down_weight_nm if down_weight_nm is not None else op.Transpose(down_weight, perm=[1, 0])
    predictor = (predictor_in, predictor_out, predictor_bias) if mode == "predictor" else None
    up = Weight(up_weight, "out_in", up_bias) if up_weight is not None else None
    return emit_sparse_ffn(op, x, Weight(gate_weight, "out_in", gate_bias), up, down_rows, down_bias, kind, mode,
                           up_act, predictor, threshold, top_k, static_shapes=static_shapes)
