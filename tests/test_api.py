import logging
import warnings

import pytest
import torch

import bamboo
from bamboo.errors import CompileError, InputError
from bamboo.models import BambooConfig, BambooForCausalLM
from bamboo.ops import count_weight_reads
from tests.ffn_zoo import ZooFFN


@pytest.fixture(scope="module")
def model():
    config = BambooConfig.named("tiny", num_hidden_layers=2, vocab_size=512, initializer_range=0.2)
    return BambooForCausalLM.from_config(config, seed=11).eval()


def rel_err(out, ref):
    return ((out - ref).norm() / ref.norm()).item()


@torch.no_grad()
def test_compile_exact_equals_dense_at_several_shapes_through_one_module(model):
    compiled = bamboo.compile(model, sparsity="exact")
    for batch, seq in [(1, 1), (2, 7), (3, 16), (1, 40)]:
        ids = torch.randint(0, 512, (batch, seq))
        assert rel_err(compiled(ids), model(ids)) < 1e-5
    assert [s.module for s in compiled.bamboo_report.sites][:2] == ["model.layers.0.mlp", "model.layers.1.mlp"]
    assert isinstance(compiled, BambooForCausalLM) and compiled.forward is not model.forward
    assert "forward" not in vars(model)  # the user's model is not changed


@torch.no_grad()
def test_compiled_generate_produces_the_dense_tokens_and_skips_weights(model):
    compiled = bamboo.compile(model)
    ids = torch.randint(0, 512, (2, 6))
    dense = model.generate(ids, max_new_tokens=8, eos_token_id=None)
    with count_weight_reads() as traffic:
        sparse = compiled.generate(ids, max_new_tokens=8, eos_token_id=None)
    assert torch.equal(sparse, dense)
    assert traffic.calls > 0 and traffic.skipped_fraction > 0.2  # decode steps read a fraction of the FFN weights


@torch.no_grad()
def test_dense_sparsity_rewrites_nothing(model):
    compiled = bamboo.compile(model, sparsity="dense")
    ids = torch.randint(0, 512, (2, 5))
    with count_weight_reads() as traffic:
        torch.testing.assert_close(compiled(ids), model(ids), rtol=0, atol=0)
    assert traffic.calls == 0 and compiled.bamboo_report.graphs == []


def test_model_without_sites_compiles_unchanged_with_a_warning():
    swiglu = ZooFFN("swiglu")
    compiled = bamboo.compile(swiglu)
    x = torch.randn(2, 16)
    with pytest.warns(UserWarning, match="(?s)no ReLU-sparse FFN found in ZooFFN.*refused.*no exact zeros"):
        out = compiled(x)
    torch.testing.assert_close(out, swiglu(x), rtol=0, atol=0)


