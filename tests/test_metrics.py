"""Recall@k / NDCG@k (`ranking_metrics`) and the batched full ranking (`full_ranking`), pinned to numbers
computed by hand (METHODS.md §2)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from rcekd.evaluate import full_ranking
from rcekd.metrics import ranking_metrics
from rcekd.sparse import UserItems


def d(rank: int) -> float:
    """Discount of the 1-based rank: 1 / log2(rank + 1)."""
    return 1.0 / math.log2(rank + 1)


def test_ranking_metrics_hand_computed():
    """Three users: hits at ranks 1 and 3 with 2 targets; 5 targets with 2 hits in the top 3 (IDCG capped
    at k); no hit at all."""
    hits = torch.tensor(
        [
            [1, 0, 1, 0, 0],  # 2 targets, hits at ranks 1 and 3
            [0, 1, 1, 0, 1],  # 5 targets (more than k = 3), hits at ranks 2, 3, 5
            [0, 0, 0, 0, 0],  # 1 target, never retrieved
        ],
        dtype=torch.bool,
    )
    n_targets = torch.tensor([2, 5, 1])
    out = ranking_metrics(hits, n_targets, (1, 3, 5))
    assert set(out) == {f"{m}@{k}" for m in ("precision", "recall", "ndcg") for k in (1, 3, 5)}

    expected = {
        "precision@1": [1.0, 0.0, 0.0],
        "precision@3": [2 / 3, 2 / 3, 0.0],
        "precision@5": [2 / 5, 3 / 5, 0.0],
        "recall@1": [1 / 2, 0 / 5, 0.0],
        "ndcg@1": [1.0, 0.0, 0.0],
        "recall@3": [2 / 2, 2 / 5, 0.0],
        # user 0: (1 + 1/log2(4)) / (1 + 1/log2(3)); user 1: IDCG over min(5, 3) = 3 ranks
        "ndcg@3": [(1 + 1 / math.log2(4)) / (1 + 1 / math.log2(3)), (d(2) + d(3)) / (d(1) + d(2) + d(3)), 0.0],
        "recall@5": [2 / 2, 3 / 5, 0.0],
        "ndcg@5": [
            (d(1) + d(3)) / (d(1) + d(2)),
            (d(2) + d(3) + d(5)) / (d(1) + d(2) + d(3) + d(4) + d(5)),
            0.0,
        ],
    }
    for name, values in expected.items():
        assert out[name].shape == (3,)
        np.testing.assert_allclose(out[name].double().numpy(), values, rtol=1e-6, atol=1e-7, err_msg=name)


def test_ranking_metrics_numbers_written_out():
    """The brief's example as a literal: 0.9197... = 1.5 / 1.6309..."""
    out = ranking_metrics(torch.tensor([[True, False, True]]), torch.tensor([2]), (3,))
    assert out["ndcg@3"].item() == pytest.approx(1.5 / 1.6309297535714575, rel=1e-6)
    assert out["ndcg@3"].item() == pytest.approx(0.919720, abs=1e-6)


def test_ranking_metrics_perfect_ranking_gives_one():
    """All targets at the top: Recall and NDCG are 1 whenever n_targets <= k, and NDCG is 1 when the top-k
    is all hits even if there are more targets than k."""
    hits = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    out = ranking_metrics(hits, torch.tensor([2, 10]), (2, 4))
    np.testing.assert_allclose(out["ndcg@2"].numpy(), [1.0, 1.0], rtol=1e-6)
    np.testing.assert_allclose(out["ndcg@4"].numpy(), [1.0, 1.0], rtol=1e-6)
    np.testing.assert_allclose(out["recall@4"].numpy(), [1.0, 0.4], rtol=1e-6)


def test_ranking_metrics_refuses_too_few_ranks():
    """N < max(ks) is an error that names both numbers."""
    with pytest.raises(ValueError, match=r"3 ranks.*20"):
        ranking_metrics(torch.zeros(2, 3, dtype=torch.bool), torch.tensor([1, 1]), (1, 20))


class FixedScorer(nn.Module):
    """A parameter-free model whose encode returns fixed user vectors and a fixed item table."""

    def __init__(self, user_vecs: torch.Tensor, item_table: torch.Tensor):
        super().__init__()
        self.register_buffer("user_vecs", user_vecs)
        self.register_buffer("item_table", item_table)

    def encode(self, users: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.user_vecs[users], self.item_table


def one_hot_scorer(scores: list[list[float]]) -> FixedScorer:
    """Scores = user_vecs @ item_table.T with item_table = identity, so user_vecs are the scores."""
    s = torch.tensor(scores, dtype=torch.float32)
    return FixedScorer(s, torch.eye(s.shape[1]))


def test_full_ranking_hand_computed():
    """3 users × 6 items, training items excluded; each user's ranking and metrics computed by hand.

    user 0: scores 6..1 on items 0..5, train {0}, targets {2, 5}.  ranking 1,2,3,4,5 → hits at ranks 2, 5
    user 1: train {3, 4}, targets {1}; the best item 3 is excluded. ranking 0,1,2,5 → hit at rank 2
    user 2: no target: not averaged.
    user 3: train {}, targets {0, 1, 2, 3}; ranking 5,4,3,... → hits at ranks 3, 4 (4 targets > k = 3 for IDCG)
    """
    model = one_hot_scorer(
        [
            [6, 5, 4, 3, 2, 1],
            [5, 4, 3, 9, 8, 1],
            [1, 2, 3, 4, 5, 6],
            [1, 2, 3, 4, 5, 6],
        ]
    )
    train = UserItems(np.array([[0, 0], [1, 3], [1, 4], [2, 0]]), 4, 6)
    targets = UserItems(np.array([[0, 2], [0, 5], [1, 1], [3, 0], [3, 1], [3, 2], [3, 3]]), 4, 6)
    out = full_ranking(model, targets, exclude=[train], ks=(1, 3), chunk=3)

    recall1 = [0.0, 0.0, 0.0]
    ndcg1 = [0.0, 0.0, 0.0]
    recall3 = [1 / 2, 1 / 1, 1 / 4]  # user 0: item 2 at rank 2; user 1: item 1 at rank 2; user 3: item 3 at rank 3
    ndcg3 = [d(2) / (d(1) + d(2)), d(2) / d(1), d(3) / (d(1) + d(2) + d(3))]
    assert out["recall@1"] == pytest.approx(np.mean(recall1))
    assert out["ndcg@1"] == pytest.approx(np.mean(ndcg1))
    assert out["recall@3"] == pytest.approx(np.mean(recall3), rel=1e-6)
    assert out["ndcg@3"] == pytest.approx(np.mean(ndcg3), rel=1e-6)


def test_full_ranking_excluded_items_never_hit():
    """An item that is both a target and excluded (the user's best-scored item) is never counted as a hit,
    and the model's train/eval mode is restored."""
    model = one_hot_scorer([[9, 1, 2, 3, 4, 5], [9, 8, 7, 6, 5, 4], [1, 1, 1, 1, 1, 9]])
    model.train()
    train = UserItems(np.array([[0, 0], [1, 0], [2, 5]]), 3, 6)
    targets = UserItems(np.array([[0, 0], [1, 0], [2, 5]]), 3, 6)  # each user's only target is excluded
    out = full_ranking(model, targets, exclude=[train], ks=(1, 5))
    assert all(v == 0.0 for v in out.values()), out
    assert model.training

    # without the exclusion the same targets are all hits at rank 1
    out = full_ranking(model, targets, exclude=[], ks=(1, 5))
    assert out["recall@1"] == pytest.approx(1.0)
    assert out["ndcg@5"] == pytest.approx(1.0)
