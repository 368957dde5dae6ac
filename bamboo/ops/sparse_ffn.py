"""bamboo::sparse_ffn: the fused ReLU-sparse FFN. Its meaning lives here once; kernels and backend lowerings
register against it.

    kind="drelu"    y = down(relu(gate x) * relu(up x))
    kind="reglu"    y = down(relu(gate x) * act(up x))         act from ops.activations
    kind="relu_mlp" y = down(relu(gate x))                      (OPT's fc2(relu(fc1 x + b)); no up)

Each linear may carry a bias. The down projection is given as `down_weight` ([out, intermediate], nn.Linear's
layout) and/or `down_weight_nm` ([intermediate, out], neuron-major: one contiguous row per neuron, what the
sparse path reads). When both are given they hold the same values; gradients go to `down_weight`.

mode="exact": compute the gate densely, then the up rows and down rows only of neurons whose product can be
nonzero (union over all rows of the batch). Nothing is approximated: a neuron is skipped only when its gate
pre-activation is provably non-positive and finite, `-inf < gate <= 0`, for every row. NaN fails that test,
so NaN propagates as in the dense FFN; an infinite input makes every gate infinite or NaN, so every neuron
is computed and inf/NaN come out exactly as dense (where relu(gate) = 0 meets an infinite up, 0 * inf = NaN).
mode="dense": the plain FFN.
mode="predictor": a low-rank predictor scores each neuron, s = relu(x P_in^T) P_out^T + b; the neurons whose
score exceeds `threshold` for any row are computed (gate, up and down rows), all others are taken as zero; a
NaN score counts as +inf (selected), so a NaN input still yields NaN. `top_k` > 0 caps how many are kept: the
top_k best by score, ties by neuron index. The output shape always equals the dense FFN's: selection happens
inside the op.

Compiled graphs may serve several layers (see ops/bound_weights.py): the op derives the neuron-major down
rows from the weight passed in, and with `predictor_table` > 0 takes the predictor, threshold and cap bound
to the gate weight passed in (the tensor arguments and the scalars are then ignored).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from bamboo.errors import InputError
from bamboo.ops import activations
from bamboo.ops.bound_weights import bound_predictor, neuron_major_rows

KINDS = ("drelu", "reglu", "relu_mlp")
# Predictor mode selects neurons for calls of at most this many rows (decode); larger calls (prefill) are
# computed densely, where the union over rows would select nearly every neuron anyway.
PREDICTOR_MAX_ROWS = 16
MODES = ("exact", "dense", "predictor")


# -- weight-traffic accounting (eager reference only; used by the demo and tests) ----------------------------

@dataclass
class WeightTraffic:
    dense_bytes: int = 0  # FFN weight bytes a dense FFN reads
    read_bytes: int = 0   # FFN weight bytes this op read
    calls: int = 0

    @property
    def skipped_fraction(self) -> float:
        return 1.0 - self.read_bytes / self.dense_bytes if self.dense_bytes else 0.0


_traffic: Optional[WeightTraffic] = None


@contextlib.contextmanager
def count_weight_reads():
    """Count the FFN weight bytes the reference implementation reads inside this block."""
    global _traffic
    previous, _traffic = _traffic, WeightTraffic()
    try:
        yield _traffic
    finally:
        _traffic = previous


def _record(dense: int, read: int) -> None:
    if _traffic is not None:
        _traffic.dense_bytes += dense
        _traffic.read_bytes += read
        _traffic.calls += 1


# -- argument checks ------------------------------------------------------------------------------------------

def out_features(down_weight: Optional[Tensor], down_weight_nm: Optional[Tensor]) -> int:
    return down_weight.shape[0] if down_weight is not None else down_weight_nm.shape[1]


def check_arguments(x, gate_weight, up_weight, down_weight, down_weight_nm, kind, mode, up_act,
                    predictor_in=None, predictor_out=None, predictor_table: int = 0) -> None:
    if kind not in KINDS:
        raise InputError(f"sparse_ffn kind must be one of {KINDS}, got {kind!r}")
    if mode not in MODES:
        raise InputError(f"sparse_ffn mode must be one of {MODES}, got {mode!r}")
    if up_act not in activations.ACTIVATIONS:
        raise InputError(f"sparse_ffn up_act must be one of {sorted(activations.ACTIVATIONS)}, got {up_act!r}")
    if (up_weight is None) != (kind == "relu_mlp"):
        raise InputError("sparse_ffn: up_weight must be given for drelu/reglu and omitted for relu_mlp")
    if down_weight is None and down_weight_nm is None:
        raise InputError("sparse_ffn needs down_weight or down_weight_nm")
    intermediate, hidden = gate_weight.shape
    if x.shape[-1] != hidden:
        raise InputError(f"sparse_ffn: input has {x.shape[-1]} features but the FFN expects {hidden} "
                         f"(input shape {tuple(x.shape)}); pass [..., {hidden}]")
    for name, w in (("gate_weight", gate_weight), ("up_weight", up_weight), ("down_weight", down_weight),
                    ("down_weight_nm", down_weight_nm)):
        if w is not None and w.dtype != x.dtype:
            raise InputError(f"sparse_ffn: {name} is {w.dtype} but the input is {x.dtype}; cast the input "
                             f"(or the model) to one dtype")
    if up_weight is not None and up_weight.shape != gate_weight.shape:
        raise InputError(f"sparse_ffn: up_weight {tuple(up_weight.shape)} != gate_weight {tuple(gate_weight.shape)}")
    if down_weight is not None and down_weight.shape[1] != intermediate:
        raise InputError(f"sparse_ffn: down_weight {tuple(down_weight.shape)} does not take {intermediate} inputs")
    if down_weight_nm is not None and down_weight_nm.shape[0] != intermediate:
        raise InputError(f"sparse_ffn: down_weight_nm {tuple(down_weight_nm.shape)} does not have {intermediate} rows")
    if mode == "predictor" and not predictor_table:
        if predictor_in is None or predictor_out is None:
            raise InputError("sparse_ffn mode='predictor' needs predictor_in and predictor_out (from bamboo.calibrate)")
        if predictor_in.shape[1] != hidden or predictor_out.shape != (intermediate, predictor_in.shape[0]):
            raise InputError(f"sparse_ffn: predictor shapes {tuple(predictor_in.shape)} and "
                             f"{tuple(predictor_out.shape)} do not fit an FFN of hidden {hidden} and intermediate "
                             f"{intermediate}: these predictors belong to another model")


# -- the dense formula (also used by the backward) -------------------------------------------------------------

def _down_rows(down_weight, down_weight_nm, index=None) -> Tensor:
    """Down projection as [neurons, out] rows, optionally only the neurons in `index` (read from the
    neuron-major form bound to the weight passed in, so only those rows are touched)."""
    if index is None:
        return down_weight_nm if down_weight_nm is not None else down_weight.t()
    if down_weight_nm is not None:
        return down_weight_nm.index_select(0, index)
    return neuron_major_rows(down_weight).index_select(0, index)


def exact_active(gate_pre: Tensor) -> Tensor:
    """[rows, intermediate] -> [intermediate] bool: neurons exact mode must compute. Skipped only when
    -inf < gate <= 0 in every row (NaN and -inf are kept: see the module docstring)."""
    skip = (gate_pre <= 0) & (gate_pre > float("-inf"))
    return (~skip).any(0)


def resolve_predictor(gate_weight, predictor_in, predictor_out, predictor_bias, threshold, top_k, predictor_table):
    """The predictor tensors and scalars a call uses: its own arguments, or those bound to its gate weight."""
    if not predictor_table:
        return predictor_in, predictor_out, predictor_bias, threshold, top_k
    bound = bound_predictor(predictor_table, gate_weight)
    return bound.w_in, bound.w_out, bound.bias, bound.threshold, bound.top_k


def _nbytes(t: Optional[Tensor], rows: Optional[int] = None) -> int:
    if t is None:
        return 0
    per_row = t.numel() // t.shape[0] if rows is not None else t.numel()
    return (rows if rows is not None else 1) * per_row * t.element_size()


def predictor_scores(x2, predictor_in, predictor_out, predictor_bias) -> Tensor:
    """Scores [rows, intermediate] in fp32."""
    hidden = torch.relu(x2.to(predictor_in.dtype) @ predictor_in.t())
    scores = (hidden @ predictor_out.t()).float()
    return scores + predictor_bias.float() if predictor_bias is not None else scores


def best_of_rows(scores: Tensor) -> Tensor:
    """[rows, n] scores -> each neuron's largest over the rows in fp32, NaN counted as +inf (a NaN input must
    select, not drop)."""
    return torch.nan_to_num(scores.float().amax(0), nan=float("inf"), posinf=float("inf"), neginf=float("-inf"))


def best_scores(x2, predictor_in, predictor_out, predictor_bias) -> Tensor:
    """Each neuron's largest score over the rows, NaN counted as +inf."""
    return best_of_rows(predictor_scores(x2, predictor_in, predictor_out, predictor_bias))


