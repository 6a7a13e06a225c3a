"""RRD (Kang et al., 2020, Relaxed Ranking Distillation): each epoch, K "interesting" items drawn
without replacement from the teacher's top-M with p_k ∝ exp(−k / T), kept in teacher order, and L
"uninteresting" items uniform from the rest (neither training items nor the teacher's top-M).
Loss: the Plackett–Luce NLL of ranking the interesting items in teacher order above the
uninteresting ones, on student scores only. `sample: false` takes the teacher's top-K in order
(which the authors later found better)."""

from __future__ import annotations

import torch
from torch import nn

from rcekd.kd.common import KDContext, list_nll, pair_scores, rank_decay, sample_positions, sets_of, uniform_excluding


class RRD:
    def __init__(self, ctx: KDContext, *, k: int = 50, l: int = 100, m: int = 500, t: float = 10.0, sample: bool = True):
        if not k <= m < ctx.n_items:
            raise ValueError(f"kd.rrd: expected k ({k}) <= m ({m}) < {ctx.n_items} items")
        self.ctx, self.k, self.l, self.m, self.sample = ctx, k, l, m, sample
        self.teacher_items, _ = ctx.teacher.topk(m, exclude=ctx.train)  # [U, M], best first
        self.top_sets = sets_of(self.teacher_items, ctx.n_items)
        self.weights = rank_decay(m, t, ctx.device)

    @torch.no_grad()
    def prepare_epoch(self, student: nn.Module, generator: torch.Generator) -> dict[str, float]:
        ctx = self.ctx
        if self.sample:
            picks = sample_positions(self.weights, ctx.n_users, self.k, replacement=False, generator=generator)
            self.interesting = self.teacher_items.gather(1, picks)  # teacher order
        else:
            self.interesting = self.teacher_items[:, : self.k]
        users = torch.arange(ctx.n_users, device=ctx.device)

        def forbidden(rows: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
            return ctx.train.contains(rows, items) | self.top_sets.contains(rows, items)

        self.uninteresting = uniform_excluding(users, self.l, ctx.n_items, forbidden, generator)
        return {}

    def loss(self, users: torch.Tensor, user_vecs: torch.Tensor, item_table: torch.Tensor) -> dict[str, torch.Tensor]:
        listed = pair_scores(user_vecs, item_table, self.interesting[users])
        below = pair_scores(user_vecs, item_table, self.uninteresting[users])
        return {"kd": list_nll(listed, below)}
