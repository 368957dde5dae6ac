"""Graph copies handed to AOTAutograd keep what tells it the graph came from Dynamo: which inputs are weights.
Without that, CUDA graphs (inductor, mode="reduce-overhead") copy every weight into graph memory per replay."""
import pytest
import torch

import bamboo
from tests.ffn_zoo import ZooFFN


def static_input_indices_seen_by_aot(monkeypatch, compiled, *args):
    import torch._functorch.aot_autograd as aot

    seen, real = [], aot._try_get_metadata_from_dynamo

    def record(mod, *rest):
        sources, static = real(mod, *rest)
        placeholders = [n.name for n in mod.graph.nodes if n.op == "placeholder"]
        seen.append((placeholders, set(static)))
        return sources, static

    monkeypatch.setattr(aot, "_try_get_metadata_from_dynamo", record)
    with torch.no_grad():
        compiled(*args)
    return seen


@pytest.mark.slow
@pytest.mark.parametrize("sparsity", ["dense", "exact"])
def test_weights_and_added_inputs_stay_static_inputs_for_cuda_graphs(monkeypatch, sparsity):
    model = ZooFFN("drelu").eval()
    compiled = bamboo.compile(model, backend="inductor", sparsity=sparsity, dynamic=False)
    [(placeholders, static)] = static_input_indices_seen_by_aot(monkeypatch, compiled, torch.randn(2, 16))
    weights = [i for i, name in enumerate(placeholders) if "parameters" in name or "neuron_major" in name
               or name.startswith("_bamboo")]
    activations = [i for i in range(len(placeholders)) if i not in weights]
    assert len(weights) == 3, placeholders  # gate, up, down: bamboo adds no input (ops/bound_weights.py)
    assert set(weights) <= static, f"weights not static: {[placeholders[i] for i in weights if i not in static]}"
    assert not static & set(activations)
