import os

import pytest
import torch

if not torch.cuda.is_available():
    # Triton kernels run on CPU tensors through Triton's interpreter; it must be chosen before triton is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The CPU kernel's sparse-or-dense choice is measured on the machine (bamboo/kernels/cpu_crossover.py); tests must
# not depend on timing, so the suite fixes it: always sparse up to 16 rows, which also runs the kernel everywhere.
os.environ.setdefault("BAMBOO_CPU_CROSSOVER", "1.0")

from bamboo.models import BambooForCausalLM  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU with CUDA (none on this machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_model():
    return BambooForCausalLM.from_config("tiny", seed=0).eval()


@pytest.fixture
def rng():
    return torch.Generator().manual_seed(1234)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles from scratch: many instances of one test class would otherwise hit Dynamo's
    recompile limit and silently fall back to eager."""
    torch._dynamo.reset()
    yield
