"""GPU kernels behind bamboo::sparse_ffn, and the choice between them and dense matmuls.

Decode-sized inputs (at most `max_sparse_rows()` rows) go to the Triton kernels; anything larger (prefill)
goes to dense matmuls, which are faster once the union of active neurons over the rows covers most of the FFN.
"""
from __future__ import annotations

import functools
import os

import torch

from bamboo.errors import MissingDependencyError

SPARSE_DTYPES = (torch.float16, torch.bfloat16)


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def max_sparse_rows() -> int:
    """Rows up to which exact mode uses the sparse kernels (BAMBOO_SPARSE_MAX_ROWS; see benchmarks/RESULTS.md)."""
    return int(os.environ.get("BAMBOO_SPARSE_MAX_ROWS", "16"))


def use_sparse_kernel(x2: torch.Tensor, up_act: str) -> bool:
    if not (x2.is_cuda and x2.dtype in SPARSE_DTYPES and 0 < x2.shape[0] <= min(max_sparse_rows(), 16)):
        return False
    if not triton_available():
        return False
    from bamboo.kernels.sparse_ffn_triton import supports

    return supports(x2, up_act)


def require_triton():
    if not triton_available():
        raise MissingDependencyError("the sparse FFN kernels need Triton: pip install 'bamboo-compiler[triton]' "
                                     "(CUDA builds of torch ship it)")
    from bamboo.kernels import sparse_ffn_triton

    return sparse_ffn_triton


def predicted_sparse_ffn(x, gate_weight, up_weight, down_rows, predictor_in, predictor_out, k: int,
                         up_act: str = "relu", gate_bias=None, up_bias=None, down_bias=None, **blocks):
    """Predictor mode (Deja Vu / PowerInfer): a low-rank predictor scores every neuron, the k best by their
    largest score over the rows are computed, all others are skipped. k is static (no host sync).

    predictor_in [rank, hidden], predictor_out [intermediate, rank], in the predictor's own dtype (bf16 keeps
    its bytes small); the top-k runs on fp32 scores.
    """
    kernels = require_triton()
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    hidden = torch.relu(x2.to(predictor_in.dtype) @ predictor_in.t())
    scores = (hidden @ predictor_out.t()).float()
    ids = scores.amax(0).topk(k, sorted=False).indices.to(torch.int32)
    y = kernels.triton_sparse_ffn(x2, gate_weight, gate_bias, up_weight, up_bias, down_rows, down_bias, up_act,
                                  neuron_ids=ids, **blocks)
    return y.reshape(*lead, y.shape[-1])
