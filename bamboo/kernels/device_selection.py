"""Predictor mode's capped selection on the device, without a host synchronisation (CUDA-graph safe): the same
neurons as the reference's `predictor_selection` (bamboo/ops/sparse_ffn.py), in a fixed-size id list plus a
device-side count, instead of `nonzero`'s data-dependent shape.

The rule: each neuron's best score over the rows (NaN counts as +inf), those strictly above the threshold, and
of those the k best, ties by neuron index. The atomic compaction of the Triton scoring kernel cannot express a
cap (it keeps whichever ids its atomics wrote first), so a capped call ranks here: one int64 key per neuron,
the score's fp32 bits made order-preserving in the high half and the reversed index in the low half, so one
`topk` orders by score, then by index, exactly as the reference's stable rule does.
"""
from __future__ import annotations

import torch
from torch import Tensor

from bamboo.ops.sparse_ffn import best_of_rows

_INT64_MIN = torch.iinfo(torch.int64).min


def ordered_keys(best: Tensor) -> Tensor:
    """int64 keys whose order is (score descending, index ascending) for fp32 scores without NaN."""
    best = best.float() + 0.0  # -0.0 -> +0.0: the reference's comparisons see them as equal
    bits = best.view(torch.int32)
    monotone = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(torch.int64)  # float order as int order
    n = best.numel()
    reversed_index = torch.arange(n - 1, -1, -1, device=best.device, dtype=torch.int64)
    return (monotone << 32) | reversed_index


def top_k_by_score(scores: Tensor, threshold: float, k: int) -> tuple[Tensor, Tensor]:
    """(ids int32 [min(k, n)], count int32 [1]) from fp32 scores [rows, n]: the first `count` ids are the
    reference's selection (best score first); the rest are padding the kernels never read."""
    best = best_of_rows(scores)
    over = best > threshold  # a Python float against an fp32 tensor: compared in fp32, as the reference does
    keys = torch.where(over, ordered_keys(best), torch.full_like(best, _INT64_MIN, dtype=torch.int64))
    ids = keys.topk(min(k, best.numel()), sorted=True).indices.to(torch.int32)
    count = over.sum(dtype=torch.int32).clamp(max=k).reshape(1)
    return ids, count


def selection_mask(scores: Tensor, threshold: float, k: int) -> Tensor:
    """bool [n]: the reference's selection (`predictor_selection`) as a mask, without a host synchronisation;
    `k` 0 means no cap."""
    if k > 0:
        ids, count = top_k_by_score(scores, threshold, k)
        valid = torch.arange(ids.numel(), device=ids.device) < count
        mask = torch.zeros(scores.shape[-1], device=scores.device, dtype=torch.bool)
        return mask.index_put_((ids.long(),), valid)  # topk's ids are distinct: no write races
    return best_of_rows(scores) > threshold
