import pytest
import torch
from torch.library import opcheck

from bamboo.errors import InputError
from bamboo.ops import count_weight_reads
from bamboo.ops.bound_weights import uncached
from bamboo.ops.sparse_ffn import reference_sparse_ffn

OP = torch.ops.bamboo.sparse_ffn.default
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float64: 1e-12}


def ffn_args(kind="drelu", hidden=24, intermediate=72, out=None, bias=False, dtype=torch.float32, lead=(3, 5),
             neuron_major=False, gen=None, up_act=None):
    gen = gen or torch.Generator().manual_seed(0)
    out = out or hidden

    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(dtype)

    x = r(*lead, hidden)
    gw, uw = r(intermediate, hidden, scale=hidden**-0.5), r(intermediate, hidden, scale=hidden**-0.5)
    dw = r(out, intermediate, scale=intermediate**-0.5)
    gb, ub, db = (r(intermediate, scale=0.1), r(intermediate, scale=0.1), r(out, scale=0.1)) if bias else (None,) * 3
    if kind == "relu_mlp":
        uw = ub = None
    up_act = up_act or {"drelu": "relu", "reglu": "silu", "relu_mlp": "identity"}[kind]
    down_w, down_nm = (None, dw.t().contiguous()) if neuron_major else (dw, None)
    return [x, gw, gb, uw, ub, down_w, down_nm, db, None, None, None, kind, "exact", up_act, 0.0, 0]


KIND, MODE = 11, 12  # argument positions in bamboo::sparse_ffn


def fp64_dense(args):
    cast = [a.double() if isinstance(a, torch.Tensor) else a for a in args]
    cast[MODE] = "dense"
    return reference_sparse_ffn(*cast)


def rel_err(a, b):
    return ((a.double() - b).norm() / b.norm()).item()


