"""bamboo::sparse_ffn on CUDA tensors: registered against the op from here (the op's meaning in bamboo/ops
imports no kernel). Decode-sized exact and predictor calls run the Triton kernels; prefill-sized calls run the
dense FFN (cuBLAS; for exact mode the same values, and no data-dependent shapes, so CUDA-graph capture stays
legal); fp32 or no Triton runs the reference."""
from __future__ import annotations

import torch

from bamboo.ops.bound_weights import neuron_major_rows
from bamboo.ops.sparse_ffn import check_arguments, reference_sparse_ffn, resolve_predictor


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
    if mode != "dense" and x2.shape[0] > kernels.sparse_row_limit(mode):
        mode = "dense"
    if mode == "dense" or not kernels.use_sparse_kernel(x2, act, mode):
        return reference_sparse_ffn(x, gate_weight, gate_bias, up_weight, up_bias, down_weight, down_weight_nm,
                                    down_bias, predictor_in, predictor_out, predictor_bias, kind, mode, up_act,
                                    threshold, top_k)
    from bamboo.kernels.sparse_ffn_triton import triton_sparse_ffn

    down_rows = down_weight_nm if down_weight_nm is not None else neuron_major_rows(down_weight)
    if mode == "exact":
        y = triton_sparse_ffn(x2, gate_weight, gate_bias, up_weight, up_bias, down_rows, down_bias, act)
    else:
        y = kernels.predicted_sparse_ffn(x2, gate_weight, up_weight, down_rows, predictor_in, predictor_out,
                                         k=top_k or None, threshold=threshold, up_act=act, gate_bias=gate_bias,
                                         up_bias=up_bias, down_bias=down_bias, predictor_bias=predictor_bias)
    return y.reshape(*x.shape[:-1], y.shape[-1])
