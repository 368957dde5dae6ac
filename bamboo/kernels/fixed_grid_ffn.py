"""The sparse FFN in at most three launches over grids that do not depend on k (issue 18's design), opt-in with
BAMBOO_FFN_KERNELS=fixed-grid until a GPU session has timed it against sparse_ffn_triton's compacting kernels.

1. `predictor_in`  (predictor mode) z = relu(x P_in^T), in the predictor's dtype, as the reference rounds it.
2. `score_gate_up` one program per block of neurons, a fixed grid: the block decides which of its neurons run
                   (exact: the dense gate and the zero test; predictor: scores z P_out^T (+ bias) against the
                   threshold; or a given selection mask, for a capped predictor), then loads only those
                   neurons' gate and up rows and writes h = relu(gate) * act(up) for the whole block (0 where a
                   neuron does not run). No ids, no counter, no compaction.
3. `down`          one program per (neuron block, column tile): reads the down rows of neurons whose h is
                   nonzero in some row and adds h @ rows into a static fp32 accumulator with relaxed atomics;
                   each program then takes a ticket for its column tile, and the last one writes the tile in
                   the model's dtype with the bias and resets the accumulator and the ticket to 0 for the next
                   call (the consumer resets its scratch, so no memset runs, and CUDA-graph replays find it
                   zeroed).

The scratch (accumulator and tickets) belongs to the layer (keyed by its gate weight): allocated zeroed on the
layer's first call, which must come before any CUDA-graph capture, reused after. Calls of one layer must not run
concurrently on two streams. fp32 atomics land in any order on a GPU: results may differ in the last bit between
runs (the compacting kernels' deterministic variant is the bitwise-repeatable one).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from bamboo.kernels.sparse_ffn_triton import ACT_CODES, BLOCK_M, _activation, _dot, _relu, _upcast

BLOCKS = dict(block_r=16, block_n=32, block_k=256, down_block_n=64, block_h=128)  # untuned (no GPU run yet)
MODE_EXACT, MODE_THRESHOLD, MODE_MASK = 0, 1, 2


@triton.jit
def _predictor_in_kernel(x_ptr, w_ptr, z_ptr, M, H, R, stride_xm, stride_wr, stride_wk, stride_zm,
                         BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr,
                         UPCAST: tl.constexpr):
    pid = tl.program_id(0)
    offs_m = tl.arange(0, BLOCK_M)
    offs_r = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    m_mask, r_mask = offs_m < M, offs_r < R
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k in range(0, H, BLOCK_K):
        offs_k = k + tl.arange(0, BLOCK_K)
        k_mask = offs_k < H
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=m_mask[:, None] & k_mask[None, :],
                    other=0.0).to(w_ptr.dtype.element_ty)  # the reference casts x to the predictor's dtype
        w = tl.load(w_ptr + offs_r[:, None] * stride_wr + offs_k[None, :] * stride_wk,
                    mask=r_mask[:, None] & k_mask[None, :], other=0.0, eviction_policy="evict_first")
        acc += _dot(x, tl.trans(w), IEEE, UPCAST)
    z = _relu(acc).to(z_ptr.dtype.element_ty)  # relu commutes with the rounding; the interpreter mishandles bf16 max
    tl.store(z_ptr + offs_m[:, None] * stride_zm + offs_r[None, :], z, mask=m_mask[:, None] & r_mask[None, :])


@triton.jit
def _score_gate_up_kernel(x_ptr, z_ptr, pw_ptr, pb_ptr, sel_ptr, gw_ptr, gb_ptr, uw_ptr, ub_ptr, h_ptr, threshold,
                          M, H, R, I, stride_xm, stride_zm, stride_pwn, stride_pwr, stride_gwn, stride_gwk,
                          stride_uwn, stride_uwk, stride_hm,
                          MODE: tl.constexpr, HAS_PRED_BIAS: tl.constexpr, HAS_UP: tl.constexpr,
                          HAS_GATE_BIAS: tl.constexpr, HAS_UP_BIAS: tl.constexpr, UP_ACT: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                          BLOCK_R: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
                          P_IEEE: tl.constexpr, P_UPCAST: tl.constexpr):
    pid = tl.program_id(0)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask, n_mask = offs_m < M, offs_n < I
    mn_mask = m_mask[:, None] & n_mask[None, :]
    g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if MODE == 0:  # exact: the dense gate of the block; a neuron runs unless -inf < gate <= 0 in every row
        for k in range(0, H, BLOCK_K):
            offs_k = k + tl.arange(0, BLOCK_K)
            k_mask = offs_k < H
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                        mask=m_mask[:, None] & k_mask[None, :], other=0.0)
            w = tl.load(gw_ptr + offs_n[:, None] * stride_gwn + offs_k[None, :] * stride_gwk,
                        mask=n_mask[:, None] & k_mask[None, :], other=0.0, eviction_policy="evict_first")
            g += _dot(x, tl.trans(w), IEEE, UPCAST)
        if HAS_GATE_BIAS:
            g += tl.load(gb_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        g = g.to(h_ptr.dtype.element_ty).to(tl.float32)  # the dense gate's output dtype
        skip = (g <= 0.0) & (g > float("-inf"))
        keep = tl.max(tl.where(m_mask[:, None] & ~skip, 1, 0), axis=0) > 0
    elif MODE == 1:  # predictor: score = z P_out^T (+ bias), rounded as the reference; any row over the threshold
        s = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for r in range(0, R, BLOCK_R):
            offs_r = r + tl.arange(0, BLOCK_R)
            r_mask = offs_r < R
            z = tl.load(z_ptr + offs_m[:, None] * stride_zm + offs_r[None, :], mask=m_mask[:, None] & r_mask[None, :],
                        other=0.0)
            p = tl.load(pw_ptr + offs_n[:, None] * stride_pwn + offs_r[None, :] * stride_pwr,
                        mask=n_mask[:, None] & r_mask[None, :], other=0.0)
            s += _dot(z, tl.trans(p), P_IEEE, P_UPCAST)
        s = s.to(pw_ptr.dtype.element_ty).to(tl.float32)
        if HAS_PRED_BIAS:
            s += tl.load(pb_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        # NaN counts as +inf (selected unless the threshold is +inf), as in the reference's best_scores
        over = (s > threshold) | ((s != s) & (float("inf") > threshold))
        keep = tl.max(tl.where(m_mask[:, None] & over, 1, 0), axis=0) > 0
    else:  # a selection made outside (a capped predictor's top k)
        keep = tl.load(sel_ptr + offs_n, mask=n_mask, other=0) != 0
    keep = keep & n_mask
    h = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if tl.max(keep.to(tl.int32), axis=0) > 0:
        u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if MODE != 0 or HAS_UP:
            for k in range(0, H, BLOCK_K):
                offs_k = k + tl.arange(0, BLOCK_K)
                k_mask = offs_k < H
                x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                            mask=m_mask[:, None] & k_mask[None, :], other=0.0)
                rows = keep[:, None] & k_mask[None, :]  # rows of neurons that do not run are never loaded
                if MODE != 0:
                    wg = tl.load(gw_ptr + offs_n[:, None] * stride_gwn + offs_k[None, :] * stride_gwk, mask=rows,
                                 other=0.0, eviction_policy="evict_first")
                    g += _dot(x, tl.trans(wg), IEEE, UPCAST)
                if HAS_UP:
                    wu = tl.load(uw_ptr + offs_n[:, None] * stride_uwn + offs_k[None, :] * stride_uwk, mask=rows,
                                 other=0.0, eviction_policy="evict_first")
                    u += _dot(x, tl.trans(wu), IEEE, UPCAST)
        if MODE != 0:
            if HAS_GATE_BIAS:
                g += tl.load(gb_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
            g = g.to(h_ptr.dtype.element_ty).to(tl.float32)
        h = _relu(g)
        if HAS_UP:
            if HAS_UP_BIAS:
                u += tl.load(ub_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
            u = _activation(u.to(h_ptr.dtype.element_ty).to(tl.float32), UP_ACT)
            h = h * u.to(h_ptr.dtype.element_ty).to(tl.float32)
        h = tl.where(keep[None, :], h, 0.0)
    tl.store(h_ptr + offs_m[:, None] * stride_hm + offs_n[None, :], h.to(h_ptr.dtype.element_ty), mask=mn_mask)


@triton.jit
def _down_kernel(h_ptr, dw_ptr, db_ptr, acc_ptr, ticket_ptr, y_ptr, M, I, H_out, n_blocks, stride_hm, stride_dn,
                 stride_dh, stride_am, stride_ym, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    pid_h = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_j = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    m_mask, j_mask, h_mask = offs_m < M, offs_j < I, offs_h < H_out
    out_mask = m_mask[:, None] & h_mask[None, :]
    h = tl.load(h_ptr + offs_m[:, None] * stride_hm + offs_j[None, :], mask=m_mask[:, None] & j_mask[None, :],
                other=0.0)
    needed = (tl.max(tl.where(h != 0.0, 1, 0), axis=0) > 0) & j_mask  # NaN != 0: a NaN row is read
    acc_tile = acc_ptr + offs_m[:, None] * stride_am + offs_h[None, :]
    if tl.max(needed.to(tl.int32), axis=0) > 0:
        wd = tl.load(dw_ptr + offs_j[:, None] * stride_dn + offs_h[None, :] * stride_dh,
                     mask=needed[:, None] & h_mask[None, :], other=0.0, eviction_policy="evict_first")
        tl.atomic_add(acc_tile, _dot(h, wd, IEEE, UPCAST), mask=out_mask, sem="relaxed")
    tl.debug_barrier()  # every thread's adds are issued before the ticket (whose acq_rel orders them)
    ticket = tl.atomic_add(ticket_ptr + pid_h, 1, sem="acq_rel")
    # the last program of this column tile: every add has landed (modulo: counts recover after a misuse, such as
    # two calls of one layer overlapping on two streams, instead of never finishing a tile again)
    if ticket % n_blocks == n_blocks - 1:
        total = tl.load(acc_tile, mask=out_mask, other=0.0, cache_modifier=".cg")
        if HAS_BIAS:
            total += tl.load(db_ptr + offs_h, mask=h_mask, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_h[None, :], total.to(y_ptr.dtype.element_ty),
                 mask=out_mask)
        tl.store(acc_tile, tl.zeros((BLOCK_M, BLOCK_H), dtype=tl.float32), mask=h_mask[None, :])
        tl.atomic_add(ticket_ptr + pid_h, -n_blocks)


class DownScratch:
    """Per layer: the fp32 accumulator [16, out] and one ticket per column tile, zero between calls. Keyed by the
    gate weight, which a layer passes unchanged to every call (its down rows may be a cached copy in one call and
    a transposed view in another, e.g. during CUDA-graph capture)."""

    _pool: dict = {}

    @classmethod
    def for_layer(cls, gate_weight: torch.Tensor, out: int, block_h: int):
        key = (gate_weight.device, gate_weight.untyped_storage().data_ptr(), gate_weight.storage_offset(),
               tuple(gate_weight.shape), tuple(gate_weight.stride()), out, block_h)
        scratch = cls._pool.get(key)
        if scratch is None:
            if gate_weight.is_cuda and torch.cuda.is_current_stream_capturing():
                # memory taken inside a capture belongs to the graph's pool, which torch may hand to other graphs
                raise RuntimeError("the fixed-grid sparse FFN kernels allocate their per-layer scratch on a layer's "
                                   "first call: run the model once before capturing a CUDA graph (torch.compile's "
                                   "mode='reduce-overhead' warms up first)")
            scratch = (torch.zeros(BLOCK_M, out, device=gate_weight.device, dtype=torch.float32),
                       torch.zeros(triton.cdiv(out, block_h), device=gate_weight.device, dtype=torch.int32))
            cls._pool[key] = scratch
        return scratch


def fixed_grid_sparse_ffn(x, gate_weight, gate_bias, up_weight, up_bias, down_rows, down_bias, up_act,
                          predictor_in=None, predictor_out=None, predictor_bias=None, threshold=None, selection=None,
                          block_r=None, block_n=None, block_k=None, down_block_n=None, block_h=None, num_warps=4):
    """y = down(relu(gate x) * act(up x)) over the neurons that run: exact mode (no predictor, no selection),
    predictor mode with a threshold (predictor_in/out given), or a given bool `selection` [intermediate]."""
    rows, hidden = x.shape
    if rows > BLOCK_M:
        raise ValueError(f"fixed_grid_sparse_ffn handles at most {BLOCK_M} rows, got {rows}")
    block_r, block_n = block_r or BLOCKS["block_r"], block_n or BLOCKS["block_n"]
    block_k, block_h = block_k or BLOCKS["block_k"], block_h or BLOCKS["block_h"]
    down_block_n = down_block_n or BLOCKS["down_block_n"]
    intermediate, out = gate_weight.shape[0], down_rows.shape[1]
    device, x = x.device, x.contiguous()
    ieee, upcast = x.dtype == torch.float32, _upcast(x)
    dummy = torch.empty(1, device=device, dtype=x.dtype)
    mode, z, pw, rank = MODE_EXACT, dummy, dummy, 0
    if selection is not None:
        mode = MODE_MASK
    elif predictor_in is not None:
        mode, rank = MODE_THRESHOLD, predictor_in.shape[0]
        pw = predictor_out
        z = torch.empty(rows, rank, device=device, dtype=predictor_in.dtype)
        _predictor_in_kernel[(triton.cdiv(rank, block_r),)](
            x, predictor_in, z, rows, hidden, rank, x.stride(0), predictor_in.stride(0), predictor_in.stride(1),
            z.stride(0), BLOCK_M=BLOCK_M, BLOCK_R=block_r, BLOCK_K=block_k,
            IEEE=predictor_in.dtype == torch.float32, UPCAST=_upcast(predictor_in), num_warps=num_warps)
    h = torch.empty(rows, intermediate, device=device, dtype=x.dtype)
    has_up = up_weight is not None
    uw = up_weight if has_up else gate_weight
    sel = selection.to(device=device, dtype=torch.int8).contiguous() if selection is not None else dummy
    _score_gate_up_kernel[(triton.cdiv(intermediate, block_n),)](
        x, z, pw, predictor_bias if predictor_bias is not None else dummy, sel, gate_weight,
        gate_bias if gate_bias is not None else dummy, uw, up_bias if up_bias is not None else dummy, h,
        float(threshold) if threshold is not None else 0.0, rows, hidden, rank, intermediate, x.stride(0),
        z.stride(0) if mode == MODE_THRESHOLD else 0, pw.stride(0) if mode == MODE_THRESHOLD else 0,
        pw.stride(1) if mode == MODE_THRESHOLD else 0, gate_weight.stride(0), gate_weight.stride(1),
        uw.stride(0), uw.stride(1), h.stride(0),
        MODE=mode, HAS_PRED_BIAS=predictor_bias is not None, HAS_UP=has_up, HAS_GATE_BIAS=gate_bias is not None,
        HAS_UP_BIAS=up_bias is not None, UP_ACT=ACT_CODES[up_act], BLOCK_M=BLOCK_M, BLOCK_N=block_n,
        BLOCK_K=block_k, BLOCK_R=block_r, IEEE=ieee, UPCAST=upcast, P_IEEE=pw.dtype == torch.float32,
        P_UPCAST=_upcast(pw), num_warps=num_warps)
    acc, tickets = DownScratch.for_layer(gate_weight, out, block_h)
    y = torch.empty(rows, out, device=device, dtype=x.dtype)
    n_blocks = triton.cdiv(intermediate, down_block_n)
    _down_kernel[(triton.cdiv(out, block_h), n_blocks)](
        h, down_rows, down_bias if down_bias is not None else dummy, acc, tickets, y, rows, intermediate, out,
        n_blocks, h.stride(0), down_rows.stride(0), down_rows.stride(1), acc.stride(0), y.stride(0),
        HAS_BIAS=down_bias is not None, BLOCK_M=BLOCK_M, BLOCK_N=down_block_n, BLOCK_H=block_h, IEEE=ieee,
        UPCAST=upcast, num_warps=num_warps)
    return y
