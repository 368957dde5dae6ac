"""The Triton kernels against the fp64 dense reference: on the CPU through Triton's interpreter (small shapes,
in CI) and on an NVIDIA GPU at Bamboo-7B shapes (marked gpu)."""
import pytest
import torch

triton = pytest.importorskip("triton", reason="Triton is not installed (pip install 'bamboo-compiler[triton]')")

from bamboo.kernels import predicted_sparse_ffn  # noqa: E402
from bamboo.kernels import sparse_ffn_triton as k  # noqa: E402
from bamboo.ops.sparse_ffn import reference_sparse_ffn  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ON_GPU = DEVICE == "cuda"
if not ON_GPU and not __import__("os").environ.get("TRITON_INTERPRET"):
    pytest.skip("no GPU and TRITON_INTERPRET is not set", allow_module_level=True)


@pytest.fixture(autouse=True)
def poisoned_scratch(monkeypatch):
    monkeypatch.setattr(k, "POISON_SCRATCH", True)


def make(rows, hidden, intermediate, out, dtype, gen, bias=False, kind="drelu"):
    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(dtype).to(DEVICE)

    w = dict(x=r(rows, hidden), gw=r(intermediate, hidden, scale=hidden**-0.5),
             uw=r(intermediate, hidden, scale=hidden**-0.5) if kind != "relu_mlp" else None,
             dw=r(out, intermediate, scale=intermediate**-0.5))
    w["gb"] = r(intermediate, scale=0.1) if bias else None
    w["ub"] = r(intermediate, scale=0.1) if bias and kind != "relu_mlp" else None
    w["db"] = r(out, scale=0.1) if bias else None
    return w


def reference(w, kind, up_act, ids=None):
    d = {n: (t.double().cpu() if t is not None else None) for n, t in w.items()}
    gw, gb, uw, ub, dw = d["gw"], d["gb"], d["uw"], d["ub"], d["dw"]
    if ids is not None:
        sel = ids.long().cpu()
        gw, uw, dw = gw[sel], uw[sel] if uw is not None else None, dw[:, sel]
        gb, ub = (gb[sel] if gb is not None else None), (ub[sel] if ub is not None else None)
    return reference_sparse_ffn(d["x"], gw, gb, uw, ub, dw, None, d["db"], kind=kind, mode="dense", up_act=up_act)


def dense_same_dtype(w, kind, up_act):
    return reference_sparse_ffn(w["x"], w["gw"], w["gb"], w["uw"], w["ub"], w["dw"], None, w["db"], kind=kind,
                                mode="dense", up_act=up_act)


def rel(a, b):
    return ((a.double().cpu() - b).norm() / b.norm().clamp_min(1e-12)).item()


TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}

SHAPES = [(1, 40, 70, 36), (3, 33, 100, 20), (16, 64, 129, 65), (7, 17, 31, 9)] if not ON_GPU else \
    [(1, 4096, 14336, 4096), (4, 4096, 14336, 4096), (16, 4096, 14336, 4096), (5, 1000, 3001, 777)]


@pytest.mark.parametrize("rows, hidden, intermediate, out", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16] + ([] if ON_GPU else [torch.float32]))
@pytest.mark.parametrize("kind, up_act", [("drelu", "relu"), ("reglu", "silu"), ("relu_mlp", "identity")])
@pytest.mark.parametrize("deterministic", [False, True])
def test_exact_kernel_matches_fp64_reference(rows, hidden, intermediate, out, dtype, kind, up_act, deterministic):
    gen = torch.Generator().manual_seed(rows * 1000 + hidden)
    w = make(rows, hidden, intermediate, out, dtype, gen, bias=kind == "relu_mlp", kind=kind)
    y = k.triton_sparse_ffn(w["x"], w["gw"], w["gb"], w["uw"], w["ub"], w["dw"].t(), w["db"], up_act,
                            deterministic=deterministic)
    ref = reference(w, kind, up_act)
    assert y.shape == (rows, out) and y.dtype == dtype and not y.isnan().any()
    err, dense_err = rel(y, ref), rel(dense_same_dtype(w, kind, up_act), ref)
    assert err <= max(2 * dense_err, TOL[dtype]), (err, dense_err)


@pytest.mark.parametrize("active", ["none", "all"])
def test_zero_and_all_neurons_active(active):
    gen = torch.Generator().manual_seed(7)
    w = make(4, 32, 80, 24, torch.float16, gen, bias=True)
    w["gb"] = torch.full_like(w["gb"], -100.0 if active == "none" else 100.0)
    w["ub"] = torch.full_like(w["ub"], 100.0)
    y = k.triton_sparse_ffn(w["x"], w["gw"], w["gb"], w["uw"], w["ub"], w["dw"].t().contiguous(), w["db"], "relu")
    ref = reference(w, "drelu", "relu")
    if active == "none":
        torch.testing.assert_close(y.cpu().double(), ref, rtol=0, atol=1e-3)  # only the down bias remains
    else:
        assert rel(y, ref) < TOL[torch.float16]


