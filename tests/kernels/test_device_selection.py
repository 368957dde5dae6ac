"""Predictor mode's capped selection on the device (bamboo/kernels/device_selection.py) against the reference's
`predictor_selection`, given the same fp32 scores: ties at the cap (broken by index), NaN (selects, as +inf),
infinities, signed zeros, several rows, thresholds between fp32 values, caps that bind and that do not."""
import math
import sys

import pytest
import torch

from bamboo.kernels.device_selection import ordered_keys, top_k_by_score
from bamboo.ops.sparse_ffn import predictor_selection

OPS = sys.modules["bamboo.ops.sparse_ffn"]


def _reference(scores, threshold, top_k, monkeypatch):
    monkeypatch.setattr(OPS, "predictor_scores", lambda *args: scores)
    return predictor_selection(None, None, None, None, threshold, top_k)


@pytest.mark.parametrize("seed", range(6))
def test_the_device_selection_keeps_the_references_neurons(seed, monkeypatch):
    gen = torch.Generator().manual_seed(seed)
    rows, n = [1, 3, 16, 2, 5, 1][seed], [1, 7, 64, 300, 1000, 4096][seed]
    scores = torch.randint(-4, 5, (rows, n), generator=gen).float() / 4  # coarse: many ties at the cap
    specials = torch.rand(rows, n, generator=gen)
    scores[specials < 0.03] = math.nan
    scores[(specials >= 0.03) & (specials < 0.05)] = math.inf
    scores[(specials >= 0.05) & (specials < 0.07)] = -math.inf
    scores[(specials >= 0.07) & (specials < 0.1)] = -0.0
    for threshold in (-math.inf, -0.25, 0.0, 0.25, math.nextafter(0.25, -math.inf), math.inf):
        over = int((torch.nan_to_num(scores, nan=math.inf).amax(0) > threshold).sum())
        for k in sorted({1, 2, max(1, over // 3), max(over, 1), over + 5}):
            expected = _reference(scores, threshold, k, monkeypatch)
            ids, count = top_k_by_score(scores, threshold, k)
            assert ids.dtype == torch.int32 and count.dtype == torch.int32 and ids.numel() == min(k, n)
            assert int(count) == expected.numel(), (threshold, k)
            assert torch.equal(ids[:int(count)].long().sort().values, expected), (threshold, k)


def test_a_binding_cap_keeps_the_best_scored_not_the_first_ids():
    """The GPU's old capped path kept whichever ids its atomic compaction wrote first (mostly low indices)."""
    scores = torch.arange(264, dtype=torch.float32)[None] / 264  # best scores at the highest indices
    ids, count = top_k_by_score(scores, -1.0, 64)
    assert int(count) == 64 and set(ids.tolist()) == set(range(200, 264))


def test_keys_order_by_score_then_index_and_treat_signed_zeros_alike():
    best = torch.tensor([0.5, -0.0, 0.0, -1.0, math.inf, -math.inf, 0.5, 1e-45, -1e-45])
    order = ordered_keys(best).argsort(descending=True).tolist()
    assert order == [4, 0, 6, 7, 1, 2, 8, 3, 5]
