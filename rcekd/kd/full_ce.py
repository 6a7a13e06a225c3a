"""Full CE (paper ablation "full-CE"): CE between teacher and student softmaxes over all items."""

from __future__ import annotations

import torch
from torch import nn

from rcekd.kd.common import KDContext, soft_ce


class FullCE:
    def __init__(self, ctx: KDContext, *, tau: float = 1.0, exclude_train: bool = True, resident_gb: float = 2.0):
        self.ctx, self.tau, self.exclude_train = ctx, tau, exclude_train
        # the whole score matrix on the device when it fits in `resident_gb`; else each batch's rows from disk
        fits = ctx.n_users * ctx.n_items * 4 <= resident_gb * 2**30
        self.resident = ctx.teacher.rows(0, ctx.n_users) if fits else None

    def prepare_epoch(self, student: nn.Module, generator: torch.Generator) -> dict[str, float]:
        return {}

    def loss(self, users: torch.Tensor, user_vecs: torch.Tensor, item_table: torch.Tensor) -> dict[str, torch.Tensor]:
        teacher = self.resident[users] if self.resident is not None else self.ctx.teacher.rows_of(users)  # [B, I]
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
