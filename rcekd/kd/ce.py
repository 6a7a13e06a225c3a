"""Vanilla CE distillation (paper Fig. 1): CE between teacher and student on the teacher's top-K."""

from __future__ import annotations

import torch
from torch import nn

from rcekd.kd.common import KDContext, pair_scores, soft_ce


class VanillaCE:
    def __init__(self, ctx: KDContext, *, k: int, tau: float = 1.0):
        self.tau = tau
        self.items, self.teacher_logits = ctx.teacher.topk(k, exclude=ctx.train)  # Q^T: [U, K] each

    def prepare_epoch(self, student: nn.Module, generator: torch.Generator) -> dict[str, float]:
        return {}

    def loss(self, users: torch.Tensor, user_vecs: torch.Tensor, item_table: torch.Tensor) -> dict[str, torch.Tensor]:
        student_logits = pair_scores(user_vecs, item_table, self.items[users])  # [B, K]
        return {"kd": soft_ce(self.teacher_logits[users], student_logits, tau=self.tau)}
