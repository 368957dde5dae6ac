"""The CPU kernel of bamboo::sparse_ffn (bamboo/kernels/cpu_sparse_ffn.py) against the fp64 reference: every kind,
activation and down layout, 1-16 rows, exact and predictor modes, NaN/inf like dense; the sparse-or-dense choice
with a fixed crossover; the one-warning fallback when the kernel cannot build. Small shapes, odd sizes (vector
tails); the kernel is built once per session."""
import math
import sys
import warnings

import pytest
import torch

from bamboo.kernels import cpu_build, cpu_crossover
from bamboo.kernels import cpu_sparse_ffn as cpu
from bamboo.ops import count_weight_reads
from bamboo.ops.bound_weights import BoundPredictor, register_predictor_table, unregister_predictor_table
from bamboo.ops.sparse_ffn import predictor_selection, reference_sparse_ffn

OP = torch.ops.bamboo.sparse_ffn.default
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
ACTS = {"drelu": ["relu"], "reglu": ["identity", "relu", "silu", "gelu", "gelu_tanh", "sigmoid", "tanh"],
        "relu_mlp": ["identity"]}
SHAPES = [(40, 70, 36), (33, 100, 20), (17, 31, 9), (64, 129, 65)]  # hidden, intermediate, out


@pytest.fixture(scope="session")
def kernel():
    if not cpu_build.available():
        pytest.skip("the CPU kernel could not be built here (no g++/ninja)")


@pytest.fixture
def kernel_only(kernel, monkeypatch):
    """Fail if the op falls back to the torch reference: these calls must run the kernel."""
    cpu_crossover.set_crossover(1.0)

    def refuse(*args, **kwargs):
        raise AssertionError("the CPU op ran the torch reference instead of the kernel")

    monkeypatch.setattr(cpu, "reference_sparse_ffn", refuse)
    yield
    cpu_crossover.set_crossover(None)


def make(rows, hidden, intermediate, out, dtype, seed, kind="drelu", bias=False, rank=8):
    gen = torch.Generator().manual_seed(seed)

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(dtype)

    w = dict(x=r(rows, hidden), gw=r(intermediate, hidden, scale=hidden**-0.5),
             uw=None if kind == "relu_mlp" else r(intermediate, hidden, scale=hidden**-0.5),
             dw=r(out, intermediate, scale=intermediate**-0.5),
             gb=r(intermediate, scale=0.1) if bias else None, db=r(out, scale=0.1) if bias else None,
             p_in=r(rank, hidden, scale=hidden**-0.5), p_out=r(intermediate, rank, scale=rank**-0.5))
    w["ub"] = r(intermediate, scale=0.1) if bias and kind != "relu_mlp" else None
    return w


def down_args(w, layout):
    """(down_weight, down_weight_nm) in one of the layouts the op takes."""
    if layout == "linear":
        return w["dw"], None
    if layout == "nm":
        return None, w["dw"].t().contiguous()
    return w["dw"].t().contiguous().t(), None  # nn.Linear's shape with neuron-major strides


def call(w, kind, mode, up_act, layout="linear", threshold=0.0, top_k=0):
    dw, dnm = down_args(w, layout)
    return OP(w["x"], w["gw"], w["gb"], w["uw"], w["ub"], dw, dnm, w["db"], w["p_in"], w["p_out"], None, kind, mode,
              up_act, threshold, top_k)


def fp64(w, kind, up_act, ids=None):
    """The dense FFN in fp64, over only the neurons `ids` when given (what predictor mode computes)."""
    d = {n: (t.double() if t is not None else None) for n, t in w.items()}
    gw, gb, uw, ub, dw = d["gw"], d["gb"], d["uw"], d["ub"], d["dw"]
    if ids is not None:
        gw, dw = gw[ids], dw[:, ids]
        gb = gb[ids] if gb is not None else None
        uw, ub = (uw[ids] if uw is not None else None), (ub[ids] if ub is not None else None)
    return reference_sparse_ffn(d["x"], gw, gb, uw, ub, dw, None, d["db"], kind=kind, mode="dense", up_act=up_act)


def rel(a, b):
    return ((a.double() - b).norm() / b.norm().clamp_min(1e-12)).item()


