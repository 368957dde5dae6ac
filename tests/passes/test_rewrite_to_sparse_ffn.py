"""Rewrite tests in the style of vLLM's pass tests: count ops before and after, then compare numerics."""
import pytest
import torch

import bamboo
from bamboo.graph.capture import export_program
from bamboo.graph.inspect_graph import op_counts
from bamboo.passes import PassManager, RewriteToSparseFFN
from tests.ffn_zoo import KINDS, FusedGateUp, NormTwice, TinyMoE, ZooFFN

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def rewritten(module, x, mode="exact"):
    gm = export_program(module, (x,), dynamic=False).module()
    before = op_counts(gm)
    result = PassManager([RewriteToSparseFFN(mode)])(gm)
    return result, before, op_counts(result.graph_module)


def rel_err(out, ref):
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


@pytest.mark.parametrize("kind", KINDS)
def test_op_counts_before_and_after(kind):
    result, before, after = rewritten(ZooFFN(kind, "F.relu", "F.linear", bias=True), torch.randn(2, 3, 16))
    linears = 2 if kind == "relu_mlp" else 3
    assert before["aten.linear"] == linears and after.get("aten.linear", 0) == 0
    assert before["aten.relu"] >= 1 and after.get("aten.relu", 0) == 0
    assert after.get("aten.mul", 0) == 0 and after.get("aten.silu", 0) == 0 and after.get("aten.gelu", 0) == 0
    assert after["bamboo.sparse_ffn"] == 1
    assert result.stats["RewriteToSparseFFN"]["rewritten"] == 1


def test_matmul_spelling_with_bias_is_fused_whole():
    _, before, after = rewritten(ZooFFN("drelu", "clamp", "x@W.T", bias=True), torch.randn(2, 3, 16))
    assert before["aten.matmul"] == 3 and before["aten.add"] == 3
    assert {op: n for op, n in after.items() if "guards" not in op} == {"bamboo.sparse_ffn": 1}


def test_non_matching_graph_is_left_alone():
    result, before, after = rewritten(ZooFFN("swiglu"), torch.randn(2, 16))
    assert not result.modified and before == after
    assert "no exact zeros" in result.stats["RewriteToSparseFFN"]["rejected"][0].reason


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("linear", ["F.linear", "x@W_in_out", "nn.Linear"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_compiled_module_equals_the_original(kind, linear, dtype):
    torch.manual_seed(0)
    module = ZooFFN(kind, "relu_", linear, bias=True).to(dtype)
    compiled = bamboo.compile(module)
    with torch.no_grad():
        for shape in [(1, 16), (2, 3, 16), (4, 1, 16), (3, 7, 16)]:  # several sizes through one compiled module
            x = torch.randn(*shape, dtype=dtype)
            out = compiled(x)
            expected = module(x)
            assert out.shape == expected.shape and not out.isnan().any()
            assert rel_err(out, expected) < TOL[dtype]
    assert len(compiled.bamboo_report.sites) >= 1


def test_compiled_against_fp64_reference():
    torch.manual_seed(1)
    module = ZooFFN("drelu", "torch.relu", "F.linear", bias=True)
    reference = ZooFFN("drelu", "torch.relu", "F.linear", bias=True).double()
    reference.load_state_dict({k: v.double() for k, v in module.state_dict().items()})
    compiled = bamboo.compile(module)
    with torch.no_grad():
        for _ in range(3):
            x = torch.randn(2, 5, 16)
            assert rel_err(compiled(x), reference(x.double())) < 1e-6


def test_moe_compiles_and_matches():
    torch.manual_seed(2)
    moe = TinyMoE()
    compiled = bamboo.compile(moe)
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        assert rel_err(compiled(x), moe(x)) < 1e-5
    assert len(compiled.bamboo_report.sites) == 3


@pytest.mark.parametrize("split", ["chunk", "split", "slice"])
def test_fused_gate_up_rewrites_to_slices_of_the_weight_and_equals_dense(split):
    module, x = FusedGateUp(split), torch.randn(2, 3, 16)
    result, _, after = rewritten(module, x)
    assert after["bamboo.sparse_ffn"] == 1 and after.get("aten.linear", 0) == 0
    assert after["aten.slice"] == 4  # gate and up rows of the weight and of the bias, taken per call
    assert rel_err(result.graph_module(x), module(x)) < TOL[torch.float32]


def test_a_norm_computed_twice_is_rewritten_once_and_equals_dense():
    module, x = NormTwice(), torch.randn(2, 3, 16)
    result, before, after = rewritten(module, x)
    assert before["aten.rsqrt"] == 2 and after["aten.rsqrt"] == 1  # the twin norm died with the site
    assert rel_err(result.graph_module(x), module(x)) < TOL[torch.float32]
