"""Top-N metrics as pure functions of a hit matrix (RecBole-style, tested against hand computations)."""

from __future__ import annotations

import torch


def ranking_metrics(hits: torch.Tensor, n_targets: torch.Tensor, ks: tuple[int, ...]) -> dict[str, torch.Tensor]:
    """Per-user Precision@k, Recall@k and NDCG@k.

    hits: [B, N] bool, hits[b, r] = the item ranked r-th (0-based) for user b is a target; N >= max(ks).
    n_targets: [B] number of targets of each user (> 0).
    Precision@k = hits in top-k / k; Recall@k = hits in top-k / n_targets; NDCG@k = DCG@k / IDCG@k with IDCG over min(n_targets, k) hits.
    """
    if hits.shape[1] < max(ks):
        raise ValueError(f"hit matrix has {hits.shape[1]} ranks, fewer than the largest cut-off {max(ks)}")
    hits = hits.float()
    n_targets = n_targets.to(hits)
    discount = 1.0 / torch.log2(torch.arange(2, hits.shape[1] + 2, device=hits.device, dtype=hits.dtype))  # [N]
    ideal = torch.cumsum(discount, 0)  # ideal[m - 1] = IDCG with m relevant items
    out = {}
    for k in ks:
        top = hits[:, :k]
        out[f"precision@{k}"] = top.sum(1) / k
        out[f"recall@{k}"] = top.sum(1) / n_targets
        ideal_k = ideal[(n_targets.clamp(max=k) - 1).long()]
        out[f"ndcg@{k}"] = (top * discount[:k]).sum(1) / ideal_k
    return out