def assert_close(y, expected, w, kind, up_act, ids=None):
    same_dtype = {n: t for n, t in w.items()}
    dense = reference_sparse_ffn(*(same_dtype[n] for n in ("x", "gw", "gb", "uw", "ub", "dw")), None, same_dtype["db"],
                                 kind=kind, mode="dense", up_act=up_act) if ids is None else None
    bound = TOL[y.dtype] if dense is None else max(TOL[y.dtype], 2 * rel(dense, expected))
    assert rel(y, expected) <= bound


@pytest.mark.parametrize("rows", [1, 2, 3, 5, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["drelu", "reglu", "relu_mlp"])
def test_exact_mode_matches_fp64_every_kind_and_row_count(kernel_only, rows, dtype, kind):
    for i, (hidden, intermediate, out) in enumerate(SHAPES):
        w = make(rows, hidden, intermediate, out, dtype, seed=rows * 10 + i, kind=kind, bias=i % 2 == 1)
        up_act = ACTS[kind][0] if kind != "reglu" else "silu"
        y = call(w, kind, "exact", up_act, layout=("linear", "nm", "strided")[i % 3])
        assert y.shape == (rows, out) and y.dtype == dtype
        assert_close(y, fp64(w, kind, up_act), w, kind, up_act)


@pytest.mark.parametrize("up_act", ACTS["reglu"])
@pytest.mark.parametrize("layout", ["linear", "nm", "strided"])
def test_every_activation_and_down_layout(kernel_only, up_act, layout):
    w = make(3, 40, 70, 36, torch.float32, seed=5, kind="reglu", bias=True)
    assert_close(call(w, "reglu", "exact", up_act, layout), fp64(w, "reglu", up_act), w, "reglu", up_act)


@pytest.mark.parametrize("rows", [1, 4, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["drelu", "reglu", "relu_mlp"])
@pytest.mark.parametrize("threshold, top_k", [(0.0, 0), (-math.inf, 12), (0.1, 5)])
def test_predictor_mode_computes_the_selected_neurons(kernel_only, rows, dtype, kind, threshold, top_k):
    w = make(rows, 33, 100, 20, dtype, seed=rows + top_k, kind=kind, bias=kind == "relu_mlp")
    up_act = ACTS[kind][0]
    y = call(w, kind, "predictor", up_act, layout="nm", threshold=threshold, top_k=top_k)
    ids = predictor_selection(w["x"], w["p_in"], w["p_out"], None, threshold, top_k)  # the op's own rule
    assert 0 < ids.numel() <= (top_k or 100)
    assert_close(y, fp64(w, kind, up_act, ids), w, kind, up_act, ids)


@pytest.mark.parametrize("seed", range(6))
def test_the_c_selection_keeps_the_references_neurons(kernel, seed, monkeypatch):
    """select_neurons against the reference's predictor_selection given the same fp32 scores: coarse values (many
    ties at the cap), NaN and infinities, several rows, thresholds between fp32 values, caps that bind and not."""
    gen = torch.Generator().manual_seed(seed)
    rows, n = [1, 3, 16, 2, 5, 1][seed], [1, 7, 64, 300, 1000, 5632][seed]
    scores = torch.randint(-4, 5, (rows, n), generator=gen).float() / 4  # many ties
    specials = torch.rand(rows, n, generator=gen)
    scores[specials < 0.03] = math.nan
    scores[(specials >= 0.03) & (specials < 0.05)] = math.inf
    scores[(specials >= 0.05) & (specials < 0.07)] = -math.inf
    monkeypatch.setattr(sys.modules["bamboo.ops.sparse_ffn"], "predictor_scores", lambda *args: scores)
    for threshold in (-math.inf, 0.0, 0.25, math.nextafter(0.25, -math.inf), 1e-40, math.inf):
        candidates = int((torch.nan_to_num(scores, nan=math.inf).amax(0) > threshold).sum())
        for top_k in sorted({0, 1, 2, max(1, candidates // 3), candidates, candidates + 5}):
            expected = predictor_selection(None, None, None, None, threshold, top_k)
            got = torch.ops.bamboo_cpu.select_neurons(scores, threshold, top_k)
            assert got.dtype == torch.int64 and torch.equal(got, expected), (threshold, top_k)


def test_the_op_selects_through_the_c_selection(kernel_only, monkeypatch):
    calls = []
    select = torch.ops.bamboo_cpu.select_neurons
    monkeypatch.setattr(torch.ops.bamboo_cpu, "select_neurons", lambda *a: calls.append(a) or select(*a),
                        raising=False)
    w = make(2, 40, 70, 36, torch.float32, seed=4)
    dw, dnm = down_args(w, "linear")
    OP(w["x"], w["gw"], None, w["uw"], None, dw, dnm, None, w["p_in"], w["p_out"], None, "drelu", "predictor", "relu",
       0.0, 5)
    assert len(calls) == 1 and calls[0][1:] == (0.0, 5)


def test_predictor_bound_to_the_gate_weight(kernel_only):
    w = make(2, 40, 70, 36, torch.float32, seed=3)
    table = register_predictor_table(lambda gate: BoundPredictor(w["p_in"], w["p_out"], None, -math.inf, 9))
    try:
        dw, _ = down_args(w, "linear")
        y = OP(w["x"], w["gw"], None, w["uw"], None, dw, None, None, None, None, None, "drelu", "predictor", "relu",
               0.0, 0, table)
    finally:
        unregister_predictor_table(table)
    ids = predictor_selection(w["x"], w["p_in"], w["p_out"], None, -math.inf, 9)
    assert_close(y, fp64(w, "drelu", "relu", ids), w, "drelu", "relu", ids)


@pytest.mark.parametrize("mode", ["exact", "predictor"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nan_and_inf_come_out_as_in_the_dense_ffn(kernel_only, mode, dtype):
    w = make(4, 40, 70, 36, dtype, seed=11)
    w["x"][1, 3] = float("nan")
    w["x"][2, 5] = float("inf")
    w["x"][3, 7] = -float("inf")
    y = call(w, "drelu", mode, "relu", threshold=-math.inf, top_k=20 if mode == "predictor" else 0)
    dense = reference_sparse_ffn(w["x"], w["gw"], None, w["uw"], None, w["dw"], None, None, kind="drelu",
                                 mode="dense", up_act="relu")
    assert torch.equal(y.isnan(), dense.isnan()) and torch.equal(y.isinf(), dense.isinf())
    assert y[1:].isnan().all() and not y[0].isnan().any()


@pytest.mark.parametrize("gate_bias", [-100.0, 100.0])
def test_no_neuron_or_every_neuron_active(kernel_only, gate_bias):
    w = make(3, 40, 70, 36, torch.float32, seed=2, bias=True)
    w["gb"] = torch.full_like(w["gb"], gate_bias)
    y = call(w, "drelu", "exact", "relu")
    assert_close(y, fp64(w, "drelu", "relu"), w, "drelu", "relu")
    if gate_bias < 0:
        assert torch.equal(y, w["db"].expand(3, -1))


def test_exact_mode_reads_fewer_weight_bytes(kernel_only):
    w = make(1, 64, 256, 64, torch.float32, seed=4)
    with count_weight_reads() as traffic:
        call(w, "drelu", "exact", "relu")
    assert traffic.calls == 1 and 0.3 < traffic.skipped_fraction < 0.6  # gate read whole; ~25% of up/down


def test_above_the_crossover_the_dense_ffn_runs_with_the_same_values(kernel):
    w = make(2, 40, 70, 36, torch.bfloat16, seed=8)
    cpu_crossover.set_crossover(1.0)
    try:
        sparse = call(w, "drelu", "exact", "relu")
        cpu_crossover.set_crossover(0.0)  # every share is above it: exact finishes densely from its gate
        with count_weight_reads() as traffic:
            dense_exact = call(w, "drelu", "exact", "relu")
            dense_pred = call(w, "drelu", "predictor", "relu", threshold=-math.inf, top_k=7)
    finally:
        cpu_crossover.set_crossover(None)
    expected = fp64(w, "drelu", "relu")
    assert_close(dense_exact, expected, w, "drelu", "relu")
    assert_close(sparse, expected, w, "drelu", "relu")
    assert_close(dense_pred, expected, w, "drelu", "relu")  # predictor mode fell back to the whole FFN
    assert traffic.skipped_fraction == 0.0


def test_prefill_sized_calls_run_dense(kernel_only, monkeypatch):
    seen = []
    monkeypatch.setattr(cpu, "reference_sparse_ffn", lambda *a, **k: seen.append(a[12]) or reference_sparse_ffn(*a, **k))
    w = make(17, 40, 70, 36, torch.float32, seed=1)
    assert_close(call(w, "drelu", "exact", "relu"), fp64(w, "drelu", "relu"), w, "drelu", "relu")
    assert seen == ["dense"]


def test_a_bias_of_another_dtype_is_left_to_the_reference(kernel, monkeypatch):
    seen = []
    monkeypatch.setattr(cpu, "reference_sparse_ffn", lambda *a, **k: seen.append(a[12]) or reference_sparse_ffn(*a, **k))
    w = make(2, 40, 70, 36, torch.float32, seed=10, bias=True)
    w["db"] = w["db"].double()
    try:
        call(w, "drelu", "exact", "relu")
    except RuntimeError:
        pass  # the reference's own complaint, whatever torch says
    assert seen == ["exact"]


def test_fp16_and_fp64_run_the_reference(kernel):
    for dtype in (torch.float16, torch.float64):
        w = make(2, 40, 70, 36, dtype, seed=9)
        assert rel(call(w, "drelu", "exact", "relu"), fp64(w, "drelu", "relu")) < 2e-3


# -- the crossover: measured once, cached, injectable ----------------------------------------------------------

def test_crossover_interpolates_where_sparse_reaches_dense():
    shares = [0.1, 0.5, 1.0]
    assert cpu_crossover.interpolate(shares, [1.0, 3.0, 5.0], 4.0) == pytest.approx(0.75)
    assert cpu_crossover.interpolate(shares, [1.0, 2.0, 3.0], 4.0) == 1.0
    assert cpu_crossover.interpolate(shares, [5.0, 6.0, 7.0], 4.0) == 0.0


def test_crossover_is_measured_once_per_key_and_cached_on_disk(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv("BAMBOO_CPU_CROSSOVER", raising=False)
    monkeypatch.setattr(cpu_crossover, "_known", {})
    calls = []
    monkeypatch.setattr(cpu_crossover, "measure", lambda dtype, rows, h, i, mode: calls.append((dtype, rows, h)) or
                        {"crossover": 0.6})
    assert cpu_crossover.crossover(torch.bfloat16, 3, ffn_bytes=1 << 30) == 0.6
    assert cpu_crossover.crossover(torch.bfloat16, 4, ffn_bytes=1 << 30) == 0.6  # same row bucket
    assert calls == [(torch.bfloat16, 4, cpu_crossover.SHAPES["memory"][0])]
    monkeypatch.setattr(cpu_crossover, "_known", {})  # a new process reads the file
    assert cpu_crossover.crossover(torch.bfloat16, 4, ffn_bytes=1 << 30) == 0.6 and len(calls) == 1
    monkeypatch.setenv("BAMBOO_CPU_CROSSOVER", "0.25")
    assert cpu_crossover.crossover(torch.float32, 1, ffn_bytes=1) == 0.25


@pytest.mark.parametrize("mode", ["exact", "predictor"])
def test_measure_reports_every_share(kernel, mode):
    result = cpu_crossover.measure(torch.float32, 1, 32, 64, mode=mode, reps=1)
    assert result["shares"] == list(cpu_crossover.SHARES) and len(result["sparse_ms"]) == len(cpu_crossover.SHARES)
    assert result["dense_ms"] > 0 and 0.0 <= result["crossover"] <= 1.0 and result["mode"] == mode


# -- where it cannot build -------------------------------------------------------------------------------------

def test_a_failed_build_warns_once_and_the_reference_runs(tmp_path, monkeypatch):
    broken = tmp_path / "sparse_ffn.cpp"
    broken.write_text("#error no compiler here\n")
    monkeypatch.setattr(cpu_build, "SOURCE", broken)
    monkeypatch.setattr(cpu_build, "_state", {})
    with pytest.warns(RuntimeWarning, match="could not be built"):
        assert cpu_build.available() is False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cpu_build.available() is False
        w = make(2, 40, 70, 36, torch.float32, seed=6)
        assert_close(call(w, "drelu", "exact", "relu"), fp64(w, "drelu", "relu"), w, "drelu", "relu")
