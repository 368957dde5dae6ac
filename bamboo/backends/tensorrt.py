"""The TensorRT backend through torch-tensorrt's dynamo path, with a converter that builds bamboo::sparse_ffn
from TensorRT layers (MatrixMultiply, Activation, ElementWise, Reduce, TopK, Gather, Select).

What the converter builds: exact mode and uncapped predictor mode are lowered densely (TensorRT has no cheap
data-dependent compaction; exact stays lossless, predictor masks by its threshold); predictor mode with a cap
k <= 3840 takes a static TopK of the predictor scores and gathers only those neurons' gate, up and down rows,
zeroing the ones under the threshold; calls of more than 16 rows (prefill) compute every neuron, as the op
does. NOT RUN ON HARDWARE: TensorRT cannot be installed on this project's machines (its library wheels are not
on PyPI), so this module is written against the documented APIs and its tests skip where tensorrt is missing.
"""
from __future__ import annotations

import functools
from pathlib import Path

import torch

from bamboo.errors import CompileError, MissingDependencyError
from bamboo.ops.sparse_ffn_onnx import TENSORRT_MAX_TOPK

ROWS_FOR_PREFILL = 16


def require_torch_tensorrt():
    """torch_tensorrt, after checking it can work here (installed, same torch minor version, a CUDA device)."""
    try:
        import torch_tensorrt
    except ImportError as exc:
        raise MissingDependencyError(
            f"the tensorrt backend needs torch-tensorrt and TensorRT ({exc}); pip install 'bamboo-compiler[tensorrt]' "
            "on a machine where NVIDIA's TensorRT wheels can be installed") from None
    torch_minor = ".".join(torch.__version__.split("+")[0].split(".")[:2])
    trt_minor = ".".join(torch_tensorrt.__version__.split("+")[0].split(".")[:2])
    if torch_minor != trt_minor:
        raise CompileError(f"torch-tensorrt {torch_tensorrt.__version__} is built for torch {trt_minor}, but torch "
                           f"{torch.__version__} is installed; install the torch-tensorrt release that matches torch")
    if not torch.cuda.is_available():
        raise CompileError("the tensorrt backend needs an NVIDIA GPU with CUDA; none is visible here")
    register_sparse_ffn_converter()
    return torch_tensorrt


