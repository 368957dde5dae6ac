"""The ONNX Runtime backend's IOBinding path (the one CUDA uses), run here on the CPU EP."""
import pytest
import torch

ort = pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")
import onnx  # noqa: E402
from onnx import TensorProto, helper  # noqa: E402

import bamboo  # noqa: E402
from bamboo.backends import onnxruntime as ort_backend  # noqa: E402
from bamboo.backends.onnxruntime import run_with_iobinding  # noqa: E402
from bamboo.errors import InputError  # noqa: E402


def save(model, path):
    onnx.save(model, str(path))
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def scale_and_nonzero_model():
    """y = 2x keeps x's symbolic dims; idx = NonZero(x) has a dim no input names (only ORT knows its size)."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "width"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "width"])
    idx = helper.make_tensor_value_info("idx", TensorProto.INT64, [2, "found"])
    two = helper.make_tensor("two", TensorProto.FLOAT, [], [2.0])
    graph = helper.make_graph([helper.make_node("Mul", ["x", "two"], ["y"]), helper.make_node("NonZero", ["x"], ["idx"])],
                              "g", [x], [y, idx], [two])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)


def test_outputs_with_input_dims_are_preallocated_and_others_come_from_ort(tmp_path, monkeypatch):
    session = save(scale_and_nonzero_model(), tmp_path / "m.onnx")
    fallbacks = []
    real_to_torch = ort_backend._to_torch
    monkeypatch.setattr(ort_backend, "_to_torch", lambda v, d: fallbacks.append(v) or real_to_torch(v, d))
    x = torch.randn(3, 5)
    x[1, 2] = 0.0
    y, idx = run_with_iobinding(session, [x], torch.device("cpu"))
    torch.testing.assert_close(y, 2 * x, rtol=0, atol=0)
    assert torch.equal(idx, torch.stack(torch.nonzero(x, as_tuple=True)))
    assert len(fallbacks) == 1  # only NonZero's output needed ORT's allocation


def test_non_contiguous_inputs_are_bound_as_their_values(tmp_path):
    session = save(scale_and_nonzero_model(), tmp_path / "m.onnx")
    x = torch.randn(5, 3).t()  # a strided view: its pointer alone would read the wrong elements
    y, _ = run_with_iobinding(session, [x], torch.device("cpu"))
    torch.testing.assert_close(y, 2 * x, rtol=0, atol=0)


def test_resolve_shape():
    assert ort_backend._resolve_shape(["b", "7", 3], {"b": 2}) == [2, 7, 3]
    assert ort_backend._resolve_shape(["b", "s0 + 1"], {"b": 2}) is None


def test_bfloat16_inputs_are_refused_with_the_fix(tmp_path):
    session = save(scale_and_nonzero_model(), tmp_path / "m.onnx")
    with pytest.raises(InputError, match="bfloat16.*float16 or float32"):
        run_with_iobinding(session, [torch.randn(2, 2, dtype=torch.bfloat16)],
                           torch.device("cpu"))


def test_wrong_number_of_inputs_and_the_right_one(tmp_path):
    linear = torch.nn.Linear(4, 5)
    module = bamboo.compile(linear, backend="onnxruntime", sparsity="dense", path=tmp_path / "lin.onnx",
                            example_inputs=(torch.randn(2, 4),))
    with pytest.raises(InputError, match="takes 1 tensor input"):
        module(torch.randn(2, 4), torch.randn(2, 4))
    x = torch.randn(3, 4)  # another batch size than the example's: the values, not only the shape
    with torch.no_grad():
        torch.testing.assert_close(module(x), linear(x), rtol=1e-6, atol=1e-6)
