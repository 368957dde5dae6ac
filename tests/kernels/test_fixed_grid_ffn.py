"""The fixed-grid kernels (bamboo/kernels/fixed_grid_ffn.py) against the fp64 dense reference and the op's
reference: exact, predictor by threshold, a given selection; NaN and inf; weights of any layout; the scratch left
zeroed by its consumer; the launch count; BAMBOO_FFN_KERNELS routing. On the CPU through Triton's interpreter (CI),
on a GPU at Bamboo-7B shapes too (marked gpu)."""
import math

import pytest
import torch

triton = pytest.importorskip("triton", reason="Triton is not installed (pip install 'bamboo-compiler[triton]')")

from bamboo import kernels  # noqa: E402
from bamboo.kernels import fixed_grid_ffn as fg  # noqa: E402
from bamboo.ops.sparse_ffn import predictor_selection, reference_sparse_ffn  # noqa: E402
from tests.kernels.ffn_weights import random_ffn  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and not __import__("os").environ.get("TRITON_INTERPRET"):
    pytest.skip("no GPU and TRITON_INTERPRET is not set", allow_module_level=True)

TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


def make(rows, hidden, intermediate, out, dtype, gen, bias=False, kind="drelu", rank=8):
    return random_ffn(gen, rows, hidden, intermediate, out, dtype, DEVICE, bias, kind, rank)


def op_reference(w, kind, up_act, mode, threshold=0.0, top_k=0, dtype=None):
    d = {n: (t.to(dtype).cpu() if t is not None and dtype else t.cpu() if t is not None else None) for n, t in w.items()}
    return reference_sparse_ffn(d["x"], d["gw"], d["gb"], d["uw"], d["ub"], d["dw"], None, d["db"], d["p_in"],
                                d["p_out"], d["p_b"], kind, mode, up_act, threshold, top_k)


def run(w, up_act="relu", **kw):
    return fg.fixed_grid_sparse_ffn(w["x"], w["gw"], w["gb"], w["uw"], w["ub"], w["dw"].t(), w["db"], up_act, **kw)


def rel(a, b):
    return ((a.double().cpu() - b.double()).norm() / b.double().norm().clamp_min(1e-12)).item()


def scratch_is_zero():
    return all(int(acc.count_nonzero()) == 0 and int(t.count_nonzero()) == 0 for acc, t in fg.DownScratch._pool.values())


SHAPES = [(1, 40, 70, 36), (3, 33, 100, 20), (16, 64, 129, 65), (7, 17, 31, 9)] if DEVICE == "cpu" else \
    [(1, 4096, 14336, 4096), (4, 4096, 14336, 4096), (16, 4096, 14336, 4096), (5, 1000, 3001, 777)]


