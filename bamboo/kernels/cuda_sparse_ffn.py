"""bamboo::sparse_ffn on CUDA tensors: registered against the op from here (the op's meaning in bamboo/ops
imports no kernel). Decode-sized exact and predictor calls run the Triton kernels; prefill-sized calls run the
dense FFN (cuBLAS; for exact mode the same values, and no data-dependent shapes, so CUDA-graph capture stays
legal). The reference (bamboo/ops) is never run here: its `nonzero` is a host synchronisation inside the op, which
breaks CUDA-graph capture. Where the Triton kernels cannot run (no Triton, an activation they lack), exact mode
runs the dense FFN (its meaning) and predictor mode a masked dense FFN: the same neurons, every weight read."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from bamboo.ops import activations
from bamboo.ops.bound_weights import neuron_major_rows
from bamboo.ops.sparse_ffn import check_arguments, predictor_scores, reference_sparse_ffn, resolve_predictor


@torch.library.register_kernel("bamboo::sparse_ffn", "cuda")
def sparse_ffn_cuda(x, gate_weight, gate_bias, up_weight, up_bias, down_weight, down_weight_nm, down_bias,
                    predictor_in, predictor_out, predictor_bias, kind, mode, up_act, threshold, top_k,
                    predictor_table=0):
    from bamboo import kernels

    check_arguments(x, gate_weight, up_weight, down_weight, down_weight_nm, kind, mode, up_act, predictor_in,
                    predictor_out, predictor_table)
    if mode == "predictor":
        predictor_in, predictor_out, predictor_bias, threshold, top_k = resolve_predictor(
            gate_weight, predictor_in, predictor_out, predictor_bias, threshold, top_k, predictor_table)
    x2 = x.reshape(-1, x.shape[-1])
    act = "identity" if kind == "relu_mlp" else up_act
    path = cuda_path(x2, mode, act)
    if path == "dense":  # no data-dependent shapes: the reference's dense mode is plain matmuls
        return reference_sparse_ffn(x, gate_weight, gate_bias, up_weight, up_bias, down_weight, down_weight_nm,
                                    down_bias, kind=kind, mode="dense", up_act=up_act)
    if path == "masked":  # dense matmuls: the weight as it is, no neuron-major copy
        down = down_weight_nm if down_weight_nm is not None else down_weight.t()
        y = masked_predictor_ffn(x2, gate_weight, gate_bias, up_weight, up_bias, down, down_bias, predictor_in,
                                 predictor_out, predictor_bias, kind, up_act, threshold, top_k)
        return y.reshape(*x.shape[:-1], y.shape[-1])
    from bamboo.kernels.sparse_ffn_triton import triton_sparse_ffn

    down_rows = down_weight_nm if down_weight_nm is not None else neuron_major_rows(down_weight)

    if mode == "exact" and kernels.ffn_kernels() == "fixed-grid":
        from bamboo.kernels.fixed_grid_ffn import fixed_grid_sparse_ffn

        y = fixed_grid_sparse_ffn(x2, gate_weight, gate_bias, up_weight, up_bias, down_rows, down_bias, act)
    elif mode == "exact":
        y = triton_sparse_ffn(x2, gate_weight, gate_bias, up_weight, up_bias, down_rows, down_bias, act)
    else:
        y = kernels.predicted_sparse_ffn(x2, gate_weight, up_weight, down_rows, predictor_in, predictor_out,
                                         k=top_k or None, threshold=threshold, up_act=act, gate_bias=gate_bias,
                                         up_bias=up_bias, down_bias=down_bias, predictor_bias=predictor_bias)
    return y.reshape(*x.shape[:-1], y.shape[-1])


def cuda_path(x2, mode: str, act: str) -> str:
    """How a CUDA call runs: "triton" (the sparse kernels: decode-sized, fp16/bf16/fp32, Triton importable),
    "dense" (dense mode, prefill-sized calls, and exact mode without the kernels: the same values) or "masked"
    (predictor mode without the kernels). Never the reference: its host sync breaks CUDA-graph capture."""
    from bamboo import kernels

    if mode == "dense" or x2.shape[0] > kernels.sparse_row_limit(mode):
        return "dense"
    if kernels.use_sparse_kernel(x2, act, mode):
        return "triton"
    return "masked" if mode == "predictor" else "dense"


def masked_predictor_ffn(x2, gate_weight, gate_bias, up_weight, up_bias, down_rows, down_bias, predictor_in,
                         predictor_out, predictor_bias, kind, up_act, threshold, top_k):
    """Predictor mode's values with dense matmuls and a selection mask (no data-dependent shape, no sync): the
    reference's neurons, every weight read. A neuron outside the selection contributes exactly nothing, NaN
    included (a where, not a multiply by 0)."""
    from bamboo.kernels.device_selection import selection_mask

    scores = predictor_scores(x2, predictor_in, predictor_out, predictor_bias)
    mask = selection_mask(scores, threshold, top_k)
    h = torch.relu(F.linear(x2, gate_weight, gate_bias))
    if kind != "relu_mlp":
        h = h * activations.apply(up_act, F.linear(x2, up_weight, up_bias))
    y = torch.where(mask, h, torch.zeros((), dtype=h.dtype, device=h.device)) @ down_rows
    return y + down_bias if down_bias is not None else y
