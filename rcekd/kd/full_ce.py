"""Full CE (paper ablation "full-CE"): CE between teacher and student softmaxes over all items.

Per user, over the items J (all, or all but the training items): −Σ_j p_T(j) log p_S(j) with
p_T = softmax(t_J / τ) and p_S = softmax(s_J / τ), computed as logsumexp(s_J / τ) − Σ_j p_T(j) s_j / τ
(p_T is zero off J). The teacher's p_T is fixed, so it is computed once and kept on the device when the
|U| × |I| matrix fits in `resident_gb`; each step then costs a few passes over the batch's scores and
never waits for the host. Otherwise each step computes the batch's p_T from the teacher cache's rows:
on the device for a `factors` store (a product of the teacher's factors), but read from the score file
for a `float32` / `float16` store, which brings the batch's users to the host (a sync per step).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rcekd.kd.common import KDContext, unique_rows_mask


class FullCE:
    def __init__(self, ctx: KDContext, *, tau: float = 1.0, exclude_train: bool = True, resident_gb: float = 2.0):
        self.ctx, self.tau, self.exclude_train = ctx, tau, exclude_train
        fits = ctx.n_users * ctx.n_items * 4 <= resident_gb * 2**30
        self.resident = None
        if fits:  # the teacher's distribution of every user, in chunks of users
            self.resident = torch.cat([
                self._target(ctx.teacher.rows(start, min(start + ctx.chunk, ctx.n_users)), torch.arange(start, min(start + ctx.chunk, ctx.n_users), device=ctx.device))
                for start in range(0, ctx.n_users, ctx.chunk)
            ])

    def _excluded(self, users: torch.Tensor) -> torch.Tensor | None:
        return unique_rows_mask(self.ctx.train, users) if self.exclude_train else None  # [B, I]; users distinct

    def _target(self, teacher: torch.Tensor, users: torch.Tensor) -> torch.Tensor:
        """p_T [B, I]: the teacher's softmax over the user's candidate items (0 elsewhere)."""
        excluded = self._excluded(users)
        logits = teacher / self.tau
        return F.softmax(logits if excluded is None else logits.masked_fill(excluded, float("-inf")), dim=1)

    def prepare_epoch(self, student: nn.Module, generator: torch.Generator) -> dict[str, float]:
        return {}

    def loss(self, users: torch.Tensor, user_vecs: torch.Tensor, item_table: torch.Tensor) -> dict[str, torch.Tensor]:
        target = self.resident[users] if self.resident is not None else self._target(self.ctx.teacher.rows_of(users), users)
        student = (user_vecs @ item_table.T) / self.tau  # [B, I]
        excluded = self._excluded(users)
        candidates = student if excluded is None else student.masked_fill(excluded, float("-inf"))
        return {"kd": torch.logsumexp(candidates, dim=1) - (target * student).sum(1)}
