"""CD (Lee et al., 2019, Collaborative Distillation): each epoch, n items per user sampled from the
student's top ranks of non-training items with p_k ∝ exp(−k / rank_temperature); loss = binary CE
of σ(r^S) against the soft label σ((r^T + t2) / t1)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rcekd.kd.common import KDContext, pair_scores, rank_decay, sample_positions, student_top


class CD:
    def __init__(
        self, ctx: KDContext, *, n: int = 2, pool: int = 3000, rank_temperature: float = 100.0,
        t1: float = 2.0, t2: float = 0.0,
    ):
        if not n <= pool <= ctx.n_items:
            raise ValueError(f"kd.cd: expected n ({n}) <= pool ({pool}) <= {ctx.n_items} items")
        self.ctx, self.n, self.pool, self.t1, self.t2 = ctx, n, pool, t1, t2
        self.weights = rank_decay(pool, rank_temperature, ctx.device)

    @torch.no_grad()
    def prepare_epoch(self, student: nn.Module, generator: torch.Generator) -> dict[str, float]:
        top, _ = student_top(student, self.ctx, self.pool)  # [U, pool]
        picks = sample_positions(self.weights, self.ctx.n_users, self.n, replacement=False, generator=generator)
        self.items = top.gather(1, picks)  # [U, n]
        self.labels = soft_labels(self.ctx.teacher.gather(self.items), t1=self.t1, t2=self.t2)
        return {}

    def loss(self, users: torch.Tensor, user_vecs: torch.Tensor, item_table: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = pair_scores(user_vecs, item_table, self.items[users])
        bce = F.binary_cross_entropy_with_logits(logits, self.labels[users], reduction="none")
        return {"kd": bce.mean(1)}


def soft_labels(teacher_scores: torch.Tensor, *, t1: float, t2: float) -> torch.Tensor:
    """CD's soft label σ((r^T + t2) / t1)."""
    return torch.sigmoid((teacher_scores + t2) / t1)
