"""Full CE (paper ablation "full-CE"): CE between teacher and student softmaxes over all items."""

from __future__ import annotations

import torch
from torch import nn

from rcekd.kd.common import KDContext, soft_ce


class FullCE:
    def __init__(self, ctx: KDContext, *, tau: float = 1.0, exclude_train: bool = True):
        self.ctx, self.tau, self.exclude_train = ctx, tau, exclude_train

    def prepare_epoch(self, student: nn.Module, generator: torch.Generator) -> dict[str, float]:
        return {}

    def loss(self, users: torch.Tensor, user_vecs: torch.Tensor, item_table: torch.Tensor) -> dict[str, torch.Tensor]:
        teacher = self.ctx.teacher.rows_of(users)  # [B, I]
        mask = None
        if self.exclude_train:  # the training items are not part of the distribution
            train = self.ctx.train
            counts = train.counts[users]
            rows = torch.repeat_interleave(torch.arange(len(users), device=users.device), counts)
            first = torch.repeat_interleave(train.indptr[users], counts)
            offset = torch.arange(len(rows), device=users.device) - torch.repeat_interleave(counts.cumsum(0) - counts, counts)
            mask = torch.ones_like(teacher, dtype=torch.bool)
            mask[rows, train.items[first + offset]] = False
        return {"kd": soft_ce(teacher, user_vecs @ item_table.T, mask=mask, tau=self.tau)}