@functools.lru_cache(maxsize=None)
def register_sparse_ffn_converter() -> None:
    import tensorrt as trt
    from torch_tensorrt.dynamo.conversion import dynamo_tensorrt_converter
    from torch_tensorrt.dynamo.conversion.converter_utils import get_trt_tensor

    names = ("x", "gate_weight", "gate_bias", "up_weight", "up_bias", "down_weight", "down_weight_nm", "down_bias",
             "predictor_in", "predictor_out", "predictor_bias", "kind", "mode", "up_act", "threshold", "top_k",
             "predictor_table")

    @dynamo_tensorrt_converter(torch.ops.bamboo.sparse_ffn.default, supports_dynamic_shapes=True)
    def convert_sparse_ffn(ctx, target, args, kwargs, name):
        a = dict(zip(names, args))
        a.update(kwargs)
        net = ctx.net
        counter = iter(range(1_000_000))

        def tensor(value):
            return None if value is None else get_trt_tensor(ctx, value, f"{name}_c{next(counter)}")

        def out(layer):
            layer.name = f"{name}_l{next(counter)}"
            return layer.get_output(0)

        def matmul(left, right, transpose_right):
            op = trt.MatrixOperation.TRANSPOSE if transpose_right else trt.MatrixOperation.NONE
            return out(net.add_matrix_multiply(left, trt.MatrixOperation.NONE, right, op))

        def binary(left, right, operation):
            return out(net.add_elementwise(left, right, operation))

        def activation(value, kind):
            if kind == "identity":
                return value
            if kind == "silu":
                return binary(value, out(net.add_activation(value, trt.ActivationType.SIGMOID)),
                              trt.ElementWiseOperation.PROD)
            types = {"relu": trt.ActivationType.RELU, "sigmoid": trt.ActivationType.SIGMOID,
                     "tanh": trt.ActivationType.TANH, "gelu": trt.ActivationType.GELU_ERF,
                     "gelu_tanh": trt.ActivationType.GELU_TANH}
            return out(net.add_activation(value, types[kind]))

        def row_vector(value):  # [n] -> [1, n] for broadcasting over rows
            layer = net.add_shuffle(value)
            layer.reshape_dims = (1, -1)
            return out(layer)

        x = tensor(a["x"]) if isinstance(a["x"], torch.Tensor) else a["x"]
        gate_w = tensor(a["gate_weight"])
        hidden = a["gate_weight"].shape[1] if isinstance(a["gate_weight"], torch.Tensor) else gate_w.shape[1]
        flat = net.add_shuffle(x)
        flat.reshape_dims = (-1, hidden)
        x2 = out(flat)
        up_w, up_b, gate_b = tensor(a["up_weight"]), tensor(a["up_bias"]), tensor(a["gate_bias"])
        if a["down_weight_nm"] is not None:
            down_rows, down_transposed = tensor(a["down_weight_nm"]), False
        else:
            down_rows, down_transposed = tensor(a["down_weight"]), True  # [out, I]: multiply by its transpose
        act = "identity" if a["kind"] == "relu_mlp" else a["up_act"]

        def linear(weight, bias, ids=None):
            if ids is not None:
                weight = out(net.add_gather(weight, ids, 0))
                bias = out(net.add_gather(bias, ids, 0)) if bias is not None else None
            y = matmul(x2, weight, True)
            return binary(y, row_vector(bias), trt.ElementWiseOperation.SUM) if bias is not None else y

        def product(ids=None):
            g = activation(linear(gate_w, gate_b, ids), "relu")
            return g if up_w is None else binary(g, activation(linear(up_w, up_b, ids), act),
                                                  trt.ElementWiseOperation.PROD)

        def down(h, ids=None):
            if ids is None:
                return matmul(h, down_rows, down_transposed)
            rows = out(net.add_gather(down_rows, ids, 1 if down_transposed else 0))
            return matmul(h, rows, down_transposed)

        dense = down(product())
        y = dense
        if a["mode"] == "predictor":
            xf = out(net.add_cast(x2, trt.float32))
            p_in = tensor(a["predictor_in"].float())
            p_out = tensor(a["predictor_out"].float())
            scores = matmul(activation(matmul(xf, p_in, True), "relu"), p_out, True)
            if a["predictor_bias"] is not None:
                scores = binary(scores, row_vector(tensor(a["predictor_bias"].float())), trt.ElementWiseOperation.SUM)
            best = out(net.add_reduce(scores, trt.ReduceOperation.MAX, 1 << 0, False))
            threshold = tensor(torch.tensor([max(float(a["threshold"]), -3.0e38)], dtype=torch.float32))
            k = int(a["top_k"] or 0)
            if 0 < k <= TENSORRT_MAX_TOPK:
                topk = net.add_topk(best, trt.TopKOperation.MAX, k, 1 << 0)
                topk.name = f"{name}_topk"
                values, ids = topk.get_output(0), topk.get_output(1)
                keep = out(net.add_cast(binary(values, threshold, trt.ElementWiseOperation.GREATER), trt.float32))
                h = product(ids)
                keep = out(net.add_cast(row_vector(keep), h.dtype))
                sparse = down(binary(h, keep, trt.ElementWiseOperation.PROD), ids)
            else:
                keep = out(net.add_cast(binary(best, threshold, trt.ElementWiseOperation.GREATER), trt.float32))
                h = product()
                keep = out(net.add_cast(row_vector(keep), h.dtype))
                sparse = down(binary(h, keep, trt.ElementWiseOperation.PROD))
            rows = out(net.add_slice(out(net.add_shape(x2)), (0,), (1,), (1,)))
            limit = tensor(torch.tensor([ROWS_FOR_PREFILL], dtype=torch.int64 if rows.dtype == trt.int64 else torch.int32))
            prefill = binary(rows, limit, trt.ElementWiseOperation.GREATER)
            prefill_2d = net.add_shuffle(prefill)
            prefill_2d.reshape_dims = (1, 1)
            y = out(net.add_select(out(prefill_2d), dense, sparse))
        if a["down_bias"] is not None:
            y = binary(y, row_vector(tensor(a["down_bias"])), trt.ElementWiseOperation.SUM)
        # back to x's leading dims with the output width
        out_features = (a["down_weight_nm"].shape[1] if a["down_weight_nm"] is not None
                        else a["down_weight"].shape[0])
        lead = out(net.add_slice(out(net.add_shape(x)), (0,), (len(x.shape) - 1,), (1,)))
        width = tensor(torch.tensor([out_features], dtype=torch.int64 if lead.dtype == trt.int64 else torch.int32))
        shape = out(net.add_concatenation([lead, width]))
        final = net.add_shuffle(y)
        final.set_input(1, shape)
        return out(final)


class TensorRTModule:
    """A program backend: `make_program(args)` gives the ExportedProgram (with the rewrite) for example inputs;
    at the first call it is compiled with torch-tensorrt (the rest of the graph converted by torch-tensorrt's own
    converters), then the compiled module runs. bamboo.compile(model, backend="tensorrt") builds one."""

    def __init__(self, make_program, enabled_precisions=None, **trt_options):
        self.torch_tensorrt = require_torch_tensorrt()
        self.make_program = make_program
        self.options = dict(trt_options)
        self.enabled_precisions = enabled_precisions
        self.compiled = None

    def compile(self, args):
        program = self.make_program(args)
        precisions = self.enabled_precisions or {next(iter(program.state_dict.values())).dtype}
        self.compiled = self.torch_tensorrt.dynamo.compile(program, inputs=list(args), min_block_size=1,
                                                           enabled_precisions=precisions, **self.options)
        return self.compiled

    def save(self, path, args) -> Path:
        """torch_tensorrt.save of the compiled module (an ExportedProgram holding the engines)."""
        compiled = self.compiled if self.compiled is not None else self.compile(args)
        self.torch_tensorrt.save(compiled, str(path), inputs=list(args))
        return Path(path)

    def __call__(self, *args):
        if self.compiled is None:
            self.compile(args)
        return self.compiled(*args)


__all__ = ["TensorRTModule", "register_sparse_ffn_converter", "require_torch_tensorrt"]
