import torch

from bamboo.graph.capture import export_program
from bamboo.graph.inspect_graph import format_graph, module_path, op_counts
from bamboo.models import BambooConfig, BambooForCausalLM


def tiny():
    return BambooForCausalLM.from_config(BambooConfig.named("tiny", num_hidden_layers=2, vocab_size=256)).eval()


def test_export_graph_module_paths_and_op_counts():
    program = export_program(tiny(), (torch.randint(0, 256, (2, 5)),))
    counts = op_counts(program.graph_module)
    assert counts["aten.linear"] == 2 * 7 + 1  # q k v o gate up down per layer, plus lm_head
    assert counts["aten.relu"] == 4
    paths = {module_path(n) for n in program.graph.nodes if n.op == "call_function"}
    assert "model.layers.1.mlp.down_proj" in paths and "model.layers.0.self_attn.q_proj" in paths
    text = format_graph(program.graph_module)
    assert "aten.relu(" in text and "# model.layers.0.mlp" in text


def test_dynamo_graph_module_paths_are_normalised():
    seen = {}

    def backend(gm, example_inputs):
        seen["paths"] = {module_path(n) for n in gm.graph.nodes}
        seen["counts"] = op_counts(gm)
        return gm.forward

    torch.compile(tiny(), backend=backend)(torch.randint(0, 256, (2, 5)))
    assert "model.layers.1.mlp.down_proj" in seen["paths"]
    assert seen["counts"]["linear"] == 15 and seen["counts"]["relu"] == 4
