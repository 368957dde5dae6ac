"""Differential tests: models compiled or exported by bamboo against the same models uncompiled.

The guard the suite lacked: with Dynamo's default (`inline_inbuilt_nn_modules`), parameters are graph inputs
without identity guards, so a graph break inside a layer makes one compiled graph serve every layer (and
every expert of an MoE loop whose routing is read on the host). Whatever the fused op uses must come from the
weights of the call, never from the tensors seen at compile time (bamboo/ops/bound_weights.py).
Each case also asserts that the fused op really ran, so a silent dense fallback cannot pass.
"""
from __future__ import annotations

import types

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import bamboo
from bamboo.calibrate.predictors import LayerPredictor, Predictors, fingerprint
from bamboo.models import BambooForCausalLM
from bamboo.ops import count_weight_reads
from tests.ffn_zoo import TinyMoE, ZooFFN

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
FP32 = dict(rtol=1e-4, atol=1e-5)  # fp32, other summation orders (the CPU kernel vs MKL) over stacked layers


# -- models whose compiled graphs are reused across layers ------------------------------------------------------

class BreakingLayer(nn.Module):
    """A residual FFN layer whose forward breaks the graph: Dynamo compiles the rest once for all layers."""

    def __init__(self, kind="drelu", bias=False, hidden=16, intermediate=48, breaks=("start",)):
        super().__init__()
        self.ffn = ZooFFN(kind, "F.relu", "nn.Linear", bias=bias, hidden=hidden, intermediate=intermediate)
        self.breaks = set(breaks)

    def forward(self, x):
        x = x * 1.0
        if "start" in self.breaks:
            torch._dynamo.graph_break()
        y = self.ffn(x)
        if "end" in self.breaks:
            torch._dynamo.graph_break()
        return x + y


class BreakingStack(nn.Module):
    def __init__(self, layers=3, **layer_options):
        super().__init__()
        self.layers = nn.ModuleList(BreakingLayer(**layer_options) for _ in range(layers))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


class HostRoutedMoE(TinyMoE):
    """TinyMoE's router and experts with top-1 routing read on the host (as many MoE implementations do): one graph
    runs every expert."""

    def __init__(self, hidden=16, intermediate=32, experts=4):
        super().__init__(hidden, intermediate, experts)

    def forward(self, x):
        flat = x.reshape(-1, x.shape[-1])
        choice = self.router(flat).argmax(-1)
        out = torch.zeros_like(flat)
        for e in choice.unique().tolist():  # a host read: the graph breaks here
            rows = (choice == e).nonzero().squeeze(1)
            out = out.index_add(0, rows, self.experts[e](flat.index_select(0, rows)))
        return out.reshape(x.shape)


class TiedFFNs(nn.Module):
    """Two FFNs sharing one down projection, and one FFN module called twice."""

    def __init__(self, hidden=16, intermediate=48):
        super().__init__()
        self.a = ZooFFN("drelu", "F.relu", "nn.Linear", hidden=hidden, intermediate=intermediate)
        self.b = ZooFFN("reglu_silu", "F.relu", "nn.Linear", hidden=hidden, intermediate=intermediate)
        self.b.down.lin.weight = self.a.down.lin.weight
        self.shared = ZooFFN("drelu", "torch.relu", "F.linear", hidden=hidden, intermediate=intermediate)

    def forward(self, x):
        x = x + self.a(x)
        x = x + self.b(x)
        return x + self.shared(self.shared(x))


def _forward_with_graph_break(self, x, cos, sin, mask, cache_position=None):
    x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache_position)
    torch._dynamo.graph_break()
    return x + self.mlp(self.post_attention_layernorm(x))


def tiny_bamboo_with_breaks(seed=0):
    """The tiny Bamboo with a graph break in each decoder layer: one MLP graph serves all four layers."""
    model = BambooForCausalLM.from_config("tiny", seed=seed).eval()
    for layer in model.model.layers:
        layer.forward = types.MethodType(_forward_with_graph_break, layer)
    return model


