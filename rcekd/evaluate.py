"""Batched full ranking: score every item for a chunk of users, mask known items, take the top-N.

The scores of a chunk go into one buffer allocated once per pass and reused for every chunk (a fresh
|chunk| × |I| result per chunk costs more in allocation and page faults than the product itself), and
the metrics read the top-N items' membership in the targets' CSR arrays, never a dense target mask.
"""

from __future__ import annotations

from typing import Iterable, Iterator

import torch
from torch import nn

from rcekd.metrics import ranking_metrics
from rcekd.sparse import UserItems

EVAL_CHUNK = 128  # users scored at once by default: a chunk of CiteULike's scores (13 MB) stays in cache


def score_users(
    model: nn.Module, users: torch.Tensor, *, exclude: list[UserItems], out: torch.Tensor | None = None
) -> torch.Tensor:
    """Scores [B, I] of `users` [B] against every item, with the `exclude` items of each user at -inf,
    written into out[:B] (a buffer the caller reuses; allocated when None or too small). The model is
    used in the mode it is in (eval mode is the caller's)."""
    user_vecs, item_table = model.encode(users)
    if out is None or out.shape[0] < len(users) or out.shape[1] != item_table.shape[0] or out.dtype != user_vecs.dtype:
        out = torch.empty(len(users), item_table.shape[0], dtype=user_vecs.dtype, device=user_vecs.device)
    scores = out[: len(users)]
    torch.matmul(user_vecs, item_table.T, out=scores)  # [B, I]
    for known in exclude:
        scores.index_put_(known.cells(users), torch.tensor(float("-inf"), device=scores.device))
    return scores


@torch.no_grad()
def score_batches(
    model: nn.Module, batches: Iterable[torch.Tensor], *, exclude: list[UserItems]
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (users, scores [len(users), I]) for each batch of users, in eval mode, with the `exclude`
    items at -inf. `scores` is a view of one buffer (the first batch's, the largest) that the next
    batch overwrites: use it (or copy it) before then."""
    was_training = model.training
    model.eval()
    buffer = None
    try:
        for users in batches:
            scores = score_users(model, users, exclude=exclude, out=buffer)
            buffer = scores if buffer is None else buffer
            yield users, scores
    finally:
        model.train(was_training)


def score_chunks(
    model: nn.Module, n_users: int, *, exclude: list[UserItems], chunk: int, device: torch.device
) -> Iterator[tuple[int, int, torch.Tensor]]:
    """Yield (start, end, scores [end - start, I]) over users 0..n_users in chunks (`score_batches`)."""
    start = 0
    for users, scores in score_batches(model, torch.arange(n_users, device=device).split(chunk), exclude=exclude):
        yield start, start + len(users), scores
        start += len(users)


@torch.no_grad()
def full_ranking(
    model: nn.Module,
    targets: UserItems,
    *,
    exclude: list[UserItems],
    ks: tuple[int, ...] = (10, 20),
    chunk: int = EVAL_CHUNK,
    device: torch.device = torch.device("cpu"),
) -> dict[str, float]:
    """Mean Precision@k / Recall@k / NDCG@k over users with at least one target, ranking all non-excluded items.

    Only those users are scored. Ties between scores are ordered as `torch.topk` orders them (the
    order within the top-N list decides NDCG when two items score exactly alike). Sums are float64."""
    sums = {f"{m}@{k}": torch.zeros((), dtype=torch.float64, device=device) for k in ks for m in ("precision", "recall", "ndcg")}
    evaluated = torch.nonzero(targets.counts > 0).squeeze(1).to(device)  # [n]
    for users, scores in score_batches(model, evaluated.split(chunk), exclude=exclude):
        top = scores.topk(max(ks), dim=1).indices  # [B, N]
        hits = targets.contains(users[:, None].expand_as(top), top)
        for name, values in ranking_metrics(hits, targets.counts[users], ks).items():
            sums[name] += values.sum(dtype=torch.float64)
    return {name: float(total) / max(len(evaluated), 1) for name, total in sums.items()}
