"""ONNX export and the ONNX Runtime backend, on the CPU EP."""
import math

import pytest
import torch

pytest.importorskip("onnxscript", reason="the onnx extra is not installed")
ort = pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")
import onnx  # noqa: E402

import bamboo  # noqa: E402
from bamboo.calibrate.predictors import LayerPredictor, Predictors, fingerprint  # noqa: E402
from bamboo.errors import CompileError, InputError  # noqa: E402
from bamboo.models import BambooConfig, BambooForCausalLM  # noqa: E402
from bamboo.models.decode_step import BambooDecodeStep, greedy_generate_with_step  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(scope="module")
def model():
    config = BambooConfig.named("tiny", num_hidden_layers=2, vocab_size=512, initializer_range=0.2)
    return BambooForCausalLM.from_config(config, seed=7).eval()


def random_predictors(model, threshold, top_k=0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    layers = []
    for i, layer in enumerate(model.model.layers):
        gate = layer.mlp.gate_proj.weight
        layers.append(LayerPredictor(f"model.layers.{i}.mlp", torch.randn(8, 128, generator=gen) / 128**0.5,
                                     torch.randn(448, 8, generator=gen) / 8**0.5, torch.zeros(448), threshold,
                                     fingerprint(gate), top_k))
    return Predictors(layers)


def op_types(path):
    return {n.op_type for n in onnx.load(str(path)).graph.node}


def run(session, *inputs):
    names = [i.name for i in session.get_inputs()]
    return session.run(None, {n: t.numpy() for n, t in zip(names, inputs)})


@pytest.mark.parametrize("sparsity", ["exact", "predictor", "dense"])
def test_onnx_runtime_equals_pytorch_at_several_lengths_through_one_file(model, tmp_path, sparsity):
    predictors = random_predictors(model, threshold=0.3, top_k=100) if sparsity == "predictor" else None
    path = bamboo.export_onnx(model, (torch.randint(0, 512, (2, 8)),), tmp_path / "m.onnx", sparsity=sparsity,
                              predictors=predictors)
    ops = op_types(path)
    assert {"exact": {"NonZero", "Gather"}, "predictor": {"TopK", "NonZero", "Gather"}, "dense": set()}[sparsity] <= ops
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    reference = bamboo.compile(model, sparsity=sparsity, predictors=predictors)
    for batch, seq in [(2, 8), (1, 1), (3, 5), (1, 20)]:
        ids = torch.randint(0, 512, (batch, seq))
        with torch.no_grad():
            expected = reference(ids)
        (out,) = run(session, ids)
        assert out.shape == tuple(expected.shape)
        torch.testing.assert_close(torch.from_numpy(out), expected, rtol=1e-4, atol=1e-4)


def test_decode_step_with_kv_cache_reproduces_generated_tokens(model, tmp_path, monkeypatch):
    # every output (logits and the new cache) has input-named dims: bound into torch tensors allocated up front
    monkeypatch.setattr("bamboo.backends.onnxruntime._to_torch", lambda *a: pytest.fail("an output needed ORT's allocation"))
    step = BambooDecodeStep(model)
    examples = step.example_inputs(24)
    cache = list(examples[4:])  # empty
    onnx_step = bamboo.compile(step, backend="onnxruntime", sparsity="exact", path=tmp_path / "step.onnx",
                               example_inputs=examples)
    names = [i.name for i in onnx_step.session.get_inputs()]
    assert len(names) == 4 + 4 and len(onnx_step.session.get_outputs()) == 1 + 4
    prompt = torch.randint(0, 512, (2, 6))
    with torch.no_grad():
        expected = model.generate(prompt, max_new_tokens=10, eos_token_id=None)
    assert torch.equal(greedy_generate_with_step(onnx_step, prompt, 10, cache), expected)


def test_predictor_mode_decode_step_reproduces_the_compiled_model_tokens(model, tmp_path):
    # the step wraps the model, so its FFNs sit under "model.model.layers.i.mlp": the predictors still match
    predictors = random_predictors(model, threshold=0.3, top_k=100)
    step = BambooDecodeStep(model)
    examples = step.example_inputs(24)
    cache = list(examples[4:])  # empty
    onnx_step = bamboo.compile(step, backend="onnxruntime", sparsity="predictor", predictors=predictors,
                               path=tmp_path / "step.onnx", example_inputs=examples)
    assert "TopK" in op_types(tmp_path / "step.onnx")
    prompt = torch.randint(0, 512, (2, 6))
    with torch.no_grad():
        expected = bamboo.compile(model, sparsity="predictor", predictors=predictors).generate(
            prompt, max_new_tokens=10, eos_token_id=None)
        dense = model.generate(prompt, max_new_tokens=10, eos_token_id=None)
    assert torch.equal(greedy_generate_with_step(onnx_step, prompt, 10, cache), expected)
    assert not torch.equal(expected, dense)  # the predictor really dropped neurons that mattered


def test_onnxruntime_backend_has_the_model_call_signature(model):
    compiled = bamboo.compile(model, backend="onnxruntime")
    ids = torch.randint(0, 512, (1, 6))  # size-1 batch: the export widens the example so the dim stays dynamic
    with torch.no_grad():
        expected = model(ids)
    torch.testing.assert_close(compiled(ids), expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(compiled(torch.cat([ids, ids])), torch.cat([expected, expected]), rtol=1e-4, atol=1e-4)
    assert compiled.providers == ["CPUExecutionProvider"]


def test_unavailable_provider_and_bad_arguments(model, tmp_path):
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(InputError, match="not available here.*onnxruntime-gpu"):
            bamboo.compile(model, backend="onnxruntime", providers=["CUDAExecutionProvider"])(torch.ones(1, 3, dtype=torch.long))
    with pytest.raises(CompileError, match="opset >= 18"):
        bamboo.export_onnx(model, (torch.ones(2, 3, dtype=torch.long),), tmp_path / "m.onnx", opset=17)
    with pytest.raises(InputError, match="needs predictors"):
        bamboo.export_onnx(model, (torch.ones(2, 3, dtype=torch.long),), tmp_path / "m.onnx", sparsity="predictor")


def test_external_data_file(model, tmp_path):
    path = bamboo.export_onnx(model, (torch.randint(0, 512, (2, 4)),), tmp_path / "m.onnx", external_data=True)
    assert any(p.suffix == ".data" or p.name.endswith(".onnx.data") for p in tmp_path.iterdir())
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ids = torch.randint(0, 512, (2, 5))
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(run(session, ids)[0]), model(ids), rtol=1e-4, atol=1e-4)


def test_predictor_with_every_neuron_is_dense_in_onnx(model, tmp_path):
    path = bamboo.export_onnx(model, (torch.randint(0, 512, (2, 4)),), tmp_path / "m.onnx", sparsity="predictor",
                              predictors=random_predictors(model, threshold=-math.inf))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ids = torch.randint(0, 512, (1, 3))
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(run(session, ids)[0]), model(ids), rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_trained_model_through_onnx_runtime_in_exact_and_predictor_modes(tmp_path):
    from bamboo.calibrate import calibrate
    from bamboo.calibrate.corpus import load_processed, random_batches
    from bamboo.models import pretrained_path

    trained = BambooForCausalLM.from_pretrained(pretrained_path(), dtype=torch.float32).eval()
    batches = random_batches(load_processed()[0], 4, 32, seed=5)
    # a low recall, so the union over a few rows leaves neurons out (the outputs then differ from dense)
    predictors = calibrate(trained, [next(batches) for _ in range(4)], rank=16, target_recall=0.8, epochs=1,
                           progress=False)
    text = next(random_batches(load_processed()[1], 2, 12, seed=6))
    for sparsity, chosen in (("exact", None), ("predictor", predictors)):
        path = bamboo.export_onnx(trained, (text[:, :6],), tmp_path / f"{sparsity}.onnx", sparsity=sparsity,
                                  predictors=chosen)
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        reference = bamboo.compile(trained, sparsity=sparsity, predictors=chosen)
        for ids in (text[:1, :3], text):  # 3 rows: the sparse path; 24 rows: prefill-sized, dense
            with torch.no_grad():
                expected = reference(ids)
            (out,) = run(session, ids)
            torch.testing.assert_close(torch.from_numpy(out), expected, rtol=1e-4, atol=1e-4)
        if sparsity == "predictor":
            with torch.no_grad():
                dense, sparse = trained(text[:1, :3]), reference(text[:1, :3])
            assert not torch.allclose(dense, sparse, atol=1e-3), "the predictor dropped no neuron that mattered"


# -- first contact: what a new user gets wrong, named before the export runs --------------------------------------

def test_unwritable_output_is_refused_before_the_export(model, tmp_path, monkeypatch):
    import bamboo.api

    monkeypatch.setattr(bamboo.api, "export", lambda *a, **k: pytest.fail("exported before checking the path"))
    (tmp_path / "a-file").write_text("")
    with pytest.raises(InputError, match=r"cannot write the ONNX file to .*a-file/m.onnx: its directory .* cannot be "
                                         "created .*choose a writable path"):
        bamboo.export_onnx(model, (torch.ones(2, 3, dtype=torch.long),), tmp_path / "a-file" / "m.onnx")
    with pytest.raises(InputError, match="it is a directory; give a file path"):
        bamboo.export_onnx(model, (torch.ones(2, 3, dtype=torch.long),), tmp_path)


def test_bfloat16_export_warns_that_ort_cpu_cannot_run_it(model, tmp_path, monkeypatch):
    import bamboo.api

    class Stop(Exception):
        pass

    def stop(*args, **kwargs):
        raise Stop

    monkeypatch.setattr(bamboo.api, "export", stop)  # the warning comes first; the export itself is not needed
    bf16 = BambooForCausalLM.from_config(BambooConfig.named("tiny", num_hidden_layers=1, vocab_size=64),
                                         dtype=torch.bfloat16)
    with pytest.warns(UserWarning, match="the model is bfloat16; ONNX Runtime's CPU execution provider has no "
                                         r"bfloat16 kernels .* export model.float\(\)"), pytest.raises(Stop):
        bamboo.export_onnx(bf16, (torch.ones(2, 3, dtype=torch.long),), tmp_path / "m.onnx")


def test_bfloat16_model_through_the_onnxruntime_backend_is_refused_at_compile():
    bf16 = BambooForCausalLM.from_config(BambooConfig.named("tiny", num_hidden_layers=1, vocab_size=64),
                                         dtype=torch.bfloat16)
    with pytest.raises(CompileError, match=r"cannot run a bfloat16 model: .*compile model.float\(\) for the CPU"):
        bamboo.compile(bf16, backend="onnxruntime")


def test_static_shapes_from_size_one_examples_warn(tmp_path, capfd):
    with pytest.warns(UserWarning, match=r"in m1.onnx, input\(s\) input \(1, 4\) have batch or sequence "
                                         "fixed to 1: .*batch and sequence >= 2"):
        bamboo.export_onnx(torch.nn.Linear(4, 4), (torch.randn(1, 4),), tmp_path / "m1.onnx", sparsity="dense")
    assert "torchvision is not installed" not in capfd.readouterr().err  # the exporter's notice is filtered out
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        bamboo.export_onnx(torch.nn.Linear(4, 4), (torch.randn(2, 4),), tmp_path / "m2.onnx", sparsity="dense")


def test_torchvision_notice_is_dropped_while_bamboo_exports_only():
    import logging

    from bamboo.onnx.export import without_torchvision_notice

    logger = logging.getLogger("torch.onnx._internal.exporter._registration")
    seen = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    logger.addHandler(handler)
    try:
        with without_torchvision_notice():
            logger.warning("torchvision is not installed. Skipping %s", "torchvision::nms")
            logger.warning("another warning")
        logger.warning("torchvision is not installed. Skipping %s", "torchvision::nms")  # the user's own exports
    finally:
        logger.removeHandler(handler)
    assert seen == ["another warning", "torchvision is not installed. Skipping torchvision::nms"]
