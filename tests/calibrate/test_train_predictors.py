"""Calibration on small FFNs, fast: what the predictors are trained and thresholded on."""
import pytest
import torch

from bamboo.calibrate import calibrate
from tests.ffn_zoo import ZooFFN


def product(model, x):
    """The FFN's product (what the down projection reads) in the zoo's spelling of each kind."""
    g = torch.relu(model.gate(x))
    if model.kind == "relu_mlp":
        return g
    u = model.up(x)
    return g * (torch.relu(u) if model.kind == "drelu" else u)


@pytest.mark.parametrize("kind", ["drelu", "reglu_identity", "relu_mlp"])
@torch.no_grad()
def test_labels_are_the_nonzeros_of_the_product(kind):
    """A neuron counts as active where the product is nonzero: in a dReLU that needs the up factor's ReLU too
    (about a quarter of the pairs, not the half the gate alone gives). true_density is measured on the
    held-out batch with those labels."""
    torch.manual_seed(2)
    model = ZooFFN(kind, bias=True).eval()
    batches = [torch.randn(64, 16) for _ in range(5)]  # the last one is held out
    (predictor,) = calibrate(model, batches, rank=4, epochs=1, progress=False).values()
    expected = (product(model, batches[-1]) != 0).double().mean().item()
    assert predictor.stats["true_density"] == pytest.approx(expected, abs=1e-9)
    gate_only = (model.gate(batches[-1]) > 0).float().mean().item()
    assert kind != "drelu" or expected < 0.75 * gate_only  # the case tells the two rules apart