def predictor_selection(x2, predictor_in, predictor_out, predictor_bias, threshold: float, top_k: int) -> Tensor:
    """Ids of the neurons predictor mode computes (union over rows), ascending; with top_k > 0, the top_k
    best-scored of them, ties by neuron index (a stable sort), so every backend keeps the same set."""
    best = best_scores(x2, predictor_in, predictor_out, predictor_bias)
    chosen = (best > threshold).nonzero().squeeze(1)
    if 0 < top_k < chosen.numel():
        chosen = chosen[_top_k_mask(best.index_select(0, chosen), top_k)]
    return chosen


def _top_k_mask(scores: Tensor, k: int) -> Tensor:
    """The k best of `scores` (NaN-free), ties by position: what a stable descending sort keeps, without the sort
    (a full stable sort of 14336 scores costs about 0.35 ms on a CPU, a top-k 0.02 ms): every score above the k-th
    best, then the first of those equal to it."""
    kth = torch.topk(scores, k, sorted=False).values.min()
    keep = scores > kth
    ties = (scores == kth).nonzero().squeeze(1)[:k - int(keep.sum())]
    return keep.index_fill_(0, ties, True)


def reference_sparse_ffn(x, gate_weight, gate_bias, up_weight, up_bias, down_weight, down_weight_nm, down_bias,
                         predictor_in=None, predictor_out=None, predictor_bias=None, kind="drelu", mode="exact",
                         up_act="relu", threshold: float = 0.0, top_k: int = 0, predictor_table: int = 0) -> Tensor:
    """The op's meaning in plain torch (arguments in the op's order)."""
    check_arguments(x, gate_weight, up_weight, down_weight, down_weight_nm, kind, mode, up_act, predictor_in,
                    predictor_out, predictor_table)
    lead, hidden = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, hidden)
    intermediate = gate_weight.shape[0]
    down_bytes = _nbytes(down_weight if down_weight_nm is None else down_weight_nm)
    dense_bytes = _nbytes(gate_weight) + _nbytes(up_weight) + down_bytes
    gate_pre = F.linear(x2, gate_weight, gate_bias) if mode != "predictor" else None
    gate = torch.relu(gate_pre) if gate_pre is not None else None
    if mode == "dense":
        h = gate if kind == "relu_mlp" else gate * activations.apply(up_act, F.linear(x2, up_weight, up_bias))
        y = h @ _down_rows(down_weight, down_weight_nm)
        _record(dense_bytes, dense_bytes)
    elif mode == "predictor" and x2.shape[0] > PREDICTOR_MAX_ROWS:
        return reference_sparse_ffn(x, gate_weight, gate_bias, up_weight, up_bias, down_weight, down_weight_nm,
                                    down_bias, kind=kind, mode="dense", up_act=up_act)
    elif mode == "predictor":
        predictor_in, predictor_out, predictor_bias, threshold, top_k = resolve_predictor(
            gate_weight, predictor_in, predictor_out, predictor_bias, threshold, top_k, predictor_table)
        active = predictor_selection(x2, predictor_in, predictor_out, predictor_bias, threshold, top_k)
        gate = torch.relu(F.linear(x2, gate_weight.index_select(0, active),
                                   None if gate_bias is None else gate_bias.index_select(0, active)))
        h = gate
        if kind != "relu_mlp":
            up = F.linear(x2, up_weight.index_select(0, active),
                          None if up_bias is None else up_bias.index_select(0, active))
            h = gate * activations.apply(up_act, up)
        y = h @ _down_rows(down_weight, down_weight_nm, active)
        rows = active.numel()
        predictor_bytes = _nbytes(predictor_in) + _nbytes(predictor_out)
        _record(dense_bytes, predictor_bytes + _nbytes(gate_weight, rows) + _nbytes(up_weight, rows)
                + down_bytes * rows // max(intermediate, 1))
    else:
        # Gate first: neurons whose gate is provably <= 0 for every row contribute exactly nothing.
        active = exact_active(gate_pre).nonzero().squeeze(1)
        h = gate.index_select(1, active)
        up_rows = 0
        if kind != "relu_mlp":
            up_rows = active.numel()
            up = F.linear(x2, up_weight.index_select(0, active),
                          None if up_bias is None else up_bias.index_select(0, active))
            h = h * activations.apply(up_act, up)
            if kind == "drelu":  # relu(up) adds its own exact zeros: skip those down rows as well
                keep = (h != 0).any(0).nonzero().squeeze(1)
                h, active = h.index_select(1, keep), active.index_select(0, keep)
        y = h @ _down_rows(down_weight, down_weight_nm, active)
        _record(dense_bytes, _nbytes(gate_weight) + _nbytes(up_weight, up_rows)
                + down_bytes * active.numel() // max(intermediate, 1))
    if down_bias is not None:
        y = y + down_bias
    return y.reshape(*lead, y.shape[-1])


# -- registration ---------------------------------------------------------------------------------------------

@torch.library.custom_op("bamboo::sparse_ffn", mutates_args=())
def sparse_ffn(x: Tensor, gate_weight: Tensor, gate_bias: Optional[Tensor], up_weight: Optional[Tensor],
               up_bias: Optional[Tensor], down_weight: Optional[Tensor], down_weight_nm: Optional[Tensor],
               down_bias: Optional[Tensor], predictor_in: Optional[Tensor], predictor_out: Optional[Tensor],
               predictor_bias: Optional[Tensor], kind: str, mode: str, up_act: str, threshold: float,
               top_k: int, predictor_table: int = 0) -> Tensor:
    return reference_sparse_ffn(x, gate_weight, gate_bias, up_weight, up_bias, down_weight, down_weight_nm,
                                down_bias, predictor_in, predictor_out, predictor_bias, kind, mode, up_act,
                                threshold, top_k, predictor_table)


@sparse_ffn.register_fake
def _(x, gate_weight, gate_bias, up_weight, up_bias, down_weight, down_weight_nm, down_bias, predictor_in,
      predictor_out, predictor_bias, kind, mode, up_act, threshold, top_k, predictor_table=0):
    check_arguments(x, gate_weight, up_weight, down_weight, down_weight_nm, kind, mode, up_act, predictor_in,
                    predictor_out, predictor_table)
    return x.new_empty(*x.shape[:-1], out_features(down_weight, down_weight_nm))


TENSOR_ARGS = 11  # x ... predictor_bias; then kind, mode, up_act, threshold, top_k, predictor_table


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:8])
    ctx.kind, ctx.mode, ctx.up_act = inputs[TENSOR_ARGS:TENSOR_ARGS + 3]


