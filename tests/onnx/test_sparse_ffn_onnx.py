"""The ONNX lowering of bamboo::sparse_ffn (bamboo/ops/sparse_ffn_onnx.py) run through ONNX Runtime, one part at
a time: each up activation's ONNX spelling against the op's own definition, in fp64."""
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("onnxscript", reason="the onnx extra is not installed")
ort = pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")
import onnx  # noqa: E402

import bamboo  # noqa: E402
from bamboo.ops import activations  # noqa: E402
from bamboo.ops.sparse_ffn import reference_sparse_ffn  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore")

UP_ACTS = {"identity": lambda u: u, "relu": F.relu, "silu": F.silu, "gelu": F.gelu,
           "gelu_tanh": lambda u: F.gelu(u, approximate="tanh"), "sigmoid": torch.sigmoid, "tanh": torch.tanh}


class ReGLUs(torch.nn.Module):
    """One ReGLU FFN per up activation, side by side: one export covers every activation's lowering."""

    def __init__(self, gen, hidden=16, intermediate=40):
        super().__init__()
        self.weights = torch.nn.ParameterList()
        for _ in UP_ACTS:
            for shape in ((intermediate, hidden), (intermediate, hidden), (hidden, intermediate)):
                self.weights.append(torch.nn.Parameter(torch.randn(*shape, generator=gen) / shape[1] ** 0.5))

    def forward(self, x):
        outs = []
        for i, act in enumerate(UP_ACTS.values()):
            gw, uw, dw = self.weights[3 * i:3 * i + 3]
            outs.append(F.linear(torch.relu(F.linear(x, gw)) * act(F.linear(x, uw)), dw))
        return tuple(outs)


def test_every_up_activation_lowers_to_its_own_function(tmp_path):
    assert set(UP_ACTS) == set(activations.ACTIVATIONS)  # a new activation needs a case here
    gen = torch.Generator().manual_seed(31)
    model = ReGLUs(gen).eval()
    path = bamboo.export_onnx(model, (torch.randn(2, 3, 16, generator=gen),), tmp_path / "reglus.onnx",
                              sparsity="exact")
    nonzeros = [n for n in onnx.load(str(path)).graph.node if n.op_type == "NonZero"]
    assert len(nonzeros) == len(UP_ACTS)  # every FFN went through bamboo's lowering (exact mode: one NonZero each)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.randn(3, 4, 16, generator=gen) * 2  # up values well past where the activations look alike
    outs = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    assert len(outs) == len(UP_ACTS)
    for i, (name, out) in enumerate(zip(UP_ACTS, outs)):
        gw, uw, dw = (w.detach().double() for w in model.weights[3 * i:3 * i + 3])
        expected = reference_sparse_ffn(x.double(), gw, None, uw, None, dw, None, None, kind="reglu", mode="dense",
                                        up_act=name)
        err = ((torch.from_numpy(out).double() - expected).norm() / expected.norm()).item()
        assert err < 1e-5, (name, err)
