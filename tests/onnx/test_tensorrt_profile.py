"""bamboo's TensorRT profile for ONNX: the export, the checker, and (where TensorRT imports) the engine build."""
import importlib.util

import pytest
import torch

pytest.importorskip("onnxscript", reason="the onnx extra is not installed")
ort = pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")
import onnx  # noqa: E402
from onnx import TensorProto, helper  # noqa: E402

import bamboo  # noqa: E402
from bamboo import export_tensorrt_onnx  # noqa: E402
from bamboo.errors import InputError  # noqa: E402
from bamboo.onnx.tensorrt_profile import (  # noqa: E402
    PROFILE_KEY,
    build_tensorrt_engine,
    check_tensorrt_profile,
)
from tests.onnx.test_export_onnx import random_predictors  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore")
HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None and torch.cuda.is_available()


@pytest.fixture(scope="module")
def model():
    from bamboo.models import BambooConfig, BambooForCausalLM

    config = BambooConfig.named("tiny", num_hidden_layers=2, vocab_size=512, initializer_range=0.2)
    return BambooForCausalLM.from_config(config, seed=7).eval()


@pytest.mark.parametrize("sparsity", ["exact", "predictor"])
def test_profile_export_passes_the_checker_and_onnx_runtime_matches_pytorch(model, tmp_path, sparsity):
    predictors = random_predictors(model, threshold=0.2, top_k=120) if sparsity == "predictor" else None
    path = export_tensorrt_onnx(model, (torch.randint(0, 512, (2, 8)),), tmp_path / "m.onnx", sparsity=sparsity,
                                predictors=predictors)
    proto = onnx.load(str(path))
    assert check_tensorrt_profile(proto) == []
    ops = {n.op_type for n in proto.graph.node}
    assert "NonZero" not in ops and (("TopK" in ops) == (sparsity == "predictor"))
    assert any(p.key == PROFILE_KEY for p in proto.metadata_props)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    reference = bamboo.compile(model, sparsity=sparsity, predictors=predictors)
    for shape in [(1, 1), (2, 8), (1, 20)]:  # 20 rows: prefill, every neuron
        ids = torch.randint(0, 512, shape)
        (out,) = session.run(None, {session.get_inputs()[0].name: ids.numpy()})
        with torch.no_grad():
            torch.testing.assert_close(torch.from_numpy(out), reference(ids), rtol=1e-4, atol=1e-4)


def test_the_regular_export_is_outside_the_profile(model, tmp_path):
    path = bamboo.export_onnx(model, (torch.randint(0, 512, (2, 8)),), tmp_path / "m.onnx")
    problems = [str(v) for v in check_tensorrt_profile(path)]
    assert any("NonZero has a data-dependent output shape" in p for p in problems)
    assert any("input input_ids" in p and "no optimization profile" in p for p in problems)


def handmade(nodes, initializers=(), inputs=None, metadata=None):
    inputs = inputs or [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])]
    graph = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              initializer=list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    for key, value in (metadata or {}).items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    return model


@pytest.mark.parametrize("case, expected", [
    ("topk_too_large", "exceeds TensorRT's limit of 3840"),
    ("topk_computed_k", "TopK's k is computed at run time"),
    ("unsupported_op", "op Det is not supported"),
    ("custom_domain", "custom-domain op"),
    ("nonzero", "data-dependent output shape"),
    ("dynamic_input", "no optimization profile"),
])
def test_checker_names_each_violation(case, expected):
    k5000 = helper.make_tensor("k", TensorProto.INT64, [1], [5000])
    models = {
        "topk_too_large": handmade([helper.make_node("TopK", ["x", "k"], ["y", "i"])], [k5000]),
        "topk_computed_k": handmade([helper.make_node("Shape", ["x"], ["k"]),
                                     helper.make_node("TopK", ["x", "k"], ["y", "i"])]),
        "unsupported_op": handmade([helper.make_node("Det", ["x"], ["y"])]),
        "custom_domain": handmade([helper.make_node("SparseFFN", ["x"], ["y"], domain="bamboo")]),
        "nonzero": handmade([helper.make_node("NonZero", ["x"], ["y"])]),
        "dynamic_input": handmade([helper.make_node("Relu", ["x"], ["y"])],
                                  inputs=[helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])]),
    }
    problems = [str(v) for v in check_tensorrt_profile(models[case])]
    assert len(problems) == 1 and expected in problems[0], problems


def test_a_graph_inside_the_profile_passes():
    k = helper.make_tensor("k", TensorProto.INT64, [1], [2])
    model = handmade([helper.make_node("Relu", ["x"], ["r"]), helper.make_node("TopK", ["r", "k"], ["y", "i"])], [k],
                     inputs=[helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
                     metadata={PROFILE_KEY: '{"x": {"min": [1, 4], "opt": [2, 4], "max": [8, 4]}}'})
    assert check_tensorrt_profile(model) == []


def test_a_cap_above_tensorrts_topk_limit_is_refused(model, tmp_path):
    with pytest.raises(InputError, match="exceeds TensorRT's TopK limit"):
        export_tensorrt_onnx(model, (torch.randint(0, 512, (2, 8)),), tmp_path / "m.onnx", sparsity="predictor",
                             predictors=random_predictors(model, threshold=0.0, top_k=4000))


@pytest.mark.skipif(not HAS_TENSORRT, reason="TensorRT is not installed here (its wheels are not on PyPI) or no GPU")
def test_engine_builds_from_the_profile_export(model, tmp_path):
    path = export_tensorrt_onnx(model, (torch.randint(0, 512, (2, 8)),), tmp_path / "m.onnx")
    engine = build_tensorrt_engine(path, tmp_path / "m.engine", fp16=True)
    assert engine.stat().st_size > 0
