"""transformers models as users have them (tiny configs, random non-symmetric weights), through every step:
inspect finds every FFN (every expert), compile(exact, eager) equals the model, transformers' own generate()
on the compiled model gives the model's tokens (greedy, and sampled with a fixed seed), export and
export_onnx + ONNX Runtime (CPU EP) equal the model."""
import functools
import warnings

import pytest
import torch

import bamboo
from bamboo.errors import InputError
from tests.integrations.transformers_zoo import EXPECTED_SITES, FAMILIES, build, example_kwargs, logits

pytest.importorskip("transformers")
TOL = 1e-4
IDS = torch.randint(3, 100, (2, 7), generator=torch.Generator().manual_seed(0))
MASK = torch.ones_like(IDS)


@functools.lru_cache(maxsize=None)
def model(family):
    return build(family)


@functools.lru_cache(maxsize=None)
def reference(family):
    with torch.no_grad():
        return logits(model(family)(IDS, **example_kwargs(family, IDS)))


@functools.lru_cache(maxsize=None)
def compiled(family):
    return bamboo.compile(model(family), backend="eager", sparsity="exact")


def close(out, ref):
    return (out - ref).abs().max().item() <= TOL * max(1.0, ref.abs().max().item())


@pytest.mark.parametrize("family", FAMILIES)
def test_inspect_finds_every_ffn(family):
    sites = bamboo.inspect(model(family), (IDS,), example_kwargs(family, IDS))
    kind, count = EXPECTED_SITES[family]
    assert [s.kind for s in sites] == [kind] * count, str(sites)
    assert sites.rejected == []


@pytest.mark.parametrize("family", FAMILIES)
def test_compile_exact_equals_the_model(family):
    opt = compiled(family)
    with torch.no_grad():
        out = logits(opt(IDS, **example_kwargs(family, IDS)))
    assert close(out, reference(family))
    kind, count = EXPECTED_SITES[family]
    assert [s.kind for s in opt.bamboo_report.sites] == [kind] * count


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_on_the_compiled_model_gives_the_models_tokens(family):
    m, opt = model(family), compiled(family)
    for sample in (False, True):
        runs = []
        for candidate in (m, opt):
            torch.manual_seed(0)
            with torch.no_grad():
                runs.append(candidate.generate(IDS, attention_mask=MASK, max_new_tokens=4, do_sample=sample,
                                               min_new_tokens=4))
        assert torch.equal(*runs), (sample, runs)


@pytest.mark.parametrize("family", FAMILIES)
def test_export_equals_the_model(family):
    program = bamboo.export(model(family), (IDS,), example_kwargs(family, IDS))
    ops = [n.target for n in program.graph.nodes if n.op == "call_function"]
    assert ops.count(torch.ops.bamboo.sparse_ffn.default) == EXPECTED_SITES[family][1]
    with torch.no_grad():
        out = logits(program.module()(IDS, **example_kwargs(family, IDS), use_cache=False))
    assert close(out, reference(family))


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_export_onnx_runs_in_onnxruntime_and_equals_the_model(family, tmp_path):
    pytest.importorskip("onnxruntime")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ort = bamboo.compile(model(family), backend="onnxruntime", path=tmp_path / "m.onnx")
        out = logits(ort(IDS, **example_kwargs(family, IDS)))
    assert close(out, reference(family))
    import onnx

    ops = {n.op_type for n in onnx.load(str(tmp_path / "m.onnx")).graph.node}
    assert "NonZero" in ops  # the exact-mode lowering of bamboo::sparse_ffn, not a dense FFN


def _calibrate(m):
    batches = [torch.randint(3, 100, (2, 16), generator=torch.Generator().manual_seed(i)) for i in range(4)]
    return bamboo.calibrate(m, batches, rank=8, target_recall=1.0, epochs=1, progress=False)


def test_predictor_mode_through_calibrate_on_a_transformers_model():
    m = model("llama")
    predictors = _calibrate(m)
    assert len(predictors) == 2
    opt = bamboo.compile(m, sparsity="predictor", predictors=predictors)
    with torch.no_grad():
        out = logits(opt(IDS[:1, :1]))  # one row: the predictor selects (larger calls run dense)
        ref = logits(m(IDS[:1, :1]))
    assert out.shape == ref.shape and torch.isfinite(out).all()
    assert [s.kind for s in opt.bamboo_report.sites] == ["reglu", "reglu"]


def test_predictor_mode_on_a_fused_gate_up_projection():
    """Phi-3's gate and up are the two row halves of one gate_up weight: calibrate trains on the gate half, and
    compile (each call binds the gate view passed in) and export (each site's predictor stored) select alike."""
    m = model("phi3")
    predictors = _calibrate(m)
    half = m.model.layers[0].mlp.gate_up_proj.weight.shape[0] // 2
    assert [p.w_out.shape[0] for p in predictors.values()] == [half, half]
    ids = IDS[:1, :1]
    with torch.no_grad():
        ref = logits(m(ids))
        for p in predictors.values():
            p.threshold = float("-inf")  # every neuron: the model's logits
        assert close(logits(bamboo.compile(m, sparsity="predictor", predictors=predictors)(ids)), ref)
        for p in predictors.values():
            p.threshold, p.top_k = 0.0, 3  # a few neurons: the predictor decides, and both paths agree
        compiled_out = logits(bamboo.compile(m, sparsity="predictor", predictors=predictors)(ids))
        program = bamboo.export(m, (ids,), sparsity="predictor", predictors=predictors)
        exported_out = logits(program.module()(ids, use_cache=False))
    assert not close(compiled_out, ref)
    torch.testing.assert_close(compiled_out, exported_out, rtol=1e-5, atol=1e-5)


def test_stacked_experts_are_named_by_expert_and_refused_by_calibrate():
    sites = bamboo.inspect(model("mixtral"), (IDS,))
    assert [s.name for s in sites[:4]] == [f"model.layers.0.mlp.experts[expert {e}]" for e in range(4)]
    with pytest.raises(InputError, match=r"experts\[expert 0\].*stacked expert weights.*sparsity='exact'"):
        _calibrate(model("mixtral"))


@pytest.mark.slow
def test_inductor_backend_equals_the_model():
    opt = bamboo.compile(model("mistral_drelu"), backend="inductor", sparsity="exact")
    with torch.no_grad():
        assert close(logits(opt(IDS)), reference("mistral_drelu"))