def test_deterministic_variant_is_bitwise_repeatable():
    gen = torch.Generator().manual_seed(3)
    w = make(8, 48, 200, 40, torch.float16, gen)
    runs = [k.triton_sparse_ffn(w["x"], w["gw"], None, w["uw"], None, w["dw"].t(), None, "relu", deterministic=True)
            for _ in range(3)]
    assert all(torch.equal(runs[0], r) for r in runs[1:])


@pytest.mark.parametrize("rows", [1, 5, 16])
def test_given_neuron_ids_compute_only_those(rows):
    gen = torch.Generator().manual_seed(rows)
    w = make(rows, 40, 96, 30, torch.float16, gen, bias=True)
    ids = torch.randperm(96, generator=gen)[:37].to(torch.int32).to(DEVICE)
    y = k.triton_sparse_ffn(w["x"], w["gw"], w["gb"], w["uw"], w["ub"], w["dw"].t().contiguous(), w["db"], "relu",
                            neuron_ids=ids)
    assert rel(y, reference(w, "drelu", "relu", ids)) < TOL[torch.float16]


def test_predictor_mode_with_k_equal_to_all_neurons_is_the_dense_ffn():
    gen = torch.Generator().manual_seed(11)
    w = make(2, 32, 64, 32, torch.float16, gen)
    p_in = torch.randn(8, 32, generator=gen).to(DEVICE)
    p_out = torch.randn(64, 8, generator=gen).to(DEVICE)
    y = predicted_sparse_ffn(w["x"], w["gw"], w["uw"], w["dw"].t().contiguous(), p_in, p_out, k=64)
    assert rel(y, reference(w, "drelu", "relu")) < TOL[torch.float16]


def test_more_than_16_rows_is_refused():
    gen = torch.Generator().manual_seed(0)
    w = make(17, 16, 32, 16, torch.float16, gen)
    with pytest.raises(ValueError, match="at most 16 rows"):
        k.triton_sparse_ffn(w["x"], w["gw"], None, w["uw"], None, w["dw"].t(), None, "relu")


@pytest.mark.gpu
def test_op_dispatches_to_the_kernel_on_cuda_and_falls_back_for_prefill():
    import bamboo  # noqa: F401

    gen = torch.Generator().manual_seed(5)
    for rows in (1, 16, 64):
        w = make(rows, 512, 1536, 512, torch.bfloat16, gen)
        y = torch.ops.bamboo.sparse_ffn(w["x"], w["gw"], None, w["uw"], None, w["dw"], None, None, None, None, None,
                                        "drelu", "exact", "relu", 0.0, 0)
        ref = reference(w, "drelu", "relu")
        assert rel(y, ref) <= max(2 * rel(dense_same_dtype(w, "drelu", "relu"), ref), TOL[torch.bfloat16])


@pytest.mark.gpu
def test_no_host_sync_and_cuda_graph_capture():
    gen = torch.Generator().manual_seed(6)
    w = make(1, 4096, 14336, 4096, torch.bfloat16, gen)
    down = w["dw"].t().contiguous()

    def step():
        return k.triton_sparse_ffn(w["x"], w["gw"], None, w["uw"], None, down, None, "relu")

    expected = step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        step()
        with torch.cuda.graph(graph):
            out = step()
    graph.replay()
    torch.cuda.synchronize()
    assert rel(out, expected.double().cpu()) < 1e-2


@pytest.mark.parametrize("rows", [1, 4])
def test_threshold_selection_matches_torch_and_respects_the_cap(rows):
    gen = torch.Generator().manual_seed(21 + rows)
    w = make(rows, 40, 96, 30, torch.float16, gen)
    p_in = (torch.randn(8, 40, generator=gen) / 40**0.5).half().to(DEVICE)
    p_out = (torch.randn(96, 8, generator=gen) / 8**0.5).half().to(DEVICE)
    threshold = 0.3
    ids, count = k.select_by_predictor(w["x"], p_in, p_out, threshold)
    hidden = (w["x"] @ p_in.t()).float().relu().cpu()  # what the kernel reads, in fp32
    scores = (hidden @ p_out.float().cpu().t()).amax(0)
    n = int(count.item())
    chosen = set(ids[:n].cpu().tolist())
    assert len(chosen) == n  # no id twice
    margin = 1e-2  # fp16 operands: scores this close to the threshold may fall either way
    assert set((scores > threshold + margin).nonzero().flatten().tolist()) <= chosen
    assert chosen <= set((scores > threshold - margin).nonzero().flatten().tolist())
    y = k.triton_sparse_ffn(w["x"], w["gw"], None, w["uw"], None, w["dw"].t().contiguous(), None, "relu",
                            neuron_ids=ids, neuron_count=count)
    assert rel(y, reference(w, "drelu", "relu", ids[:n].cpu())) < TOL[torch.float16]
    # the cap keeps the first 5 compacted ids (their order depends on the atomics: use the same ids)
    capped = k.triton_sparse_ffn(w["x"], w["gw"], None, w["uw"], None, w["dw"].t().contiguous(), None, "relu",
                                 neuron_ids=ids, neuron_count=count, cap=5)
    assert rel(capped, reference(w, "drelu", "relu", ids[:5].cpu())) < TOL[torch.float16]


