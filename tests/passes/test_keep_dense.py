"""bamboo.compile leaves an FFN as the model wrote it where this CPU's measured crossover says the sparse op cannot
beat the model's own dense FFN (the op's dense fallback would still pay its dispatch), and reports it with the
reason; exported programs keep every site. The crossover is injected: tests never depend on timing."""
import pytest
import torch

import bamboo
from bamboo.kernels import cpu_build, cpu_crossover
from bamboo.models import BambooForCausalLM
from bamboo.passes import detect_ffn_sites
from bamboo.passes.keep_dense import dense_is_faster_here

SPARSE_FFN = torch.ops.bamboo.sparse_ffn.default
IDS = torch.randint(3, 200, (1, 6), generator=torch.Generator().manual_seed(2))


@pytest.fixture
def crossover():
    if not cpu_build.available():
        pytest.skip("the CPU kernel did not build here: the op runs its reference and no site is kept dense")
    yield cpu_crossover.set_crossover
    cpu_crossover.set_crossover(None)


def _model():
    return BambooForCausalLM.from_config("tiny", seed=5, num_hidden_layers=2).eval()


@pytest.mark.parametrize("share", [0.0, 0.2])
def test_sites_stay_dense_where_the_crossover_is_low_and_say_why(crossover, share):
    model = _model()
    crossover(share)
    with pytest.warns(UserWarning, match="no ReLU-sparse FFN found"):
        opt = bamboo.compile(model, sparsity="exact")
        with torch.no_grad():
            torch.testing.assert_close(opt(IDS), model(IDS), rtol=0, atol=0)
    report = opt.bamboo_report.sites
    assert list(report) == [] and len(report.rejected) == 2
    assert all("left dense" in r.reason and "BAMBOO_CPU_CROSSOVER=1" in r.reason for r in report.rejected)
    assert {r.module for r in report.rejected} == {"model.layers.0.mlp", "model.layers.1.mlp"}


def test_sites_are_rewritten_where_the_sparse_op_can_win(crossover):
    model = _model()
    crossover(cpu_crossover.REWRITE_MIN_SHARE)
    opt = bamboo.compile(model, sparsity="exact")
    with torch.no_grad():
        torch.testing.assert_close(opt(IDS), model(IDS), rtol=1e-5, atol=1e-5)
    assert [s.kind for s in opt.bamboo_report.sites] == ["drelu", "drelu"] and opt.bamboo_report.sites.rejected == []


def test_keep_dense_where_faster_false_rewrites_every_site(crossover):
    model = _model()
    crossover(0.0)
    opt = bamboo.compile(model, sparsity="exact", keep_dense_where_faster=False)
    with torch.no_grad():
        torch.testing.assert_close(opt(IDS), model(IDS), rtol=1e-5, atol=1e-5)
    assert len(opt.bamboo_report.sites) == 2 and opt.bamboo_report.sites.rejected == []


def test_export_keeps_every_site_whatever_the_cpu_measured(crossover):
    crossover(0.0)
    program = bamboo.export(_model(), (IDS,))
    assert [n.target for n in program.graph.nodes].count(SPARSE_FFN) == 2


def test_the_decision_asks_the_crossover_only_for_cpu_sites_of_kernel_dtypes(crossover, monkeypatch):
    asked = []
    monkeypatch.setattr(cpu_crossover, "crossover", lambda dtype, rows, nbytes, mode: asked.append(
        (dtype, rows, nbytes, mode)) or 0.0)
    program = torch.export.export(_model(), (IDS,))
    site = detect_ffn_sites(program.graph).sites[0]
    reason = dense_is_faster_here(site, "predictor")
    hidden, intermediate = site.hidden_size, site.intermediate_size
    assert asked == [(torch.float32, 1, 3 * hidden * intermediate * 4, "predictor")] and "predictor mode" in reason
    assert cpu_crossover.dense_is_faster(torch.float32, torch.device("cuda"), 1 << 20, "exact") == ""
    assert cpu_crossover.dense_is_faster(torch.float16, torch.device("cpu"), 1 << 20, "exact") == ""
    assert cpu_crossover.dense_is_faster(torch.float32, torch.device("cpu"), 1 << 20, "dense") == ""
    assert len(asked) == 1
