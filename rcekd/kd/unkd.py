"""UnKD (Chen et al., 2023, Unbiased KD): items split into G popularity groups of equal interaction
mass; inside each group, pairs are drawn from the teacher's ranking of the group's non-training
items (p ∝ exp(−(k + 1) / t) over the group's top `pool`), ordered by the teacher; loss = BPR on
those pairs (the teacher's higher item above its lower one), averaged per user."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from rcekd.kd.common import KDContext, pair_scores, rank_decay, sample_positions


def popularity_groups(train_items: np.ndarray, n_items: int, groups: int) -> np.ndarray:
    """Group id 0..G−1 per item: items sorted by training popularity (most popular first) are cut
    where the cumulative interaction mass crosses g/G of the total."""
    counts = np.bincount(train_items, minlength=n_items)
    order = np.argsort(-counts, kind="stable")
    before = np.cumsum(counts[order]) - counts[order]  # mass of the more popular items
    group = np.empty(n_items, dtype=np.int64)
    group[order] = np.minimum(before * groups // max(counts.sum(), 1), groups - 1)
    return group


class UnKD:
    def __init__(
        self, ctx: KDContext, *, groups: int = 4, pairs_per_group: int = 8, pool: int = 100, t: float = 20.0,
    ):
        self.ctx, self.groups, self.pairs = ctx, groups, pairs_per_group
        train_items = ctx.train.items.cpu().numpy()
        group = torch.from_numpy(popularity_groups(train_items, ctx.n_items, groups)).to(ctx.device)
        sizes = torch.bincount(group, minlength=groups)
        if int(sizes.min()) < 2:
            raise ValueError(f"kd.unkd: a popularity group has fewer than 2 items (sizes {sizes.tolist()}); use fewer groups")
        self.pool = [min(pool, int(size)) for size in sizes]
        self.group = group
        # per group: the teacher's top-`pool` non-training items of that group, best first [U, pool_g],
        # and which of them exist (a user may have fewer non-training items in a group than `pool`)
        self.group_top, self.group_valid = zip(*(self._teacher_top_in(g) for g in range(groups)))
        self.weights = [rank_decay(p, t, ctx.device, offset=1.0) for p in self.pool]

    def _teacher_top_in(self, g: int) -> tuple[torch.Tensor, torch.Tensor]:
        ctx, out, valid = self.ctx, [], []
        outside = self.group != g
        for start in range(0, ctx.n_users, ctx.chunk):
            end = min(start + ctx.chunk, ctx.n_users)
            scores = ctx.teacher.rows(start, end)
            scores[:, outside] = float("-inf")
            rows, cols = ctx.train.block(start, end)
            scores[rows, cols] = float("-inf")
            top = scores.topk(self.pool[g], dim=1)
            out.append(top.indices)
            valid.append(torch.isfinite(top.values))
        return torch.cat(out), torch.cat(valid)

    @torch.no_grad()
    def prepare_epoch(self, student: nn.Module, generator: torch.Generator) -> dict[str, float]:
        highs, lows, oks = [], [], []
        n_users = self.ctx.n_users
        for top, valid, weights in zip(self.group_top, self.group_valid, self.weights):
            ok = valid.sum(1) >= 2  # users with at least two non-training items in the group
            row_weights = torch.where(valid | ~ok[:, None], weights, 0.0)  # [U, pool_g]
            for _ in range(self.pairs):  # each pair: two distinct ranks, the better one first
                picks = sample_positions(row_weights, n_users, 2, replacement=False, generator=generator)
                highs.append(top.gather(1, picks[:, :1]))
                lows.append(top.gather(1, picks[:, 1:]))
                oks.append(ok[:, None])
        self.high, self.low, self.ok = torch.cat(highs, 1), torch.cat(lows, 1), torch.cat(oks, 1)  # [U, G · pairs]
        return {"pairs": float(self.ok.float().sum(1).mean())}

    def loss(self, users: torch.Tensor, user_vecs: torch.Tensor, item_table: torch.Tensor) -> dict[str, torch.Tensor]:
        gap = pair_scores(user_vecs, item_table, self.high[users]) - pair_scores(user_vecs, item_table, self.low[users])
        ok = self.ok[users]
        return {"kd": (-F.logsigmoid(gap) * ok).sum(1) / ok.sum(1).clamp(min=1)}