@pytest.mark.parametrize("rows", [1, 3])
def test_kernel_predictor_path_equals_the_ops_predictor_mode(rows):
    """What the op's CUDA path runs (threshold selection with a predictor bias) against the op's reference."""
    gen = torch.Generator().manual_seed(40 + rows)
    w = make(rows, 40, 96, 30, torch.float32, gen, bias=True)
    p_in = (torch.randn(8, 40, generator=gen) / 40**0.5).to(DEVICE)
    p_out = (torch.randn(96, 8, generator=gen) / 8**0.5).to(DEVICE)
    p_bias = (torch.randn(96, generator=gen) * 0.1).to(DEVICE)
    y = predicted_sparse_ffn(w["x"], w["gw"], w["uw"], w["dw"].t().contiguous(), p_in, p_out, threshold=0.2,
                             gate_bias=w["gb"], up_bias=w["ub"], down_bias=w["db"], predictor_bias=p_bias)
    expected = reference_sparse_ffn(w["x"], w["gw"], w["gb"], w["uw"], w["ub"], w["dw"], None, w["db"], p_in, p_out,
                                    p_bias, kind="drelu", mode="predictor", up_act="relu", threshold=0.2)
    assert rel(y, expected.double().cpu()) < TOL[torch.float32]


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("mode", ["exact", "predictor"])
def test_nan_and_inf_propagate_like_dense(value, mode):
    """One row with a non-finite input: the exact zero test keeps NaN and -inf gates (`-inf < gate <= 0` is the
    only skip), and a NaN predictor score selects; relu keeps NaN (tl.maximum's default would drop it)."""
    gen = torch.Generator().manual_seed(5)
    w = make(1, 40, 70, 36, torch.float32, gen)
    w["x"][0, 3] = value
    dense = dense_same_dtype(w, "drelu", "relu")
    assert not torch.isfinite(dense).all()
    if mode == "exact":
        y = k.triton_sparse_ffn(w["x"], w["gw"], None, w["uw"], None, w["dw"].t(), None, "relu")
        assert torch.equal(torch.isnan(y), torch.isnan(dense)) and torch.equal(torch.isinf(y), torch.isinf(dense))
    else:
        p_in = torch.randn(8, 40, generator=gen).to(DEVICE)
        p_out = torch.randn(70, 8, generator=gen).to(DEVICE)
        y = predicted_sparse_ffn(w["x"], w["gw"], w["uw"], w["dw"].t(), p_in, p_out, k=16, threshold=0.0)
        assert not torch.isfinite(y).any()  # every output feature of the poisoned row, as dense


def transposed_view(t):
    """The same values as `t`, stored the other way round: a [rows, cols] view with strides (1, rows)."""
    return t.t().contiguous().t()


@pytest.mark.parametrize("predictor_ids", [False, True], ids=["exact", "given_ids"])
@pytest.mark.parametrize("gate_layout, up_layout", [("contiguous", "transposed"), ("transposed", "contiguous")])
@pytest.mark.parametrize("down_layout", ["transposed", "sliced"])
def test_weights_of_different_layouts_in_one_call(predictor_ids, gate_layout, up_layout, down_layout):
    """Gate, up and down each have their own strides: a kernel that reads one weight with another's strides
    reads the wrong elements (all-contiguous weights share strides and would hide it)."""
    gen = torch.Generator().manual_seed(60 + 2 * predictor_ids + (gate_layout == "transposed"))
    w = make(3, 24, 40, 20, torch.float32, gen, bias=True)
    layout = {"contiguous": lambda t: t, "transposed": transposed_view}
    gw, uw = layout[gate_layout](w["gw"]), layout[up_layout](w["uw"])
    assert gw.stride() != uw.stride()
    if down_layout == "transposed":
        down_rows = w["dw"].t()
    else:  # a column slice of a wider neuron-major buffer: row stride 27, not 20
        wide = torch.randn(40, 27, generator=gen).to(DEVICE)
        wide[:, 3:23] = w["dw"].t()
        down_rows = wide[:, 3:23]
    ids = torch.randperm(40, generator=gen)[:17].to(torch.int32).to(DEVICE) if predictor_ids else None
    y = k.triton_sparse_ffn(w["x"], gw, w["gb"], uw, w["ub"], down_rows, w["db"], "relu", neuron_ids=ids)
    assert rel(y, reference(w, "drelu", "relu", ids)) < TOL[torch.float32]


