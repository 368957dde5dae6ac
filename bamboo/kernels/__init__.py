"""Kernels behind bamboo::sparse_ffn, and the choice between them and dense matmuls. Importing this package
registers the CPU implementation (cpu_sparse_ffn: a C++ kernel built on first use) and the CUDA one
(cuda_sparse_ffn) against the op; Triton itself is imported only when a kernel runs.

Decode-sized inputs (at most `max_sparse_rows()` rows) go to the Triton kernels; anything larger (prefill)
goes to dense matmuls, which are faster once the union of active neurons over the rows covers most of the FFN.
"""
from __future__ import annotations

import functools
import math
import os

import torch

from bamboo.errors import MissingDependencyError
from bamboo.kernels import cpu_sparse_ffn, cuda_sparse_ffn  # noqa: F401  (register the op's CPU and CUDA kernels)

SPARSE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # fp32 runs the kernels' IEEE dots


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def max_sparse_rows() -> int:
    """Rows up to which exact mode uses the sparse kernels (BAMBOO_SPARSE_MAX_ROWS).

    With random weights the union of active neurons over rows grows fast (50% of gates at 1 row, 75% at 2,
    94% at 4): on an H100 exact mode is 1.50x dense at 1 row, 1.17x at 2 and 0.96x at 4
    (benchmarks/RESULTS.md), so the default sends 3 rows and more to dense matmuls. A trained model with
    sparser activations can raise it."""
    return int(os.environ.get("BAMBOO_SPARSE_MAX_ROWS", "2"))


def sparse_row_limit(mode: str) -> int:
    """Predictor mode reads a fixed share of the FFN whatever the batch, so it pays up to the kernels' 16 rows
    (2.6x dense at 15% of neurons and 16 rows on an H100); exact mode stops at max_sparse_rows()."""
    return 16 if mode == "predictor" else min(max_sparse_rows(), 16)


def use_sparse_kernel(x2: torch.Tensor, up_act: str, mode: str = "exact") -> bool:
    if not (x2.is_cuda and x2.dtype in SPARSE_DTYPES and 0 < x2.shape[0] <= sparse_row_limit(mode)):
        return False
    if not triton_available():
        return False
    from bamboo.kernels.sparse_ffn_triton import supports

    return supports(x2, up_act)


FFN_KERNELS = ("compact", "fixed-grid")


def ffn_kernels() -> str:
    """Which Triton kernels run the sparse FFN on CUDA (BAMBOO_FFN_KERNELS): "compact" (sparse_ffn_triton: ids
    compacted by an atomic counter, grids sized to the ids; measured on an H100) or "fixed-grid" (fixed_grid_ffn:
    at most three launches, no compaction, no memset; checked in Triton's interpreter, not yet timed on a GPU)."""
    value = os.environ.get("BAMBOO_FFN_KERNELS", "compact")
    if value not in FFN_KERNELS:
        raise ValueError(f"BAMBOO_FFN_KERNELS={value!r} is not one of {FFN_KERNELS}; unset it for the default")
    return value


def require_triton():
    if not triton_available():
        raise MissingDependencyError("the sparse FFN kernels need Triton: pip install 'bamboo-compiler[triton]' "
                                     "(CUDA builds of torch ship it)")
    from bamboo.kernels import sparse_ffn_triton

    return sparse_ffn_triton


def predicted_sparse_ffn(x, gate_weight, up_weight, down_rows, predictor_in, predictor_out, k: int | None = None,
                         threshold: float | None = None, up_act: str = "relu", gate_bias=None, up_bias=None,
                         down_bias=None, predictor_bias=None, **blocks):
    """Predictor mode (Deja Vu / PowerInfer): a low-rank predictor relu(x P_in^T) P_out^T scores every neuron;
    only the selected neurons' gate, up and down rows are read. No host synchronisation either way.

    - `threshold` alone: neurons whose score exceeds it for any row (PowerInfer); the kernel fuses scoring and
      selection.
    - with `k`: at most the k best of them by their largest score over the rows, ties by index, exactly the
      reference's set (device_selection.top_k_by_score on the reference's scores; `k` alone: threshold -inf).
    predictor_in [rank, hidden], predictor_out [intermediate, rank], in the predictor's own dtype.
    """
    kernels = require_triton()
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if threshold is None and k is None:
        raise ValueError("predicted_sparse_ffn needs k (top-k) or threshold (with an optional cap k)")
    if ffn_kernels() == "fixed-grid":
        y = _fixed_grid_predicted(x2, gate_weight, up_weight, down_rows, predictor_in, predictor_out, k, threshold,
                                  up_act, gate_bias, up_bias, down_bias, predictor_bias, blocks)
        return y.reshape(*lead, y.shape[-1])
    if k is None:  # no cap: the fused scoring kernel compacts every neuron over the threshold (any order)
        ids, count = kernels.select_by_predictor(x2, predictor_in, predictor_out, threshold, bias=predictor_bias,
                                                 gate_block=blocks.get("gate_block"),
                                                 num_warps=blocks.get("num_warps", 4))
    else:  # a cap keeps the k best-scored, ties by index, as the reference does (scored by its own torch code)
        from bamboo.kernels.device_selection import top_k_by_score
        from bamboo.ops.sparse_ffn import predictor_scores

        scores = predictor_scores(x2, predictor_in, predictor_out, predictor_bias)
        ids, count = top_k_by_score(scores, -math.inf if threshold is None else threshold, k)
    y = kernels.triton_sparse_ffn(x2, gate_weight, gate_bias, up_weight, up_bias, down_rows, down_bias, up_act,
                                  neuron_ids=ids, neuron_count=count, **blocks)
    return y.reshape(*lead, y.shape[-1])


def _fixed_grid_predicted(x2, gate_weight, up_weight, down_rows, predictor_in, predictor_out, k, threshold, up_act,
                          gate_bias, up_bias, down_bias, predictor_bias, blocks):
    """Predictor mode on the fixed-grid kernels: the threshold alone is scored inside them (three launches); a cap
    ranks the reference's scores on the device first (device_selection) and passes the selection as a mask."""
    from bamboo.kernels.fixed_grid_ffn import fixed_grid_sparse_ffn

    weights = (x2, gate_weight, gate_bias, up_weight, up_bias, down_rows, down_bias, up_act)
    num_warps = blocks.get("num_warps", 4)
    if k is None:
        return fixed_grid_sparse_ffn(*weights, predictor_in=predictor_in, predictor_out=predictor_out,
                                     predictor_bias=predictor_bias, threshold=threshold, num_warps=num_warps)
    from bamboo.kernels.device_selection import selection_mask
    from bamboo.ops.sparse_ffn import predictor_scores

    scores = predictor_scores(x2, predictor_in, predictor_out, predictor_bias)
    mask = selection_mask(scores, -math.inf if threshold is None else threshold, k)
    return fixed_grid_sparse_ffn(*weights, selection=mask, num_warps=num_warps)