@pytest.mark.parametrize("kind", ["drelu", "reglu", "relu_mlp"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("lead", [(1,), (4, 1), (2, 7), (33,)])
def test_exact_mode_matches_the_fp64_dense_reference(kind, dtype, bias, lead):
    for seed in range(2):  # fresh inputs each time
        args = ffn_args(kind, bias=bias, dtype=dtype, lead=lead, gen=torch.Generator().manual_seed(seed))
        out = OP(*args)
        assert out.shape == (*lead, 24) and out.dtype == dtype
        assert not out.isnan().any()
        assert rel_err(out, fp64_dense(args)) < TOLERANCE[dtype]


@pytest.mark.parametrize("up_act", ["identity", "relu", "silu", "gelu", "gelu_tanh", "sigmoid", "tanh"])
def test_every_up_activation(up_act):
    args = ffn_args("reglu", up_act=up_act, neuron_major=True, out=10)
    assert rel_err(OP(*args), fp64_dense(args)) < 1e-5


def test_dense_and_exact_agree_and_neuron_major_layout_is_equivalent():
    args = ffn_args("drelu", bias=True)
    nm = list(args)
    nm[5], nm[6] = None, args[5].t().contiguous()
    both = list(args)
    both[6] = nm[6]
    dense = list(args)
    dense[MODE] = "dense"
    ref = OP(*dense)
    for variant in (args, nm, both):
        torch.testing.assert_close(OP(*variant), ref, rtol=1e-5, atol=1e-6)


def test_all_neurons_off_and_all_on():
    args = ffn_args("drelu", bias=True)
    off = list(args)
    off[2] = torch.full_like(args[1][:, 0], -1e4)  # gate bias so negative that no neuron fires
    torch.testing.assert_close(OP(*off), args[7].expand(3, 5, 24) if args[7] is not None else None)
    on = list(args)
    on[2] = on[4] = torch.full_like(args[1][:, 0], 1e4)  # every neuron fires
    assert rel_err(OP(*on), fp64_dense(on)) < 1e-5


def test_weight_traffic_counts_only_active_rows():
    args = ffn_args("drelu", lead=(1,))
    with count_weight_reads() as traffic:
        OP(*args)
    x, gw, _, uw, _, dw = args[:6]
    gate_active = int(((x @ gw.t()) > 0).sum())
    both_active = int((((x @ gw.t()) > 0) & ((x @ uw.t()) > 0)).sum())
    row = gw.shape[1] * 4
    assert traffic.dense_bytes == 3 * gw.numel() * 4
    assert traffic.read_bytes == gw.numel() * 4 + gate_active * row + both_active * dw.shape[0] * 4
    assert 0.4 < traffic.skipped_fraction < 0.8  # random weights: about half the up rows, 3/4 of the down rows


@pytest.mark.parametrize("kind", ["drelu", "relu_mlp"])
def test_predictor_mode_counts_the_predictor_and_the_selected_rows(kind):
    """The bytes the demo and benchmarks report: both predictor matrices, then gate, up and down rows of the
    selected neurons only (a cap of 20 out of 72)."""
    args = ffn_args(kind, lead=(1, 2))
    gw, uw, dw = args[1], args[3], args[5]
    p_in, p_out = torch.randn(8, 24), torch.randn(72, 8)
    args[8:11] = [p_in, p_out, None]
    args[12], args[14], args[15] = "predictor", float("-inf"), 20
    row = gw.shape[1] * 4
    expected = (p_in.numel() + p_out.numel()) * 4 + 20 * row + (20 * row if uw is not None else 0) + 20 * dw.shape[0] * 4
    for run in (OP, reference_sparse_ffn):  # the device kernel (the CPU one here) and the reference count alike
        with count_weight_reads() as traffic:
            run(*args)
        assert traffic.read_bytes == expected, run


@pytest.mark.parametrize("kind", ["drelu", "reglu", "relu_mlp"])
def test_opcheck_schema_fake_and_autograd_registration(kind):
    args = ffn_args(kind, bias=True, dtype=torch.float64, lead=(2, 3))
    args = [a.requires_grad_() if isinstance(a, torch.Tensor) else a for a in args]
    opcheck(OP, tuple(args))


@pytest.mark.parametrize("kind", ["drelu", "reglu", "relu_mlp"])
@pytest.mark.parametrize("neuron_major", [False, True])
def test_backward_is_the_dense_gradient(kind, neuron_major):
    args = ffn_args(kind, bias=True, dtype=torch.float64, lead=(2, 3), neuron_major=neuron_major, hidden=6,
                    intermediate=10)
    args = [a.requires_grad_() if isinstance(a, torch.Tensor) else a for a in args]
    with uncached():  # gradcheck perturbs the weights through .data, which no version counter sees
        assert torch.autograd.gradcheck(lambda *t: OP(*t, *args[8:]), tuple(args[:8]))


def test_bad_arguments_name_the_problem():
    args = ffn_args("drelu")
    wrong_width = list(args)
    wrong_width[0] = torch.randn(2, 23)
    with pytest.raises(InputError, match="expects 24"):
        OP(*wrong_width)
    wrong_dtype = list(args)
    wrong_dtype[0] = args[0].double()
    with pytest.raises(InputError, match="cast the input"):
        OP(*wrong_dtype)
    bad_kind = list(args)
    bad_kind[KIND] = "swiglu"
    with pytest.raises(InputError, match="kind must be one of"):
        OP(*bad_kind)
    no_up = list(args)
    no_up[3] = None
    with pytest.raises(InputError, match="up_weight"):
        OP(*no_up)


def predictor_args(kind="drelu", rows=3, threshold=0.2, top_k=0, gen_seed=5):
    gen = torch.Generator().manual_seed(gen_seed)
    args = ffn_args(kind, lead=(rows,), bias=True, gen=gen)
    hidden, intermediate = args[1].shape[1], args[1].shape[0]
    args[8] = torch.randn(6, hidden, generator=gen) / hidden**0.5
    args[9] = torch.randn(intermediate, 6, generator=gen) / 6**0.5
    args[10] = torch.randn(intermediate, generator=gen) * 0.1
    args[MODE], args[14], args[15] = "predictor", threshold, top_k
    return args


@pytest.mark.parametrize("kind", ["drelu", "reglu", "relu_mlp"])
def test_predictor_mode_computes_the_selected_neurons_only(kind):
    args = predictor_args(kind)
    x, p_in, p_out, p_b = args[0], args[8], args[9], args[10]
    scores = torch.relu(x @ p_in.t()) @ p_out.t() + p_b
    keep = (scores > args[14]).any(0)
    assert 0 < int(keep.sum()) < keep.numel()
    expected_args = list(args)
    expected_args[MODE] = "dense"
    expected_args[5] = args[5] * keep  # the dropped neurons' down columns are zero
    torch.testing.assert_close(OP(*args), OP(*expected_args), rtol=1e-5, atol=1e-6)


def test_predictor_cap_keeps_the_best_scored_and_all_selected_is_dense():
    args = predictor_args(top_k=5, threshold=-1e9)
    x, p_in, p_out, p_b = args[0], args[8], args[9], args[10]
    best = (torch.relu(x @ p_in.t()) @ p_out.t() + p_b).amax(0)
    keep = torch.zeros_like(best).index_fill_(0, best.topk(5).indices, 1.0)
    expected_args = list(args)
    expected_args[MODE] = "dense"
    expected_args[5] = args[5] * keep
    torch.testing.assert_close(OP(*args), OP(*expected_args), rtol=1e-5, atol=1e-6)
    uncapped = list(args)
    uncapped[15] = 0
    dense = list(args)
    dense[MODE] = "dense"
    torch.testing.assert_close(OP(*uncapped), OP(*dense), rtol=1e-5, atol=1e-6)


def test_predictor_mode_errors():
    args = predictor_args()
    missing = list(args)
    missing[8] = None
    with pytest.raises(InputError, match="needs predictor_in"):
        OP(*missing)
    wrong = list(args)
    wrong[9] = torch.randn(5, 6)
    with pytest.raises(InputError, match="another model"):
        OP(*wrong)
    grad = [a.requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]
    with pytest.raises(InputError, match="inference-only"):
        OP(*grad).sum().backward()


def test_predictor_mode_computes_prefill_sized_calls_densely():
    from bamboo.ops.sparse_ffn import PREDICTOR_MAX_ROWS

    args = predictor_args(rows=PREDICTOR_MAX_ROWS + 1, threshold=1e9)  # would select nothing
    dense = list(args)
    dense[MODE] = "dense"
    torch.testing.assert_close(OP(*args), OP(*dense), rtol=0, atol=0)


@pytest.mark.parametrize("position, name", [(1, "gate_weight"), (3, "up_weight"), (5, "down_weight"),
                                            (6, "down_weight_nm")])
@pytest.mark.parametrize("fake", [False, True], ids=["eager", "fake"])
def test_each_weight_of_another_dtype_is_refused_by_name(position, name, fake):
    """Every weight is checked, not only the gate (a half-precision down weight fails later with a bare matmul
    error), and the fake implementation checks too: it is what torch.export and torch.compile run, and without
    the check they would trace a graph that only fails when it runs."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    args = ffn_args("drelu", neuron_major=position == 6)
    args[position] = args[position].half()
    with pytest.raises(InputError, match=f"{name} is torch.float16 but the input is torch.float32"):
        if fake:
            with FakeTensorMode(allow_non_fake_inputs=True):
                OP(*args)
        else:
            OP(*args)


@pytest.mark.parametrize("seed", range(6))
def test_predictor_cap_keeps_what_a_stable_descending_sort_keeps(seed):
    """The cap's rule (top_k best by score, ties by neuron index) on scores full of ties and infinities."""
    from bamboo.ops.sparse_ffn import _top_k_mask

    gen = torch.Generator().manual_seed(seed)
    scores = torch.randint(-3, 4, (200,), generator=gen).float()
    scores[torch.randint(0, 200, (5,), generator=gen)] = float("inf")
    scores[torch.randint(0, 200, (5,), generator=gen)] = -float("inf")
    for k in (1, 7, 50, 199):
        expected = torch.sort(scores, descending=True, stable=True).indices[:k].sort().values
        assert torch.equal(_top_k_mask(scores, k).nonzero().squeeze(1), expected)


def test_the_op_runs_from_another_thread():
    """The neuron-major memo keeps per-thread state: a thread that never entered uncached() must not fail."""
    import threading

    args = ffn_args("drelu")
    expected = OP(*args)
    results = []
    thread = threading.Thread(target=lambda: results.append(OP(*args)))
    thread.start()
    thread.join()
    assert len(results) == 1 and torch.equal(results[0], expected)
