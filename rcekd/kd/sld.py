"""SLD (soft-label distillation, as in MKD's code): each epoch, Q items sampled with replacement
from the student's ranking of non-training items with p_k ∝ exp(−k / T) (over its top `pool`);
CE between teacher and student softmaxes over the distinct sampled items."""

from __future__ import annotations

import torch
from torch import nn

from rcekd.kd.common import KDContext, pair_scores, rank_decay, sample_positions, soft_ce, student_top
from rcekd.kd.rcekd import dedupe_rows


class SLD:
    def __init__(self, ctx: KDContext, *, q: int = 50, t: float = 10.0, pool: int = 500, tau: float = 1.0):
        if q < 1 or not 0 < pool <= ctx.n_items:
            raise ValueError(f"kd.sld: expected q > 0 and 0 < pool ({pool}) <= {ctx.n_items} items")
        self.ctx, self.q, self.pool, self.tau = ctx, q, pool, tau
        self.weights = rank_decay(pool, t, ctx.device)

    @torch.no_grad()
    def prepare_epoch(self, student: nn.Module, generator: torch.Generator) -> dict[str, float]:
        top, _ = student_top(student, self.ctx, self.pool)
        picks = sample_positions(self.weights, self.ctx.n_users, self.q, replacement=True, generator=generator)
        self.items = top.gather(1, picks)  # [U, Q], repeats possible
        self.mask = dedupe_rows(self.items, torch.ones_like(self.items, dtype=torch.bool))
        self.teacher_logits = self.ctx.teacher.gather(self.items)
        return {"distinct": float(self.mask.float().sum(1).mean())}

    def loss(self, users: torch.Tensor, user_vecs: torch.Tensor, item_table: torch.Tensor) -> dict[str, torch.Tensor]:
        student = pair_scores(user_vecs, item_table, self.items[users])
        return {"kd": soft_ce(self.teacher_logits[users], student, mask=self.mask[users], tau=self.tau)}