def randomized(module: nn.Module, seed: int) -> nn.Module:
    """Fresh non-symmetric random weights (biases off zero), so no two layers agree by accident."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) / max(p.shape[-1], 1) ** 0.5 + 0.01)
    return module.eval()


ZOO = {
    "stack-drelu": lambda: BreakingStack(kind="drelu"),
    "stack-reglu-silu-bias": lambda: BreakingStack(kind="reglu_silu", bias=True),
    "stack-relu-mlp-bias": lambda: BreakingStack(kind="relu_mlp", bias=True, breaks=("start", "end")),
    "host-routed-moe": lambda: HostRoutedMoE(),
    "dense-dispatch-moe": lambda: TinyMoE(),
    "tied-and-shared": lambda: TiedFFNs(),
    "zoo-drelu-clamp-xWT": lambda: ZooFFN("drelu", "clamp", "x@W.T", bias=True),
    "zoo-reglu-gelu-in-out": lambda: ZooFFN("reglu_gelu", "relu_", "x@W_in_out"),
}
FFN_CALLS = {"stack-drelu": 3, "stack-reglu-silu-bias": 3, "stack-relu-mlp-bias": 3, "tied-and-shared": 4,
             "dense-dispatch-moe": 3, "zoo-drelu-clamp-xWT": 1, "zoo-reglu-gelu-in-out": 1}


def run_counting(fn, *args):
    with torch.no_grad(), count_weight_reads() as traffic:
        out = fn(*args)
    return out, traffic.calls


def compiled_equals_uncompiled(name, backend, seed):
    """Compile a zoo model in exact mode and compare it with the uncompiled one; the fused op's call count."""
    model = randomized(ZOO[name](), seed=seed)
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        expected = model(x)
    compiled = bamboo.compile(model, backend=backend, sparsity="exact")
    actual, calls = run_counting(compiled, x)
    torch.testing.assert_close(actual, expected, **FP32)
    return model, compiled, calls


@pytest.mark.parametrize("name", sorted(ZOO))
def test_compiled_exact_equals_the_uncompiled_model(name):
    model, compiled, calls = compiled_equals_uncompiled(name, "eager", seed=sorted(ZOO).index(name))
    assert calls == FFN_CALLS.get(name, calls) and calls > 0, "the fused op did not run for every FFN"
    # a second input reuses the graphs: still each layer's own weights
    x2 = torch.randn(2, 5, 16)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x2), model(x2), **FP32)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["stack-drelu", "host-routed-moe"])
def test_inductor_exact_equals_the_uncompiled_model(name):
    _, _, calls = compiled_equals_uncompiled(name, "inductor", seed=7)
    assert calls >= 3


def test_weights_changed_in_place_after_compiling_are_used():
    model = randomized(BreakingStack(), seed=3)
    compiled = bamboo.compile(model, backend="eager", sparsity="exact")
    x = torch.randn(2, 4, 16)
    with torch.no_grad():
        compiled(x)
        model.load_state_dict(randomized(BreakingStack(), seed=4).state_dict())  # copy_ into the parameters
        torch.testing.assert_close(compiled(x), model(x), **FP32)


@pytest.mark.parametrize("name", ["stack-drelu", "stack-reglu-silu-bias", "tied-and-shared", "dense-dispatch-moe",
                                  "zoo-drelu-clamp-xWT", "zoo-reglu-gelu-in-out"])
def test_exported_program_equals_the_uncompiled_model(name):
    model = randomized(ZOO[name](), seed=11)
    program = bamboo.export(model, (torch.randn(2, 5, 16),))
    assert any(n.target is torch.ops.bamboo.sparse_ffn.default for n in program.graph.nodes)
    x = torch.randn(3, 4, 16)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), model(x), **FP32)