@pytest.mark.parametrize("rows, hidden, intermediate, out", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind, up_act", [("drelu", "relu"), ("reglu", "silu"), ("relu_mlp", "identity")])
def test_exact_matches_the_fp64_dense_reference(rows, hidden, intermediate, out, dtype, kind, up_act):
    gen = torch.Generator().manual_seed(rows * 1000 + hidden)
    w = make(rows, hidden, intermediate, out, dtype, gen, bias=kind != "drelu", kind=kind)
    y = run(w, up_act)
    ref = op_reference(w, kind, up_act, "dense", dtype=torch.float64)
    dense = op_reference(w, kind, up_act, "dense")
    assert y.shape == (rows, out) and y.dtype == dtype and not y.isnan().any()
    assert rel(y, ref) <= max(2 * rel(dense, ref), TOL[dtype]), (rel(y, ref), rel(dense, ref))
    assert scratch_is_zero()


@pytest.mark.parametrize("rows", [1, 3, 16])
@pytest.mark.parametrize("bias", [False, True])
def test_predictor_threshold_equals_the_ops_predictor_mode(rows, bias):
    gen = torch.Generator().manual_seed(40 + rows)
    w = make(rows, 40, 96, 30, torch.float32, gen, bias=bias)
    for threshold in (-math.inf, -0.3, 0.2, 1.0, math.inf):
        expected = op_reference(w, "drelu", "relu", "predictor", threshold)
        y = run(w, predictor_in=w["p_in"], predictor_out=w["p_out"], predictor_bias=w["p_b"], threshold=threshold)
        if expected.abs().max() == 0 and w["db"] is None:
            assert y.abs().max() == 0
        else:
            assert rel(y, expected) < TOL[torch.float32], threshold
    assert scratch_is_zero()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_predictor_threshold_in_half_precision_selects_the_references_neurons(dtype):
    """A threshold in the middle of the widest gap between neurons' best scores: rounding cannot move a neuron
    across it, so the kernel must select exactly the reference's set."""
    gen = torch.Generator().manual_seed(9)
    w = make(4, 64, 160, 48, dtype, gen, bias=True)
    x, p_in, p_out, p_b = (w[n].cpu() for n in ("x", "p_in", "p_out", "p_b"))
    best = torch.relu(x @ p_in.t()).matmul(p_out.t()).float().add(p_b.float()).amax(0).sort().values
    gap = int((best[41:-40] - best[40:-41]).argmax()) + 40
    threshold = float(best[gap] + best[gap + 1]) / 2
    chosen = predictor_selection(x, p_in, p_out, p_b, threshold, 0)
    y = run(w, predictor_in=w["p_in"], predictor_out=w["p_out"], predictor_bias=w["p_b"], threshold=threshold)
    selection = torch.zeros(160, dtype=torch.bool)
    selection[chosen] = True
    given = run(w, selection=selection.to(DEVICE))
    ref = op_reference(w, "drelu", "relu", "predictor", threshold, dtype=torch.float64)
    assert 0 < chosen.numel() < 160
    assert rel(y, ref) < TOL[dtype] and rel(given, ref) < TOL[dtype]


@pytest.mark.parametrize("rows", [1, 5])
def test_a_given_selection_computes_only_those_neurons(rows):
    gen = torch.Generator().manual_seed(rows)
    w = make(rows, 40, 96, 30, torch.float32, gen, bias=True)
    ids = torch.randperm(96, generator=gen)[:37]
    selection = torch.zeros(96, dtype=torch.bool)
    selection[ids] = True
    y = run(w, selection=selection.to(DEVICE))
    sub = dict(w, gw=w["gw"][ids.to(DEVICE)], gb=w["gb"][ids.to(DEVICE)], uw=w["uw"][ids.to(DEVICE)],
               ub=w["ub"][ids.to(DEVICE)], dw=w["dw"][:, ids.to(DEVICE)])
    assert rel(y, op_reference(sub, "drelu", "relu", "dense", dtype=torch.float64)) < TOL[torch.float32]
    none = run(w, selection=torch.zeros(96, dtype=torch.bool, device=DEVICE))
    torch.testing.assert_close(none.cpu(), w["db"].cpu().expand(rows, -1))  # nothing runs: only the down bias


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("mode", ["exact", "predictor"])
def test_nan_and_inf_propagate_like_the_reference(value, mode):
    gen = torch.Generator().manual_seed(5)
    w = make(2, 40, 70, 36, torch.float32, gen)
    w["x"][0, 3] = value
    if mode == "exact":
        y, expected = run(w), op_reference(w, "drelu", "relu", "dense")
    else:
        y = run(w, predictor_in=w["p_in"], predictor_out=w["p_out"], threshold=0.0)
        expected = op_reference(w, "drelu", "relu", "predictor", 0.0)
    assert not torch.isfinite(expected).all()
    assert torch.equal(y.isnan().cpu(), expected.isnan()) and torch.equal(y.isinf().cpu(), expected.isinf())
    finite = torch.isfinite(expected)
    assert rel(y.cpu()[finite], expected[finite]) < TOL[torch.float32]


def test_a_nan_score_selects_unless_the_threshold_is_infinite():
    """The reference counts a NaN score as +inf: over every finite threshold, not over +inf."""
    gen = torch.Generator().manual_seed(8)
    w = make(1, 40, 70, 36, torch.float32, gen)
    w["x"][0, 3] = math.nan
    for threshold in (5.0, math.inf):
        y = run(w, predictor_in=w["p_in"], predictor_out=w["p_out"], threshold=threshold)
        expected = op_reference(w, "drelu", "relu", "predictor", threshold)
        assert torch.equal(y.isnan().cpu(), expected.isnan()), threshold
    assert not expected.isnan().any()  # +inf: nothing runs, the output is finite


def test_a_nan_up_row_of_a_neuron_that_does_not_run_is_never_read():
    gen = torch.Generator().manual_seed(6)
    w = make(1, 40, 70, 36, torch.float32, gen)
    g = (w["x"] @ w["gw"].t()).cpu()[0]
    w["uw"][int(g.argmin())] = math.nan  # gate <= 0: exact mode skips this neuron, as the reference does
    expected = op_reference(w, "drelu", "relu", "exact")
    assert torch.isfinite(expected).all() and rel(run(w), expected) < TOL[torch.float32]


def transposed_view(t):
    return t.t().contiguous().t()


@pytest.mark.parametrize("mode", ["exact", "threshold", "selection"])
def test_weights_of_any_layout(mode):
    gen = torch.Generator().manual_seed(12)
    w = make(3, 48, 80, 40, torch.float32, gen, bias=True)
    expected = {"exact": op_reference(w, "drelu", "relu", "dense"),
                "threshold": op_reference(w, "drelu", "relu", "predictor", 0.1)}.get(mode)
    selection = None
    if mode == "selection":
        selection = torch.rand(80, generator=gen) < 0.3
        expected = run(w, selection=selection.to(DEVICE)).cpu()
    wide = torch.randn(40, 200, generator=gen).to(DEVICE)
    wide[:, 50:130] = w["dw"]
    down_rows = wide[:, 50:130].t()  # a strided slice of a larger weight, [intermediate, out] by a transpose
    kw = dict(predictor_in=transposed_view(w["p_in"]), predictor_out=transposed_view(w["p_out"]),
              predictor_bias=w["p_b"], threshold=0.1) if mode == "threshold" else {}
    y = fg.fixed_grid_sparse_ffn(w["x"], transposed_view(w["gw"]), w["gb"], transposed_view(w["uw"]), w["ub"],
                                 down_rows, w["db"], "relu", selection=None if selection is None else selection.to(DEVICE),
                                 **kw)
    assert rel(y, expected) < TOL[torch.float32]


def test_repeated_calls_agree_and_leave_the_scratch_zeroed():
    gen = torch.Generator().manual_seed(13)
    w = make(4, 64, 129, 65, torch.bfloat16, gen)
    first = run(w, predictor_in=w["p_in"], predictor_out=w["p_out"], threshold=0.0)
    for _ in range(3):
        again = run(w, predictor_in=w["p_in"], predictor_out=w["p_out"], threshold=0.0)
        assert rel(again, first.double().cpu()) < 1e-2 and scratch_is_zero()
    other = make(4, 64, 129, 65, torch.bfloat16, gen)  # another layer: its own scratch, its own weights
    assert rel(run(other), op_reference(other, "drelu", "relu", "dense", dtype=torch.float64)) < TOL[torch.bfloat16]
    assert scratch_is_zero()


class _Counting:
    def __init__(self, kernel, launches):
        self.kernel, self.launches = kernel, launches

    def __getitem__(self, grid):
        self.launches.append(self.kernel.fn.__name__ if hasattr(self.kernel, "fn") else str(self.kernel))
        return self.kernel[grid]


@pytest.mark.parametrize("mode, expected", [("exact", ["_score_gate_up_kernel", "_down_kernel"]),
                                            ("threshold", ["_predictor_in_kernel", "_score_gate_up_kernel",
                                                           "_down_kernel"]),
                                            ("selection", ["_score_gate_up_kernel", "_down_kernel"])])
def test_launches_per_call(mode, expected, monkeypatch):
    launches = []
    for name in ("_predictor_in_kernel", "_score_gate_up_kernel", "_down_kernel"):
        monkeypatch.setattr(fg, name, _Counting(getattr(fg, name), launches))
    gen = torch.Generator().manual_seed(14)
    w = make(2, 40, 70, 36, torch.float32, gen)
    kw = {"exact": {}, "threshold": dict(predictor_in=w["p_in"], predictor_out=w["p_out"], threshold=0.0),
          "selection": dict(selection=torch.ones(70, dtype=torch.bool, device=DEVICE))}[mode]
    run(w, **kw)
    assert launches == expected


@pytest.mark.parametrize("cap", [None, 11])
def test_the_environment_switch_routes_predictor_mode(cap, monkeypatch):
    calls = []
    original = fg.fixed_grid_sparse_ffn
    monkeypatch.setattr(fg, "fixed_grid_sparse_ffn", lambda *a, **kw: calls.append(kw) or original(*a, **kw))
    monkeypatch.setenv("BAMBOO_FFN_KERNELS", "fixed-grid")
    gen = torch.Generator().manual_seed(15)
    w = make(3, 40, 96, 30, torch.float32, gen, bias=True)
    y = kernels.predicted_sparse_ffn(w["x"], w["gw"], w["uw"], w["dw"].t(), w["p_in"], w["p_out"], k=cap,
                                     threshold=0.0, gate_bias=w["gb"], up_bias=w["ub"], down_bias=w["db"],
                                     predictor_bias=w["p_b"])
    expected = op_reference(w, "drelu", "relu", "predictor", 0.0, cap or 0)
    assert len(calls) == 1 and ("selection" in calls[0]) == (cap is not None)
    assert rel(y, expected) < TOL[torch.float32]


def test_an_unknown_kernel_choice_is_refused_with_the_fix(monkeypatch):
    monkeypatch.setenv("BAMBOO_FFN_KERNELS", "fastest")
    with pytest.raises(ValueError, match="BAMBOO_FFN_KERNELS='fastest' is not one of .*unset it"):
        kernels.ffn_kernels()


@pytest.mark.gpu
def test_cuda_graph_replays_reuse_the_scratch():
    if DEVICE != "cuda":
        pytest.skip("needs CUDA")
    gen = torch.Generator().manual_seed(16)
    w = make(1, 4096, 14336, 4096, torch.bfloat16, gen)
    down = w["dw"].t().contiguous()

    def step():
        return fg.fixed_grid_sparse_ffn(w["x"], w["gw"], None, w["uw"], None, down, None, "relu",
                                        predictor_in=w["p_in"], predictor_out=w["p_out"], threshold=0.0)

    expected = step()
    graph, stream = torch.cuda.CUDAGraph(), torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())  # one layer's calls share its scratch: never overlap them
    with torch.cuda.stream(stream):
        step()
        with torch.cuda.graph(graph):
            out = step()
    for _ in range(5):
        graph.replay()
        torch.cuda.synchronize()
        assert rel(out, expected.double().cpu()) < 1e-2 and scratch_is_zero()


def test_a_layer_keeps_one_scratch_whatever_layout_its_down_rows_come_in(monkeypatch):
    """Keyed by the gate weight: a cached neuron-major copy in one call and a transposed view in the next (what a
    CUDA-graph capture passes) must find the scratch the warm-up made, not allocate inside the capture."""
    gen = torch.Generator().manual_seed(17)
    w = make(2, 40, 70, 36, torch.float32, gen)
    monkeypatch.setattr(fg.DownScratch, "_pool", {})  # a freed weight's address may come back with its key
    first = run(w)
    again = fg.fixed_grid_sparse_ffn(w["x"], w["gw"], None, w["uw"], None, w["dw"].t().contiguous(), None, "relu")
    assert len(fg.DownScratch._pool) == 1
    assert rel(again, first.double().cpu()) < TOL[torch.float32] and scratch_is_zero()
