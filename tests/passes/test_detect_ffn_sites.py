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


class ClampedFFN(torch.nn.Module):
    """A gated FFN whose factors are clamped to [0, 0.1] (or only the up factor, `gate_relu=True`)."""

    def __init__(self, spelling, gate_relu=False):
        super().__init__()
        self.spelling, self.gate_relu = spelling, gate_relu
        self.gate, self.up, self.down = (torch.nn.Linear(16, 48, bias=False), torch.nn.Linear(16, 48, bias=False),
                                         torch.nn.Linear(48, 16, bias=False))

    def clamp(self, t):
        if self.spelling == "torch.clamp":
            return torch.clamp(t, min=0, max=0.1)
        if self.spelling == "method":
            return t.clamp(0, 0.1)
        if self.spelling == "clip":
            return torch.clip(t, 0.0, 0.1)
        return t.clamp_(min=0, max=0.1)

    def forward(self, x):
        g = torch.relu(self.gate(x)) if self.gate_relu else self.clamp(self.gate(x))
        return self.down(g * self.clamp(self.up(x)))


@pytest.mark.parametrize("spelling", ["torch.clamp", "method", "clip", "clamp_"])
@pytest.mark.parametrize("gate_relu", [False, True], ids=["both_clamped", "up_clamped"])
@pytest.mark.parametrize("capture", [exported_sites, dynamo_sites], ids=["export", "dynamo"])
def test_clamp_with_a_max_is_not_a_relu(spelling, gate_relu, capture):
    """clamp(min=0, max=c) makes the same zeros as a ReLU but also caps the positives: taken for a ReLU, the
    fused op would compute relu() and return a different FFN. It must be refused, with the reason."""
    report = capture(ClampedFFN(spelling, gate_relu), torch.randn(2, 3, 16))
    assert report.sites == []
    reasons = " ".join(r.reason for r in report.rejected)
    assert "max=0.1" in reasons if not gate_relu else "not an elementwise function" in reasons, report.rejected


def test_clamp_with_a_max_compiles_to_the_same_function():
    """The refusal matters: with pre-activations above the cap, accepting the clamp changes the output."""
    import bamboo

    model = ClampedFFN("torch.clamp").eval()
    x = torch.randn(4, 16) * 3
    assert (model.gate(x) > 0.1).any() and (model.up(x) > 0.1).any()
    with pytest.warns(UserWarning, match=r"clamp\(min=0, max=0.1\) is not a ReLU"):
        compiled = bamboo.compile(model, backend="eager", sparsity="exact")
        out = compiled(x)
    torch.testing.assert_close(out, model(x), rtol=0, atol=0)
    assert list(compiled.bamboo_report.sites) == []


@pytest.mark.parametrize("capture", [exported_sites, dynamo_sites], ids=["export", "dynamo"])
def test_weights_of_another_dtype_than_the_input_are_refused(capture):
    """Under autocast a bf16 model takes an fp32 input: the graph's linears mix dtypes, which the fused op (no
    autocast rule) cannot run. Refused with the reason; the compiled model then runs dense and equals eager."""
    model = ZooFFN("drelu").to(torch.bfloat16).eval()
    x = torch.randn(2, 3, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        report = capture(model, x)
    assert report.sites == []
    assert any("is torch.bfloat16 but the input is torch.float32" in r.reason for r in report.rejected), report.rejected


def test_autocast_model_compiles_to_the_same_function():
    import bamboo

    model = ZooFFN("drelu").to(torch.bfloat16).eval()
    x = torch.randn(2, 3, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.warns(UserWarning, match="but the input is"):
        compiled = bamboo.compile(model, backend="eager", sparsity="exact")
        out, expected = compiled(x), model(x)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert list(compiled.bamboo_report.sites) == []
