"""AOTInductor packages a bamboo-exported program (the fused op runs inside the package) and the package's
outputs equal the uncompiled model. On CUDA the package would need the Triton kernels as a triton_op: GPU-only,
not run here."""
import pytest
import torch

import bamboo
from bamboo.ops import count_weight_reads
from tests.test_differential import BreakingStack, randomized


@pytest.mark.slow
def test_aot_inductor_package_of_an_exported_program_runs_and_equals_the_model(tmp_path):
    model = randomized(BreakingStack(layers=2, kind="drelu", bias=True), seed=31)
    program = bamboo.export(model, (torch.randn(2, 5, 16),))
    path = torch._inductor.aoti_compile_and_package(program, package_path=str(tmp_path / "m.pt2"))
    runner = torch._inductor.aoti_load_package(path)
    x = torch.randn(3, 4, 16)
    with torch.no_grad(), count_weight_reads() as traffic:
        actual = runner(x)
    assert traffic.calls == 2  # the package calls bamboo::sparse_ffn for both layers
    with torch.no_grad():
        torch.testing.assert_close(actual, model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.slow
def test_aot_inductor_package_on_cuda_calls_the_registered_cuda_kernel(tmp_path):
    """On CUDA the package calls bamboo::sparse_ffn through the dispatcher, which reaches the CUDA kernel that
    bamboo.kernels registers (the Triton kernels for decode-sized calls). Written for a GPU session: not run on
    the CPU machines."""
    model = randomized(BreakingStack(layers=2, kind="drelu"), seed=32).to("cuda", torch.float16)
    program = bamboo.export(model, (torch.randn(2, 5, 16, device="cuda", dtype=torch.float16),))
    runner = torch._inductor.aoti_load_package(
        torch._inductor.aoti_compile_and_package(program, package_path=str(tmp_path / "m.pt2")))
    x = torch.randn(1, 1, 16, device="cuda", dtype=torch.float16)  # decode-sized: the Triton path
    with torch.no_grad():
        torch.testing.assert_close(runner(x).float(), model(x).float(), rtol=2e-2, atol=2e-2)