@pytest.mark.parametrize("name", ["stack-drelu", "tied-and-shared"])
def test_onnx_runtime_equals_the_uncompiled_model(name, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    model = randomized(ZOO[name](), seed=13)
    path = bamboo.export_onnx(model, (torch.randn(2, 5, 16),), tmp_path / "m.onnx", sparsity="exact")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.randn(3, 4, 16)
    (actual,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(actual), model(x), rtol=1e-4, atol=1e-5)


def test_tiny_bamboo_with_a_graph_break_in_every_layer():
    model = tiny_bamboo_with_breaks()
    ids = torch.randint(0, model.config.vocab_size, (2, 7))
    with torch.no_grad():
        expected = model(ids)
    compiled = bamboo.compile(model, backend="eager", sparsity="exact")
    actual, calls = run_counting(compiled, ids)
    torch.testing.assert_close(actual, expected, **FP32)
    assert calls == model.config.num_hidden_layers


# -- predictor mode: each layer its own predictor, threshold and cap --------------------------------------------

def layer_predictors(model, rank=8, seed=0) -> Predictors:
    """Random predictors bound to each layer's gate weight, with a different threshold and cap per layer, so
    a graph that applied one layer's predictor to another would give other outputs."""
    g = torch.Generator().manual_seed(seed)
    layers = []
    for i, layer in enumerate(model.model.layers):
        gate = layer.mlp.gate_proj.weight
        intermediate, hidden = gate.shape
        w_in = torch.randn(rank, hidden, generator=g)
        w_out = torch.randn(intermediate, rank, generator=g) / rank ** 0.5
        layers.append(LayerPredictor(f"model.layers.{i}.mlp", w_in, w_out, torch.randn(intermediate, generator=g),
                                     threshold=0.5 * i, fingerprint=fingerprint(gate), top_k=(0, 64, 0, 200)[i % 4]))
    return Predictors(layers)


def test_predictor_mode_under_graph_reuse_equals_the_exported_program():
    model = tiny_bamboo_with_breaks(seed=1)
    predictors = layer_predictors(model)
    ids = torch.randint(0, model.config.vocab_size, (1, 5))
    compiled = bamboo.compile(model, backend="eager", sparsity="predictor", predictors=predictors)
    actual, calls = run_counting(compiled, ids)
    assert calls == model.config.num_hidden_layers
    program = bamboo.export(model, (torch.randint(0, 100, (2, 5)),), sparsity="predictor", predictors=predictors)
    with torch.no_grad():
        exported = program.module()(ids)
        dense = model(ids)
    torch.testing.assert_close(actual, exported, **FP32)
    assert (actual - dense).abs().max() > 1e-3, "predictor mode dropped nothing: the test would not see a mix-up"


def test_predictors_of_another_model_are_refused_at_compile():
    predictors = layer_predictors(tiny_bamboo_with_breaks(seed=1))
    with pytest.raises(bamboo.BambooError, match="another model"):
        bamboo.compile(tiny_bamboo_with_breaks(seed=2), sparsity="predictor", predictors=predictors)


# -- NaN and inf propagate as in the dense model ------------------------------------------------------------------

def poisoned(value, rows=1):
    x = torch.randn(rows, 3, 16)
    x[0, 1, 5] = value
    return x


def assert_like_dense(actual, expected):
    assert torch.equal(torch.isnan(actual), torch.isnan(expected))
    assert torch.equal(torch.isinf(actual), torch.isinf(expected))
    finite = torch.isfinite(expected)
    torch.testing.assert_close(actual[finite], expected[finite], **FP32)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("sparsity", ["exact", "predictor"])
def test_nan_and_inf_propagate_like_dense_through_compile_and_export(value, sparsity):
    model = randomized(BreakingStack(layers=2, kind="drelu"), seed=5)
    options = {}
    if sparsity == "predictor":
        gates = [layer.ffn.gate.lin.weight for layer in model.layers]
        options["predictors"] = Predictors(
            LayerPredictor(f"layers.{i}.ffn", torch.randn(4, 16), torch.randn(48, 4), torch.zeros(48), 1.0,
                           fingerprint(g), top_k=8) for i, g in enumerate(gates))
    x = poisoned(value)
    with torch.no_grad():
        expected = model(x)
    assert not torch.isfinite(expected).all()
    compiled = bamboo.compile(model, backend="eager", sparsity=sparsity, **options)
    program = bamboo.export(model, (torch.randn(2, 3, 16),), sparsity=sparsity, **options)
    with torch.no_grad():
        actual, exported = compiled(x), program.module()(x)
    if sparsity == "exact":
        assert_like_dense(actual, expected)
        assert_like_dense(exported, expected)
    else:  # approximate values, but the same tokens go non-finite, and compile and export agree
        assert torch.equal(torch.isfinite(actual), torch.isfinite(expected))
        assert_like_dense(actual, exported)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nan_and_inf_propagate_like_dense_through_onnx_runtime(value, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    model = randomized(ZooFFN("drelu", "F.relu", "nn.Linear", bias=True), seed=6)
    path = bamboo.export_onnx(model, (torch.randn(2, 3, 16),), tmp_path / "m.onnx", sparsity="exact")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = poisoned(value)
    (actual,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        assert_like_dense(torch.from_numpy(actual), model(x))


# -- graph breaks anywhere ------------------------------------------------------------------------------------------

class AnywhereBreakingFFN(nn.Module):
    POINTS = ("before", "after_gate", "after_up", "before_down", "after")

    def __init__(self, breaks, hidden=16, intermediate=40):
        super().__init__()
        self.gate = nn.Linear(hidden, intermediate)
        self.up = nn.Linear(hidden, intermediate)
        self.down = nn.Linear(intermediate, hidden)
        self.breaks = set(breaks)

    def _maybe_break(self, point):
        if point in self.breaks:
            torch._dynamo.graph_break()

    def forward(self, x):
        self._maybe_break("before")
        g = F.relu(self.gate(x))
        self._maybe_break("after_gate")
        u = F.relu(self.up(x))
        self._maybe_break("after_up")
        h = g * u
        self._maybe_break("before_down")
        y = x + self.down(h)
        self._maybe_break("after")
        return y


@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.sets(st.sampled_from(AnywhereBreakingFFN.POINTS)), min_size=2, max_size=3),
       st.integers(0, 2**16))
def test_graph_breaks_at_random_places_never_change_the_result(breaks, seed):
    # Which FFNs end up whole in one graph is Dynamo's business (a break inside nn.Sequential's loop makes it
    # run the rest of the loop eagerly, dense): the invariant is that the result never changes.
    torch._dynamo.reset()
    model = randomized(nn.Sequential(*(AnywhereBreakingFFN(b) for b in breaks)), seed)
    x = torch.randn(2, 3, 16, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        expected = model(x)
    compiled = bamboo.compile(model, backend="eager", sparsity="exact")
    actual, calls = run_counting(compiled, x)
    torch.testing.assert_close(actual, expected, **FP32)
    assert calls <= len(breaks)