def test_compile_works_for_plain_functions_and_with_grad_enabled():
    module = ZooFFN("drelu", bias=True)
    compiled = bamboo.compile(module)
    x = torch.randn(3, 16, requires_grad=True)
    compiled(x).sum().backward()
    grad_sparse, weight_grad = x.grad.clone(), module.down.weight.grad.clone()
    x.grad = None
    module.zero_grad()
    module(x).sum().backward()
    torch.testing.assert_close(grad_sparse, x.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(weight_grad, module.down.weight.grad, rtol=1e-5, atol=1e-6)

    def fn(x, w1, w2):
        return torch.relu(x @ w1.t()) @ w2.t()

    args = (torch.randn(4, 8), torch.randn(12, 8), torch.randn(8, 12))
    compiled_fn = bamboo.compile(fn)
    torch.testing.assert_close(compiled_fn(*args), fn(*args), rtol=1e-5, atol=1e-5)
    assert compiled_fn.bamboo_report.sites[0].kind == "relu_mlp"


def test_bad_arguments():
    with pytest.raises(InputError, match="sparsity must be one of"):
        bamboo.compile(ZooFFN(), sparsity="sparse")
    with pytest.raises(InputError, match="predictors"):
        bamboo.compile(ZooFFN(), sparsity="predictor")
    with pytest.raises(InputError, match="unknown backend 'tvm'; available"):
        bamboo.compile(ZooFFN(), backend="tvm")
    with pytest.raises(InputError, match="nn.Module or a callable"):
        bamboo.compile(42)
    with pytest.raises(CompileError, match="could not capture"):
        bamboo.inspect(ZooFFN(), (torch.randn(2, 7),))  # wrong width


@pytest.mark.parametrize("backend, kwargs, message", [
    ("eager", {"mode": "reduce-overhead"}, r"\['mode'\] for backend 'eager': it takes no options of its own"),
    ("inductor", {"modes": "max-autotune"}, r"\['modes'\] for backend 'inductor': its options are \['mode', 'options'\]"),
    ("onnxruntime", {"provider": "CPUExecutionProvider"}, r"\['provider'\] for backend 'onnxruntime': its options are "
                                                          r"\['providers', 'session_options', 'path', 'example_inputs', "
                                                          r"'example_kwargs'\]"),
])
def test_unknown_keyword_is_named_before_anything_compiles(backend, kwargs, message):
    with pytest.raises(InputError, match="bamboo.compile got unknown keyword argument\\(s\\) " + message):
        bamboo.compile(ZooFFN(), backend=backend, **kwargs)


def test_inspect_returns_a_printable_site_table(model):
    sites = bamboo.inspect(model, (torch.randint(0, 512, (2, 4)),))
    assert [(s.kind, s.hidden_size, s.intermediate_size, s.dtype) for s in sites] == \
        [("drelu", 128, 448, torch.float32)] * 2
    text = str(sites)
    assert "model.layers.1.mlp" in text and "drelu" in text and "intermediate" in text
    refused = bamboo.inspect(ZooFFN("geglu"), (torch.randn(2, 16),))
    assert len(refused) == 0 and "no exact zeros" in str(refused)


def test_export_rewrites_round_trips_through_pt2_and_keeps_dynamic_dims(model, tmp_path):
    ids = torch.randint(0, 512, (2, 5))
    program = bamboo.export(model, (ids,))
    fused = [n for n in program.graph.nodes if n.target is torch.ops.bamboo.sparse_ffn.default]
    assert len(fused) == 2
    state = program.state_dict
    assert not any("down_proj" in k for k in state)  # the [out, in] copies are gone: each weight stored once
    assert sum("_bamboo_down_nm" in k for k in state) == 2
    path = tmp_path / "model.pt2"
    torch.export.save(program, path)
    loaded = torch.export.load(path)
    with torch.no_grad():
        for batch, seq in [(3, 9), (2, 2), (5, 17)]:
            x = torch.randint(0, 512, (batch, seq))
            assert rel_err(loaded.module()(x), model(x)) < 1e-5


def test_export_dense_and_no_site_warning():
    program = bamboo.export(ZooFFN("drelu"), (torch.randn(2, 16),), sparsity="dense")
    assert not any(n.target is torch.ops.bamboo.sparse_ffn.default for n in program.graph.nodes)
    with pytest.warns(UserWarning, match="exported unchanged"):
        bamboo.export(ZooFFN("leaky_relu"), (torch.randn(2, 16),))


@pytest.mark.slow
@torch.no_grad()
def test_inductor_backend_generate_equals_eager(model):
    compiled = bamboo.compile(model, backend="inductor", sparsity="exact", dynamic=False)
    ids = torch.randint(0, 512, (1, 5))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tokens = compiled.generate(ids, max_new_tokens=4, eos_token_id=None)
    assert torch.equal(tokens, model.generate(ids, max_new_tokens=4, eos_token_id=None))
    assert len(compiled.bamboo_report.sites) >= 2


@pytest.mark.gpu
@torch.no_grad()
def test_compiled_bf16_model_on_cuda_uses_the_kernels_and_matches_dense():
    from bamboo.kernels import max_sparse_rows

    config = BambooConfig.named("tiny", num_hidden_layers=2, vocab_size=512)
    model = BambooForCausalLM.from_config(config, seed=3, dtype=torch.bfloat16, device="cuda").eval()
    compiled = bamboo.compile(model)
    reference = BambooForCausalLM.from_config(config, seed=3, dtype=torch.float64, device="cuda").eval()
    for batch in (1, max_sparse_rows(), 8):
        ids = torch.randint(0, 512, (batch, 1), device="cuda")
        ref = reference(ids)
        dense_err = rel_err(model(ids).double(), ref)
        assert rel_err(compiled(ids).double(), ref) <= max(2 * dense_err, 2e-2)


@torch.no_grad()
def test_generate_compiles_once_per_shape_bucket_and_logs_each_compile(model):
    compiled = bamboo.compile(model, dynamic=False)
    ids = torch.randint(0, 512, (2, 5))
    records = []
    handler = logging.Handler(logging.INFO)
    handler.emit = records.append
    logger = logging.getLogger("bamboo.compile")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        first = compiled.generate(ids, max_new_tokens=6, eos_token_id=None, prompt_bucket=8)
        assert compiled.bamboo_report.compiles == 2  # the prefill and the decode step
        # another prompt length and another output length in the same buckets: nothing new to compile
        longer_prompt = torch.randint(0, 512, (2, 7))
        second = compiled.generate(longer_prompt, max_new_tokens=9, eos_token_id=None, prompt_bucket=8)
        assert compiled.bamboo_report.compiles == 2
        compiled.generate(ids, max_new_tokens=6, eos_token_id=None, prompt_bucket=8, cache_bucket=1)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(logging.NOTSET)
    assert compiled.bamboo_report.compiles == 4  # unbucketed cache length: new prefill and decode graphs
    assert [r.getMessage().split(",")[0] for r in records] == [
        f"bamboo.compile: compiling graph {i} of BambooForCausalLM (exact" for i in range(1, 5)]
    assert torch.equal(first, model.generate(ids, max_new_tokens=6, eos_token_id=None))
    assert torch.equal(second, model.generate(longer_prompt, max_new_tokens=9, eos_token_id=None))
