import pytest
import torch

from bamboo.errors import CompileError
from bamboo.graph.capture import export_program
from bamboo.passes import GraphPass, PassManager, PassResult, default_passes
from tests.ffn_zoo import ZooFFN


def exported():
    return export_program(ZooFFN("drelu"), (torch.randn(2, 16),), dynamic=False).module()


def test_history_records_op_counts_before_and_after_each_pass():
    manager = PassManager(default_passes("exact"))
    result = manager(exported())
    assert result.modified
    rewrite, layout = manager.history
    assert rewrite.name == "RewriteToSparseFFN" and layout.name == "StoreDownProjNeuronMajor"
    assert rewrite.ops_before["aten.linear"] == 3 and rewrite.ops_after["bamboo.sparse_ffn"] == 1
    assert layout.ops_before == layout.ops_after and layout.stats["neuron_major"] == 1


def test_dump_dir_holds_the_graph_before_and_after_each_pass(tmp_path):
    PassManager(default_passes("exact"), dump_dir=tmp_path)(exported())
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["g0_00_RewriteToSparseFFN_after.txt", "g0_00_RewriteToSparseFFN_before.txt",
                     "g0_01_StoreDownProjNeuronMajor_after.txt", "g0_01_StoreDownProjNeuronMajor_before.txt"]
    assert "aten.relu" in (tmp_path / "g0_00_RewriteToSparseFFN_before.txt").read_text()
    assert "bamboo.sparse_ffn" in (tmp_path / "g0_00_RewriteToSparseFFN_after.txt").read_text()


class AddsNodeWithoutMeta(GraphPass):
    def call(self, gm):
        output = next(n for n in gm.graph.nodes if n.op == "output")
        with gm.graph.inserting_before(output):
            gm.graph.call_function(torch.ops.aten.relu.default, (output.args[0][0],))
        return PassResult(gm, True)


def test_checks_catch_a_pass_that_forgets_meta_val():
    with pytest.raises(CompileError, match="without meta"):
        PassManager([AddsNodeWithoutMeta()])(exported())
    PassManager([AddsNodeWithoutMeta()], run_checks_after_each_pass=False)(exported())  # checks off: no error


def test_a_pass_must_return_a_pass_result():
    with pytest.raises(CompileError, match="PassResult"):
        PassManager([lambda gm: gm])(exported())


class AddsValueLessNodeAsCaptured(GraphPass):
    """Stands in for a capture that left value-less nodes (Dynamo's `_log_api_usage_once`, `setitem`)."""

    def call(self, gm):
        output = next(n for n in gm.graph.nodes if n.op == "output")
        with gm.graph.inserting_before(output):
            gm.graph.call_function(torch._C._log_api_usage_once, ("python.nn_module",))
        return PassResult(gm, True)


def test_value_less_nodes_of_the_captured_graph_are_allowed_only_new_ones_fail():
    gm = exported()
    AddsValueLessNodeAsCaptured()(gm)
    gm.recompile()
    result = PassManager(default_passes("exact"))(gm)  # the capture's value-less node is not the passes' fault
    assert result.stats["RewriteToSparseFFN"]["rewritten"] == 1
    with pytest.raises(CompileError, match="without meta"):
        PassManager([AddsNodeWithoutMeta()])(gm)
