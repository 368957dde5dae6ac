"""The torch-tensorrt backend. It needs TensorRT, which cannot be installed on this project's machines: the
tests that build engines run wherever torch_tensorrt imports next to a GPU and skip with the reason elsewhere."""
import importlib.util

import pytest
import torch

import bamboo
from bamboo.errors import CompileError, MissingDependencyError
from bamboo.models import BambooConfig, BambooForCausalLM

HAS_TORCH_TENSORRT = importlib.util.find_spec("torch_tensorrt") is not None
needs_tensorrt = pytest.mark.skipif(not (HAS_TORCH_TENSORRT and torch.cuda.is_available()),
                                    reason="torch-tensorrt/TensorRT not installed here (TensorRT wheels are not on "
                                           "PyPI) or no CUDA device")


@pytest.fixture(scope="module")
def model():
    config = BambooConfig.named("tiny", num_hidden_layers=2, vocab_size=512, initializer_range=0.2)
    return BambooForCausalLM.from_config(config, seed=7).eval()


@pytest.mark.skipif(HAS_TORCH_TENSORRT, reason="torch-tensorrt is installed: the missing-dependency error cannot show")
def test_missing_torch_tensorrt_is_a_clear_error(model):
    with pytest.raises(MissingDependencyError, match=r"torch-tensorrt.*bamboo-compiler\[tensorrt\]"):
        bamboo.compile(model, backend="tensorrt")


@pytest.mark.skipif(HAS_TORCH_TENSORRT, reason="torch-tensorrt is installed: the missing-dependency error cannot show")
def test_export_tensorrt_names_the_missing_dependency_before_exporting(model, tmp_path, monkeypatch):
    exported = []
    monkeypatch.setattr(bamboo.api, "export", lambda *a, **k: exported.append(a))
    with pytest.raises(MissingDependencyError, match=r"torch-tensorrt.*bamboo-compiler\[tensorrt\]"):
        bamboo.export_tensorrt(model, (torch.randint(0, 512, (2, 8)),), tmp_path / "m.ep")
    assert not exported  # refused before the export


@pytest.mark.skipif(not HAS_TORCH_TENSORRT or torch.cuda.is_available(), reason="needs torch-tensorrt without a GPU")
def test_no_cuda_device_is_a_clear_error(model):
    with pytest.raises(CompileError, match="needs an NVIDIA GPU"):
        bamboo.compile(model, backend="tensorrt")


@needs_tensorrt
@pytest.mark.parametrize("sparsity", ["exact", "predictor"])
def test_tensorrt_backend_matches_pytorch(model, sparsity, tmp_path):
    from bamboo import export_tensorrt
    from tests.onnx.test_export_onnx import random_predictors

    gpu_model = model.to("cuda", torch.float16)
    predictors = random_predictors(model, threshold=0.2, top_k=120) if sparsity == "predictor" else None
    compiled = bamboo.compile(gpu_model, backend="tensorrt", sparsity=sparsity, predictors=predictors)
    reference = bamboo.compile(gpu_model, sparsity=sparsity, predictors=predictors)
    for shape in [(1, 1), (2, 8)]:
        ids = torch.randint(0, 512, shape, device="cuda")
        with torch.no_grad():
            torch.testing.assert_close(compiled(ids).float(), reference(ids).float(), rtol=2e-2, atol=2e-2)
    assert export_tensorrt(gpu_model, (torch.randint(0, 512, (2, 8), device="cuda"),), tmp_path / "m.ep",
                           sparsity=sparsity, predictors=predictors).exists()