@pytest.mark.parametrize("up_act", sorted(k.ACT_CODES))
def test_every_kernel_activation_matches_the_reference(up_act):
    """Each ACT code of the gather kernel against the op's own activation (reglu: act(up) is not a ReLU, so
    negative up values pass through it)."""
    gen = torch.Generator().manual_seed(70 + k.ACT_CODES[up_act])
    w = make(2, 24, 48, 16, torch.float32, gen, bias=True)
    y = k.triton_sparse_ffn(w["x"], w["gw"], w["gb"], w["uw"], w["ub"], w["dw"].t(), w["db"], up_act)
    assert rel(y, reference(w, "reglu", up_act)) < TOL[torch.float32]


def test_top_k_ranks_neurons_by_their_best_score_over_all_rows():
    """k-only predictor mode keeps the k neurons whose largest score over the rows is highest (the op's rule),
    not those of the first row."""
    gen = torch.Generator().manual_seed(80)
    rows, neurons, top = 4, 64, 10
    w = make(rows, 32, neurons, 24, torch.float32, gen)
    p_in = (torch.randn(8, 32, generator=gen) / 32**0.5).to(DEVICE)
    p_out = (torch.randn(neurons, 8, generator=gen) / 8**0.5).to(DEVICE)
    scores = torch.relu(w["x"].cpu() @ p_in.cpu().t()) @ p_out.cpu().t()
    best = set(scores.amax(0).topk(top).indices.tolist())
    assert best != set(scores[0].topk(top).indices.tolist())  # the rows disagree: row 0 alone would pick others
    y = predicted_sparse_ffn(w["x"], w["gw"], w["uw"], w["dw"].t(), p_in, p_out, k=top)
    expected = reference_sparse_ffn(w["x"], w["gw"], None, w["uw"], None, w["dw"], None, None, p_in, p_out, None,
                                    kind="drelu", mode="predictor", threshold=float("-inf"), top_k=top)
    assert rel(y, expected.double().cpu()) < TOL[torch.float32]
    assert rel(y, reference(w, "drelu", "relu", torch.tensor(sorted(best)))) < TOL[torch.float32]


@pytest.mark.parametrize("rows", [1, 4, 9])
def test_a_binding_cap_keeps_the_references_best_scored_neurons_run_after_run(rows):
    """Threshold and cap, as the op's CUDA path calls it: the neurons kept are the reference's (the k best by
    score, ties by index), not the first ones an atomic compaction wrote; the same on every run."""
    gen = torch.Generator().manual_seed(90 + rows)
    w = make(rows, 40, 120, 30, torch.float32, gen, bias=True)
    p_in = (torch.randn(8, 40, generator=gen) / 40**0.5).to(DEVICE)
    p_out = (torch.randn(120, 8, generator=gen) / 8**0.5).to(DEVICE)
    p_bias = (torch.randn(120, generator=gen) * 0.1).to(DEVICE)
    threshold, cap = -0.2, 9
    from bamboo.ops.sparse_ffn import best_scores

    over = int((best_scores(w["x"], p_in, p_out, p_bias) > threshold).sum())
    assert over > 3 * cap  # the cap binds
    expected = reference_sparse_ffn(w["x"], w["gw"], w["gb"], w["uw"], w["ub"], w["dw"], None, w["db"], p_in, p_out,
                                    p_bias, kind="drelu", mode="predictor", up_act="relu", threshold=threshold,
                                    top_k=cap)
    runs = [predicted_sparse_ffn(w["x"], w["gw"], w["uw"], w["dw"].t().contiguous(), p_in, p_out, k=cap,
                                 threshold=threshold, gate_bias=w["gb"], up_bias=w["ub"], down_bias=w["db"],
                                 predictor_bias=p_bias) for _ in range(3)]
    for y in runs:
        assert rel(y, expected.double().cpu()) < TOL[torch.float32]


def test_a_nan_score_selects_unless_the_threshold_is_infinite():
    """The reference counts a NaN score as +inf: over every finite threshold, not over +inf."""
    gen = torch.Generator().manual_seed(8)
    w = make(1, 40, 70, 36, torch.float32, gen)
    w["x"][0, 3] = float("nan")
    p_in, p_out = torch.randn(8, 40, generator=gen).to(DEVICE), torch.randn(70, 8, generator=gen).to(DEVICE)
    for threshold, selected in ((5.0, 70), (float("inf"), 0)):
        ids, count = k.select_by_predictor(w["x"], p_in, p_out, threshold)
        assert int(count) == selected, threshold
