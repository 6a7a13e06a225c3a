"""Batched full ranking: score every item for a chunk of users, mask known items, take the top-N."""

from __future__ import annotations

from typing import Iterator

import torch
from torch import nn

from rcekd.metrics import ranking_metrics
from rcekd.sparse import UserItems


@torch.no_grad()
def score_chunks(
    model: nn.Module, n_users: int, *, exclude: list[UserItems], chunk: int, device: torch.device
) -> Iterator[tuple[int, int, torch.Tensor]]:
    """Yield (start, end, scores [end - start, I]) with the `exclude` items of each user set to -inf."""
    was_training = model.training
    model.eval()
    try:
        for start in range(0, n_users, chunk):
            end = min(start + chunk, n_users)
            user_vecs, item_table = model.encode(torch.arange(start, end, device=device))
            scores = user_vecs @ item_table.T  # [B, I]
            for known in exclude:
                rows, cols = known.block(start, end)
                scores[rows, cols] = float("-inf")
            yield start, end, scores
    finally:
        model.train(was_training)


@torch.no_grad()
def full_ranking(
    model: nn.Module,
    targets: UserItems,
    *,
    exclude: list[UserItems],
    ks: tuple[int, ...] = (10, 20),
    chunk: int = 1024,
    device: torch.device = torch.device("cpu"),
) -> dict[str, float]:
    """Mean Recall@k / NDCG@k over users with at least one target, ranking all non-excluded items."""
    sums = {f"{m}@{k}": 0.0 for k in ks for m in ("recall", "ndcg")}
    n_eval = 0
    for start, end, scores in score_chunks(model, targets.n_users, exclude=exclude, chunk=chunk, device=device):
        n_targets = targets.counts[start:end]
        has = n_targets > 0
        if not has.any():
            continue
        top = scores[has].topk(max(ks), dim=1).indices  # [B', N]
        hits = targets.dense(start, end)[has].gather(1, top)
        for name, values in ranking_metrics(hits, n_targets[has], ks).items():
            sums[name] += float(values.sum())
        n_eval += int(has.sum())
    return {name: total / max(n_eval, 1) for name, total in sums.items()}
