"""Triton kernels behind bamboo::sparse_ffn for decode-sized inputs (1-16 rows).

Three launches, no host synchronisation (so a decode step can be captured in a CUDA graph):

1. `gate_compact`   the dense gate GEMV over all neurons, fused with the zero test (a neuron is skipped only
                    when -inf < gate <= 0 for every row: NaN and -inf stay, as in bamboo/ops) and the
                    compaction of active neuron ids through an atomic counter. Exact mode only; predictor mode
                    passes its own id list instead.
2. `gather_up`      one program per block of selected ids (the grid is sized for the worst case; programs past
                    the device-side count exit at once): gathers the gate rows (predictor mode) and up rows and
                    writes h = relu(gate) * act(up) for the selected neurons.
3. `down`           one program per (output column block, neuron chunk): reads the neuron-major down rows of
                    only the neurons whose h is nonzero for some row and accumulates into an fp32 output with
                    atomic adds (Deja Vu's layout). Splitting the down over both axes keeps the whole GPU busy
                    when only a few hundred neurons are selected. The deterministic variant writes per-chunk
                    partial sums instead and compacts ids in a fixed order.

Weights may be any strides ([out, in] or views); rows of a contiguous weight are read coalesced.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# Tests set this to fill the kernels' scratch buffers with garbage first, so an unwritten element shows up.
POISON_SCRATCH = False

ACT_CODES = {"identity": 0, "relu": 1, "silu": 2, "sigmoid": 3, "tanh": 4, "gelu_tanh": 5}
# Block sizes picked by `python benchmarks/ffn_kernel.py --tune` on an H100 (Bamboo-7B shapes, bf16, batch 1).
TUNED_BLOCKS = {
    "exact": dict(block_n=32, block_k=256, down_block_n=32, block_h=256, gate_block=128),
    "predictor": dict(block_n=32, block_k=256, down_block_n=64, block_h=128, gate_block=64),
}
BLOCK_M = 16  # rows are padded to 16 so tl.dot can use the tensor cores; the extra rows are masked


@triton.jit
def _relu(u):
    """relu that keeps NaN (tl.maximum's default returns the non-NaN operand, turning NaN into 0)."""
    return tl.maximum(u, 0.0, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _activation(u, ACT: tl.constexpr):
    if ACT == 1:
        u = _relu(u)
    elif ACT == 2:
        u = u * tl.sigmoid(u)
    elif ACT == 3:
        u = tl.sigmoid(u)
    elif ACT == 4:
        u = 2.0 * tl.sigmoid(2.0 * u) - 1.0
    elif ACT == 5:
        inner = 0.7978845608028654 * (u + 0.044715 * u * u * u)
        u = 0.5 * u * (1.0 + (2.0 * tl.sigmoid(2.0 * inner) - 1.0))
    return u


@triton.jit
def _dot(a, b, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    """a @ b with fp32 accumulation. UPCAST: Triton's CPU interpreter multiplies bf16 wrongly, so there the
    operands go to fp32 first (GPU runs keep the tensor-core path)."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    elif IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _gate_compact_kernel(x_ptr, w_ptr, b_ptr, gate_ptr, idx_ptr, count_ptr, threshold, M, I, H,
                         stride_xm, stride_wn, stride_wk, stride_gm,
                         HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_K: tl.constexpr, COMPACT: tl.constexpr, IEEE: tl.constexpr,
                         UPCAST: tl.constexpr, RELU_INPUT: tl.constexpr, STORE: tl.constexpr,
                         EXACT: tl.constexpr):
    """scores = x @ w.T (+ b) for a block of neurons. EXACT (w is the gate, scores stored for the next
    kernel): a neuron is selected unless -inf < score <= 0 in every row. Otherwise (predictor mode: x is the
    predictor's first layer output, relu applied on load, w its second layer) a neuron is selected when its
    score exceeds `threshold` for some row (NaN counts as +inf)."""
    pid = tl.program_id(0)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < I
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, H, BLOCK_K):
        offs_k = k + tl.arange(0, BLOCK_K)
        k_mask = offs_k < H
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                    mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        if RELU_INPUT:  # keep the operand dtype: tl.dot wants both sides alike
            x = _relu(x).to(x_ptr.dtype.element_ty)
        w = tl.load(w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :] * stride_wk,
                    mask=n_mask[:, None] & k_mask[None, :], other=0.0)
        acc += _dot(x, tl.trans(w), IEEE, UPCAST)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    if STORE:
        tl.store(gate_ptr + offs_m[:, None] * stride_gm + offs_n[None, :], acc,
                 mask=m_mask[:, None] & n_mask[None, :])
    if EXACT:
        keep = ~((acc <= 0.0) & (acc > float("-inf")))
    else:
        keep = (acc > threshold) | ((acc != acc) & (float("inf") > threshold))  # NaN is +inf, as the reference
    active = tl.max(tl.where(m_mask[:, None] & keep, 1, 0), axis=0)
    active = tl.where(n_mask, active, 0)
    if COMPACT:
        base = tl.atomic_add(count_ptr, tl.sum(active, axis=0))
        position = base + tl.cumsum(active, axis=0) - 1
        tl.store(idx_ptr + position, offs_n, mask=active > 0)
    else:  # deterministic: the host-side scan in torch assigns positions
        tl.store(idx_ptr + offs_n, active, mask=n_mask)


@triton.jit
def _gather_up_kernel(x_ptr, gw_ptr, gb_ptr, gate_ptr, uw_ptr, ub_ptr, idx_ptr, count_ptr, h_ptr,
                      cap, M, H, stride_xm, stride_gwn, stride_gwk, stride_gm, stride_uwn, stride_uwk, stride_hm,
                      GATHER_GATE: tl.constexpr, HAS_UP: tl.constexpr, HAS_GATE_BIAS: tl.constexpr,
                      HAS_UP_BIAS: tl.constexpr, UP_ACT: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    """h[:, j] = relu(gate) * act(up) for the j-th selected neuron (0 past the count)."""
    pid = tl.program_id(0)
    count = tl.minimum(tl.load(count_ptr), cap)
    offs_m = tl.arange(0, BLOCK_M)
    m_mask = offs_m < M
    offs_j = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    j_mask = offs_j < count
    h = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if pid * BLOCK_N < count:
        neuron = tl.load(idx_ptr + offs_j, mask=j_mask, other=0).to(tl.int64)
        g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if GATHER_GATE or HAS_UP:
            for k in range(0, H, BLOCK_K):
                offs_k = k + tl.arange(0, BLOCK_K)
                k_mask = offs_k < H
                x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                            mask=m_mask[:, None] & k_mask[None, :], other=0.0)
                row_mask = j_mask[:, None] & k_mask[None, :]
                if GATHER_GATE:
                    wg = tl.load(gw_ptr + neuron[:, None] * stride_gwn + offs_k[None, :] * stride_gwk,
                                 mask=row_mask, other=0.0)
                    g += _dot(x, tl.trans(wg), IEEE, UPCAST)
                if HAS_UP:
                    wu = tl.load(uw_ptr + neuron[:, None] * stride_uwn + offs_k[None, :] * stride_uwk,
                                 mask=row_mask, other=0.0)
                    u += _dot(x, tl.trans(wu), IEEE, UPCAST)
        if GATHER_GATE:
            if HAS_GATE_BIAS:
                g += tl.load(gb_ptr + neuron, mask=j_mask, other=0.0).to(tl.float32)[None, :]
        else:
            g = tl.load(gate_ptr + offs_m[:, None] * stride_gm + neuron[None, :],
                        mask=m_mask[:, None] & j_mask[None, :], other=0.0)
        # Round as the dense FFN does (each linear's output is in the weights' dtype), then multiply.
        h = _relu(g.to(h_ptr.dtype.element_ty).to(tl.float32))
        if HAS_UP:
            if HAS_UP_BIAS:
                u += tl.load(ub_ptr + neuron, mask=j_mask, other=0.0).to(tl.float32)[None, :]
            u = _activation(u.to(h_ptr.dtype.element_ty).to(tl.float32), UP_ACT)
            h = h * u.to(h_ptr.dtype.element_ty).to(tl.float32)
        h = tl.where(m_mask[:, None] & j_mask[None, :], h, 0.0)
    tl.store(h_ptr + offs_m[:, None] * stride_hm + offs_j[None, :], h.to(h_ptr.dtype.element_ty),
             mask=m_mask[:, None] & (offs_j < cap)[None, :])


@triton.jit
def _down_kernel(h_ptr, dw_ptr, idx_ptr, count_ptr, y_ptr, cap, M, H_out, stride_hm, stride_dn, stride_dh,
                 stride_yp, stride_ym, PARTIAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_H: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    """y[:, cols] += h[:, chunk] @ down_rows[ids[chunk], cols]: one program per (column block, neuron chunk),
    so even a few hundred neurons spread over the whole GPU. Rows of neurons whose h is zero in every row
    (relu(up) <= 0) are not read."""
    pid_h = tl.program_id(0)
    pid_n = tl.program_id(1)
    count = tl.minimum(tl.load(count_ptr), cap)
    if pid_n * BLOCK_N < count:
        offs_m = tl.arange(0, BLOCK_M)
        m_mask = offs_m < M
        offs_j = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        j_mask = offs_j < count
        neuron = tl.load(idx_ptr + offs_j, mask=j_mask, other=0).to(tl.int64)
        h = tl.load(h_ptr + offs_m[:, None] * stride_hm + offs_j[None, :], mask=m_mask[:, None] & j_mask[None, :],
                    other=0.0)
        needed = tl.max(tl.where(h != 0.0, 1, 0), axis=0) > 0
        offs_h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
        h_mask = offs_h < H_out
        wd = tl.load(dw_ptr + neuron[:, None] * stride_dn + offs_h[None, :] * stride_dh,
                     mask=needed[:, None] & h_mask[None, :], other=0.0)
        part = _dot(h, wd, IEEE, UPCAST)
        out_mask = m_mask[:, None] & h_mask[None, :]
        if PARTIAL:
            tl.store(y_ptr + pid_n * stride_yp + offs_m[:, None] * stride_ym + offs_h[None, :], part, mask=out_mask)
        else:
            tl.atomic_add(y_ptr + offs_m[:, None] * stride_ym + offs_h[None, :], part, mask=out_mask)


def supports(x: torch.Tensor, up_act: str) -> bool:
    return x.dtype in (torch.float16, torch.bfloat16, torch.float32) and up_act in ACT_CODES


def _compact(x, weight, bias, threshold, store, relu_input, deterministic, gate_block, block_k, num_warps,
             exact=False):
    """Launch the scoring + compaction kernel: (scores or None, ids int32 [n], count int32 [1])."""
    rows = x.shape[0]
    n, k_dim = weight.shape
    device = x.device
    dummy = torch.empty(1, device=device, dtype=x.dtype)
    scores = torch.empty(rows, n, device=device, dtype=torch.float32) if store else dummy
    count = torch.zeros(1, device=device, dtype=torch.int32)
    ids = torch.empty(n, device=device, dtype=torch.int32)
    if POISON_SCRATCH:
        scores.fill_(float("nan"))
        ids.fill_(-(2**30))
    _gate_compact_kernel[(triton.cdiv(n, gate_block),)](
        x, weight, bias if bias is not None else dummy, scores, ids, count, float(threshold), rows, n, k_dim,
        x.stride(0), weight.stride(0), weight.stride(1), scores.stride(0) if store else 0,
        HAS_BIAS=bias is not None, BLOCK_M=BLOCK_M, BLOCK_N=gate_block, BLOCK_K=block_k,
        COMPACT=not deterministic, IEEE=x.dtype == torch.float32, UPCAST=_upcast(x), RELU_INPUT=relu_input,
        STORE=store, EXACT=exact, num_warps=num_warps)
    if deterministic:  # ids holds the selected flags: compact them in neuron order
        active = ids.bool()
        count = active.sum(dtype=torch.int32).reshape(1)
        position = torch.where(active, active.cumsum(0) - 1, n)
        compact = torch.empty(n + 1, device=device, dtype=torch.int32)
        compact.scatter_(0, position, torch.arange(n, device=device, dtype=torch.int32))
        ids = compact[:n]
    return (scores if store else None), ids, count


def _upcast(x):
    return x.dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1"


def select_by_predictor(x, predictor_in, predictor_out, threshold: float, bias=None, gate_block=None, block_k=64,
                        num_warps=4):
    """Neurons whose predictor score relu(x P_in^T) P_out^T (+ bias) exceeds `threshold` for any row:
    (ids, count), both on the device."""
    hidden = (x.to(predictor_in.dtype) @ predictor_in.t()).contiguous()
    _, ids, count = _compact(hidden, predictor_out, bias, threshold, store=False, relu_input=True,
                             deterministic=False, gate_block=gate_block or TUNED_BLOCKS["predictor"]["gate_block"],
                             block_k=block_k, num_warps=num_warps)
    return ids, count


def triton_sparse_ffn(x, gate_weight, gate_bias, up_weight, up_bias, down_rows, down_bias, up_act,
                      neuron_ids=None, neuron_count=None, cap=None, deterministic=False, block_n=None, block_k=None,
                      block_h=None, down_block_n=None, gate_block=None, num_warps=4):
    """y = down(relu(gate x) * act(up x)) over the active (exact) or given (`neuron_ids`) neurons.

    `down_rows` is the down projection as [intermediate, out] (neuron-major or a transposed view). `x` is
    [rows, hidden] with rows <= 16. `neuron_ids` (int32 on the device) switches to predictor mode: only those
    neurons are computed, gate included; `neuron_count` (int32 [1] on the device) says how many of the ids are
    valid (default: all), `cap` bounds that count.
    """
    rows, hidden = x.shape
    if rows > BLOCK_M:
        raise ValueError(f"triton_sparse_ffn handles at most {BLOCK_M} rows, got {rows}")
    defaults = TUNED_BLOCKS["exact" if neuron_ids is None else "predictor"]
    block_n, block_k = block_n or defaults["block_n"], block_k or defaults["block_k"]
    block_h, down_block_n = block_h or defaults["block_h"], down_block_n or defaults["down_block_n"]
    gate_block = gate_block or defaults["gate_block"]
    intermediate = gate_weight.shape[0]
    out_features = down_rows.shape[1]
    device = x.device
    x = x.contiguous()
    dummy = torch.empty(1, device=device, dtype=x.dtype)
    if neuron_ids is None:
        gate, ids, count = _compact(x, gate_weight, gate_bias, 0.0, store=True, relu_input=False,
                                    deterministic=deterministic, gate_block=gate_block, block_k=block_k,
                                    num_warps=num_warps, exact=True)
        capacity, gather_gate = intermediate, False
    else:
        ids = neuron_ids.to(device=device, dtype=torch.int32).contiguous()
        count = neuron_count if neuron_count is not None else torch.full((1,), ids.numel(), device=device,
                                                                          dtype=torch.int32)
        gate, capacity, gather_gate = dummy, ids.numel(), True
    if cap is not None:
        capacity = min(capacity, cap)
    capacity = max(capacity, 1)
    h = torch.empty(rows, capacity, device=device, dtype=x.dtype)
    if POISON_SCRATCH:
        h.fill_(float("nan"))
    has_up = up_weight is not None
    uw = up_weight if has_up else gate_weight
    _gather_up_kernel[(triton.cdiv(capacity, block_n),)](
        x, gate_weight, gate_bias if gate_bias is not None else dummy, gate, uw,
        up_bias if up_bias is not None else dummy, ids, count, h,
        capacity, rows, hidden, x.stride(0), gate_weight.stride(0), gate_weight.stride(1),
        gate.stride(0) if not gather_gate else 0, uw.stride(0), uw.stride(1), h.stride(0),
        GATHER_GATE=gather_gate, HAS_UP=has_up, HAS_GATE_BIAS=gate_bias is not None,
        HAS_UP_BIAS=up_bias is not None, UP_ACT=ACT_CODES[up_act], BLOCK_M=BLOCK_M, BLOCK_N=block_n,
        BLOCK_K=block_k, IEEE=x.dtype == torch.float32, UPCAST=_upcast(x), num_warps=num_warps)
    chunks = triton.cdiv(capacity, down_block_n)
    if deterministic:
        y = torch.zeros(chunks, rows, out_features, device=device, dtype=torch.float32)
        stride_yp, stride_ym = y.stride(0), y.stride(1)
    else:
        y = torch.zeros(rows, out_features, device=device, dtype=torch.float32)
        stride_yp, stride_ym = 0, y.stride(0)
    _down_kernel[(triton.cdiv(out_features, block_h), chunks)](
        h, down_rows, ids, count, y, capacity, rows, out_features, h.stride(0), down_rows.stride(0),
        down_rows.stride(1), stride_yp, stride_ym, PARTIAL=deterministic, BLOCK_M=BLOCK_M, BLOCK_N=down_block_n,
        BLOCK_H=block_h, IEEE=x.dtype == torch.float32, UPCAST=_upcast(x), num_warps=num_warps)
    if deterministic:
        y = y.sum(0)
    if down_bias is not None:
        y = y + down_bias.float()
    return y.to(x.dtype)