def _backward(ctx, grad_out):
    """Exact gradients of the dense formula (exact mode computes the same function)."""
    if ctx.mode == "predictor":
        raise InputError("bamboo::sparse_ffn in predictor mode is inference-only: it drops neurons, so it has no "
                         "gradient of the dense FFN. Train with sparsity='exact' or 'dense', or run under "
                         "torch.no_grad()")
    x, gw, gb, uw, ub, dw, dnm, db = ctx.saved_tensors
    kind, up_act = ctx.kind, ctx.up_act
    hidden = x.shape[-1]
    x2 = x.reshape(-1, hidden)
    dy = grad_out.reshape(-1, grad_out.shape[-1])
    a = F.linear(x2, gw, gb)
    g = torch.relu(a)
    if kind == "relu_mlp":
        u = b = None
        h = g
    else:
        b = F.linear(x2, uw, ub)
        u = activations.apply(up_act, b)
        h = g * u
    rows = _down_rows(dw, dnm)  # [I, out]
    dh = dy @ rows.t()
    d_down_rows = h.t() @ dy  # [I, out]
    d_dw = d_down_rows.t() if dw is not None else None
    d_dnm = d_down_rows if (dw is None and dnm is not None) else None
    d_db = dy.sum(0) if db is not None else None
    dg = dh if u is None else dh * u
    da = dg * (a > 0).to(dg.dtype)
    dx = da @ gw
    d_ub = d_uw = None
    if u is not None:
        db_ = dh * g * activations.derivative(up_act, b)
        dx = dx + db_ @ uw
        d_uw = db_.t() @ x2
        d_ub = db_.sum(0) if ub is not None else None
    d_gw = da.t() @ x2
    d_gb = da.sum(0) if gb is not None else None
    return (dx.reshape(x.shape), d_gw, d_gb, d_uw, d_ub, d_dw, d_dnm, d_db) + (None,) * 9


sparse_ffn.register_autograd(_backward, setup_context=_setup_context)


def dense_ffn(x, gate_weight, gate_bias=None, up_weight=None, up_bias=None, down_weight=None, down_weight_nm=None,
              down_bias=None, kind="drelu", up_act="relu") -> Tensor:  # noqa: D401
    """The FFN computed densely, in plain torch: the reference the tests compare against."""
    return reference_sparse_ffn(x, gate_weight, gate_bias, up_weight, up_bias, down_weight, down_weight_nm,
                                down_bias, kind=kind, mode="dense", up_act=up_act)
