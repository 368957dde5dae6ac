import torch
import torch.fx as fx

from bamboo.graph.capture import export_program
from bamboo.graph.inspect_graph import op_counts
from bamboo.passes import PassManager, RewriteToSparseFFN, StoreDownProjNeuronMajor
from bamboo.passes.rewrite_to_sparse_ffn import SPARSE_FFN
from tests.ffn_zoo import TinyMoE, ZooFFN


def run(module, x, keep_original=True):
    gm = export_program(module, (x,), dynamic=False).module()
    result = PassManager([RewriteToSparseFFN("exact"), StoreDownProjNeuronMajor(keep_original=keep_original)])(gm)
    return result


def fused_nodes(gm: fx.GraphModule):
    return [n for n in gm.graph.nodes if n.target is SPARSE_FFN]


def test_down_weight_is_stored_neuron_major_once_at_compile_time():
    module = ZooFFN("drelu", bias=True)
    result = run(module, torch.randn(2, 16), keep_original=False)
    gm = result.graph_module
    (node,) = fused_nodes(gm)
    assert node.args[5] is None and node.args[6].op == "get_attr"
    stored = getattr(gm, node.args[6].target)
    assert stored.is_contiguous() and stored.shape == (48, 16)
    assert torch.equal(stored, module.down.weight.detach().t())
    # nothing transposes per call: the graph has no transpose or contiguous left
    assert not {"aten.t", "aten.transpose", "aten.contiguous", "aten.permute"} & set(op_counts(gm))
    assert result.stats["StoreDownProjNeuronMajor"] == {"neuron_major": 1, "bytes": 48 * 16 * 4, "runtime_weights": []}


def test_weights_already_neuron_major_are_used_as_they_are():
    result = run(ZooFFN("drelu", linear="x@W_in_out"), torch.randn(2, 16))
    (node,) = fused_nodes(result.graph_module)
    assert node.args[5] is None and node.args[6] is not None
    assert result.stats["StoreDownProjNeuronMajor"]["neuron_major"] == 0  # nothing to convert


def test_each_expert_gets_its_own_copy_and_numerics_hold():
    moe = TinyMoE()
    x = torch.randn(2, 3, 16)
    result = run(moe, x)
    assert result.stats["StoreDownProjNeuronMajor"]["neuron_major"] == 3
    with torch.no_grad():
        torch.testing.assert_close(result.graph_module(x), moe(x), rtol=1e-5, atol=1e-6)


def test_runtime_weights_are_left_in_place():
    def ffn(x, gate, up, down):
        return torch.relu(x @ gate.t()) * torch.relu(x @ up.t()) @ down.t()

    gm = fx.symbolic_trace(ffn)
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    args = (torch.randn(3, 8), torch.randn(20, 8), torch.randn(20, 8), torch.randn(8, 20))
    FakeTensorProp(gm).propagate(*args)
    result = PassManager([RewriteToSparseFFN("exact"), StoreDownProjNeuronMajor()])(gm)
    assert result.stats["StoreDownProjNeuronMajor"]["runtime_weights"] == ["down"]
    torch.testing.assert_close(result.graph_module(*args), ffn(*args), rtol=1e-5, atol=1e-5)


class StackedExperts(torch.nn.Module):
    """Experts as one 3-D parameter per projection, indexed per expert (transformers-5 MoE), all applied."""

    def __init__(self, experts=6, hidden=16, intermediate=24):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.gate = torch.nn.Parameter(torch.randn(experts, intermediate, hidden, generator=g))
        self.up = torch.nn.Parameter(torch.randn(experts, intermediate, hidden, generator=g))
        self.down = torch.nn.Parameter(torch.randn(experts, hidden, intermediate, generator=g))

    def forward(self, x):
        out = x
        for e in range(self.gate.shape[0]):
            h = torch.relu(torch.nn.functional.linear(x, self.gate[e])) * torch.relu(torch.nn.functional.linear(x, self.up[e]))
            out = out + torch.nn.functional.linear(h, self.down[e])
        return out


def test_each_expert_of_stacked_weights_gets_its_own_rows():
    """Views of one stacked parameter are fresh tensors whose id() a later view may take: each site must still get
    its own expert's neuron-major rows (an id-keyed cache gave expert 2 expert 0's rows, at random)."""
    from bamboo.graph.node_ops import stacked_index

    module = StackedExperts()
    x = torch.randn(3, 16)
    gm = run(module, x, keep_original=False).graph_module
    nodes = fused_nodes(gm)
    assert [stacked_index(n.args[1]) for n in nodes] == list(range(6))
    for expert, node in enumerate(nodes):
        assert torch.equal(getattr(gm, node.args[6].target), module.down[expert].detach().t())
    torch.testing.assert_close(gm(x), module(x), rtol=1e-4, atol=1e-4)  # unscaled weights: large sums
