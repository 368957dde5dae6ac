"""bamboo.inductor_pass inside a plain torch.compile: the post-grad ATen spellings are matched, the fused op
runs (its calls are counted), results equal the uncompiled model, graphs reused across layers read each
layer's weights and predictors, and refusals are reported."""
import pytest
import torch

import bamboo
from bamboo.calibrate.predictors import LayerPredictor, Predictors, fingerprint
from bamboo.ops import count_weight_reads
from bamboo.passes.inductor_pass import BambooInductorPass
from tests.ffn_zoo import ZooFFN
from tests.test_differential import BreakingStack, randomized

pytestmark = pytest.mark.slow  # cold Inductor compiles


def compiled_with(model, graph_pass):
    return torch.compile(model, options={"post_grad_custom_post_pass": graph_pass, "fx_graph_cache": False})


def test_graph_break_stack_equals_the_model_with_the_fused_op_in_every_layer():
    model = randomized(BreakingStack(kind="reglu_silu", bias=True), seed=21)
    graph_pass = bamboo.inductor_pass()
    x = torch.randn(2, 5, 16)
    with torch.no_grad(), count_weight_reads() as traffic:
        actual = compiled_with(model, graph_pass)(x)
        expected = model(x)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    assert traffic.calls == 3  # one graph, three layers: each call read its own layer's weights
    assert [s.kind for s in graph_pass.sites] == ["reglu"]


def test_predictor_mode_binds_each_layers_predictor_and_equals_the_exported_program():
    model = randomized(BreakingStack(kind="drelu"), seed=22)
    gates = [layer.ffn.gate.lin.weight for layer in model.layers]
    g = torch.Generator().manual_seed(0)
    predictors = Predictors(LayerPredictor(f"layers.{i}.ffn", torch.randn(4, 16, generator=g),
                                           torch.randn(48, 4, generator=g), torch.randn(48, generator=g),
                                           threshold=0.3 * i, fingerprint=fingerprint(w), top_k=(0, 10, 20)[i])
                            for i, w in enumerate(gates))
    x = torch.randn(1, 3, 16)
    with torch.no_grad():
        actual = compiled_with(model, bamboo.inductor_pass("predictor", predictors))(x)
        program = bamboo.export(model, (torch.randn(2, 3, 16),), sparsity="predictor", predictors=predictors)
        torch.testing.assert_close(actual, program.module()(x), rtol=1e-5, atol=1e-5)
        assert (actual - model(x)).abs().max() > 1e-3  # the predictors dropped neurons


def test_swiglu_is_refused_with_the_reason():
    model = ZooFFN("swiglu", "F.relu", "nn.Linear").eval()
    graph_pass = bamboo.inductor_pass()
    with torch.no_grad(), pytest.warns(UserWarning, match="no exact zeros"):
        compiled_with(model, graph_pass)(torch.randn(2, 16))
    assert not list(graph_pass.sites) and graph_pass.sites.rejected


def test_uuid_is_stable_and_names_the_mode_and_predictors():
    assert bamboo.inductor_pass().uuid() == bamboo.inductor_pass().uuid()
    assert BambooInductorPass("exact").uuid() != BambooInductorPass("predictor", table=1, predictor_digest="a").uuid()
    assert BambooInductorPass("predictor", table=1, predictor_digest="a").uuid() != \
        BambooInductorPass("predictor", table=1, predictor_digest="b").uuid()
    with pytest.raises(bamboo.BambooError, match="leave the pass out"):
        bamboo.inductor_pass("dense")
