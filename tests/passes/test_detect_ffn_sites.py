"""Detection in the style of onnxscript's rule tests: every spelling matches with the right kind, and every
graph that must not be rewritten is refused with its reason."""
import itertools

import pytest
import torch

from bamboo.graph.capture import export_program
from bamboo.passes import detect_ffn_sites
from tests.ffn_zoo import (
    EXPECTED_KIND,
    EXPECTED_REASON,
    KINDS,
    LINEAR_SPELLINGS,
    NEGATIVES,
    RELU_SPELLINGS,
    DropoutBeforeDown,
    FusedGateUp,
    NormTwice,
    ReluThenSoftmax,
    TinyMoE,
    ZooFFN,
)


def exported_sites(module, x):
    return detect_ffn_sites(export_program(module, (x,), dynamic=False).graph)


def dynamo_sites(module, x):
    found = {}

    def backend(gm, example_inputs):
        found["report"] = detect_ffn_sites(gm.graph)
        return gm.forward

    torch.compile(module, backend=backend)(x)
    return found["report"]


SPELLING_CASES = [
    (KINDS[i % len(KINDS)], relu, linear)
    for i, (relu, linear) in enumerate(itertools.product(RELU_SPELLINGS, LINEAR_SPELLINGS))
]


@pytest.mark.parametrize("kind, relu, linear", SPELLING_CASES)
@pytest.mark.parametrize("capture", [exported_sites, dynamo_sites], ids=["export", "dynamo"])
def test_every_relu_and_linear_spelling_matches(kind, relu, linear, capture):
    report = capture(ZooFFN(kind, relu, linear), torch.randn(2, 3, 16))
    assert [s.kind for s in report.sites] == [EXPECTED_KIND[kind]]
    site = report.sites[0]
    assert (site.hidden_size, site.intermediate_size, site.out_features) == (16, 48, 16)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("weights_as", ["parameter", "buffer"])
@pytest.mark.parametrize("gate_first", [True, False])
@pytest.mark.parametrize("bias", [False, True])
def test_kinds_weights_operand_order_and_bias(kind, weights_as, gate_first, bias):
    report = exported_sites(ZooFFN(kind, "F.relu", "x@W.T", weights_as, gate_first, bias), torch.randn(4, 16))
    assert [s.kind for s in report.sites] == [EXPECTED_KIND[kind]]
    site = report.sites[0].match
    assert (site.gate.bias is not None) == bias and (site.down.bias is not None) == bias


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(5, 16), (2, 3, 16)])
def test_dtypes_and_ranks(dtype, shape):
    report = exported_sites(ZooFFN("drelu").to(dtype), torch.randn(*shape, dtype=dtype))
    assert len(report.sites) == 1 and report.sites[0].dtype == dtype


def test_reglu_activation_is_recorded_and_the_relu_factor_is_the_gate():
    report = exported_sites(ZooFFN("reglu_silu", gate_first=False), torch.randn(4, 16))
    site = report.sites[0]
    assert (site.kind, site.up_act) == ("reglu", "silu")
    assert site.match.gate.weight.name.endswith("gate_weight")


def test_moe_experts_are_each_a_site():
    report = exported_sites(TinyMoE(), torch.randn(2, 5, 16))
    assert [s.module for s in report.sites] == ["experts.0", "experts.1", "experts.2"]
    assert {s.kind for s in report.sites} == {"drelu"}


def test_module_path_of_a_bamboo_model():
    from bamboo.models import BambooConfig, BambooForCausalLM

    model = BambooForCausalLM.from_config(BambooConfig.named("tiny", num_hidden_layers=3, vocab_size=128))
    report = exported_sites(model, torch.randint(0, 128, (2, 4)))
    assert [s.module for s in report.sites] == [f"model.layers.{i}.mlp" for i in range(3)]
    assert report.rejected == []  # attention projections and norms are not candidates


@pytest.mark.parametrize("negative", NEGATIVES)
def test_graphs_that_must_not_be_rewritten_are_refused_with_the_reason(negative):
    report = exported_sites(ZooFFN(negative), torch.randn(2, 3, 16))
    assert report.sites == []
    assert any(EXPECTED_REASON[negative] in r.reason for r in report.rejected), report.rejected


@pytest.mark.parametrize("split", ["chunk", "split", "slice"])
@pytest.mark.parametrize("capture", [exported_sites, dynamo_sites], ids=["export", "dynamo"])
def test_fused_gate_up_halves_match_with_their_rows(split, capture):
    report = capture(FusedGateUp(split), torch.randn(2, 3, 16))
    assert [s.kind for s in report.sites] == ["reglu"]
    match = report.sites[0].match
    assert (match.gate.rows, match.up.rows) == ((0, 24), (24, 48)) and match.gate.weight is match.up.weight


@pytest.mark.parametrize("capture", [exported_sites, dynamo_sites], ids=["export", "dynamo"])
def test_eval_dropout_between_relu_and_down_is_an_identity(capture):
    assert [s.kind for s in capture(DropoutBeforeDown().eval(), torch.randn(2, 3, 16)).sites] == ["relu_mlp"]


def test_training_dropout_is_refused_with_the_reason():
    report = dynamo_sites(DropoutBeforeDown().train(), torch.randn(2, 3, 16))
    assert report.sites == [] and "reaches the down projection" in report.rejected[0].reason


@pytest.mark.parametrize("capture", [exported_sites, dynamo_sites], ids=["export", "dynamo"])
def test_a_norm_computed_twice_for_gate_and_up_is_one_input(capture):
    report = capture(NormTwice(), torch.randn(2, 3, 16))
    assert [s.kind for s in report.sites] == ["drelu"] and report.sites[0].match.duplicates


def test_a_relu_fed_down_projection_of_no_known_shape_is_refused_not_silent():
    report = exported_sites(ReluThenSoftmax(), torch.randn(2, 16))
    assert report.sites == [] and "reaches the down projection" in report.rejected[0].reason
