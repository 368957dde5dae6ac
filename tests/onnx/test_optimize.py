"""The rewrite of foreign ONNX graphs (a plain torch.onnx export) into the sparse form."""
import pytest
import torch

pytest.importorskip("onnxscript", reason="the onnx extra is not installed")
ort = pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")
import onnx  # noqa: E402

import bamboo  # noqa: E402
from bamboo.models import BambooConfig, BambooForCausalLM  # noqa: E402
from bamboo.onnx import optimize  # noqa: E402
from tests.ffn_zoo import ZooFFN  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore")


def plain_export(module, example, path):
    dims = {i: torch.export.Dim.AUTO for i in range(example.dim())}
    torch.onnx.export(module, (example,), dynamo=True, dynamic_shapes=(dims,)).save(str(path))
    return path


def run(path, x):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])


def test_plain_bamboo_export_is_rewritten_and_equals_bamboos_own_export(tmp_path):
    config = BambooConfig.named("tiny", num_hidden_layers=2, vocab_size=512, initializer_range=0.2)
    model = BambooForCausalLM.from_config(config, seed=2).eval()
    plain = plain_export(model, torch.randint(0, 512, (2, 6)), tmp_path / "plain.onnx")
    assert "NonZero" not in {n.op_type for n in onnx.load(str(plain)).graph.node}
    report = optimize(plain, tmp_path / "sparse.onnx")
    assert report == {"rewritten": 2, "rules": {"SparseDReluFFN": 2}}
    ops = {n.op_type for n in onnx.load(str(tmp_path / "sparse.onnx")).graph.node}
    assert {"NonZero", "Gather", "ReduceMax"} <= ops
    direct = bamboo.export_onnx(model, (torch.randint(0, 512, (2, 6)),), tmp_path / "direct.onnx")
    for shape in [(2, 6), (1, 1), (3, 9)]:
        ids = torch.randint(0, 512, shape)
        torch.testing.assert_close(run(tmp_path / "sparse.onnx", ids), run(direct, ids), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind, rule", [("reglu_identity", "SparseReGLUFFN"), ("drelu", "SparseDReluFFN")])
@pytest.mark.parametrize("gate_first", [True, False])
def test_reglu_and_either_operand_order(tmp_path, kind, rule, gate_first):
    module = ZooFFN(kind, "F.relu", "nn.Linear", gate_first=gate_first)
    x = torch.randn(3, 16)
    report = optimize(plain_export(module, x, tmp_path / "p.onnx"), tmp_path / "s.onnx")
    assert report["rewritten"] == 1 and rule in report["rules"]
    with torch.no_grad():
        torch.testing.assert_close(run(tmp_path / "s.onnx", x), module(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["swiglu", "geglu", "product_used_twice"])
def test_graphs_that_must_not_change_are_left_untouched(tmp_path, kind):
    module = ZooFFN(kind, "F.relu", "nn.Linear")
    path = plain_export(module, torch.randn(3, 16), tmp_path / "p.onnx")
    before = [n.op_type for n in onnx.load(str(path)).graph.node]
    report = optimize(path, tmp_path / "s.onnx")
    assert report["rewritten"] == 0
    assert [n.op_type for n in onnx.load(str(tmp_path / "s.onnx")).graph.node] == before


def test_optimize_stays_callable_after_use(tmp_path):
    import bamboo.onnx

    module = ZooFFN("drelu", "F.relu", "nn.Linear")
    optimize(plain_export(module, torch.randn(3, 16), tmp_path / "p.onnx"), tmp_path / "s.onnx")
    assert callable(bamboo.onnx.optimize) and callable(bamboo.calibrate)  # no submodule shadows the functions


@pytest.mark.parametrize("content", [b"this is not onnx", b"\x08\x07\x12\xff\xff"])
def test_a_file_that_is_not_onnx_is_named(tmp_path, content):
    from bamboo.errors import InputError

    (tmp_path / "in.onnx").write_bytes(content)
    with pytest.raises(InputError, match=r"in.onnx is not an ONNX model \(.*\); pass a file written by an ONNX exporter"):
        optimize(tmp_path / "in.onnx", tmp_path / "out.onnx")
    with pytest.raises(InputError, match="does not exist"):
        optimize(tmp_path / "missing.onnx", tmp_path / "out.onnx")
