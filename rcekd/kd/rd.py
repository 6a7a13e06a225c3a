"""RD (Tang & Wang, 2018, Ranking Distillation), as the authors' KD framework computes it (MKD.md §1.7):
the teacher's top-K non-training items are extra positives, L = −Σ_r w_r log σ(r^S_{u,π_r}), with
rank weights w_r ∝ exp(−r / T) (r = 1..K); from epoch `dynamic_from` on they are multiplied by
max(tanh(μ (r̂_r − r + 1)), 0), r̂_r the student's rank of π_r estimated each epoch from `n` uniform
non-training items (r̂ = ⌊(|I| − 1) · #{sampled items scored above} / n⌋ + 1), so that items the student
already ranks high weigh less; each user's weights are then L1-normalised. `dynamic_from` is ours (the
paper starts the dynamic weights "after a few epochs"), and so is r̂ being fixed for the epoch (the
authors' code scores its samples with the current student at every step)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rcekd.evaluate import score_chunks
from rcekd.kd.common import KDContext, pair_scores, rank_decay, uniform_excluding


def estimated_ranks(listed: torch.Tensor, sampled: torch.Tensor, n_items: int) -> torch.Tensor:
    """r̂ [U, K] of each listed item from the scores of listed [U, K] and of uniform samples [U, n]."""
    above = (sampled[:, None, :] > listed[:, :, None]).sum(-1)  # [U, K]
    return torch.div((n_items - 1) * above, sampled.shape[1], rounding_mode="floor") + 1


def rd_weights(static: torch.Tensor, ranks: torch.Tensor | None, mu: float) -> torch.Tensor:
    """Per-user L1-normalised weights [U, K]: static [K] × (max(tanh(μ (r̂ − r + 1)), 0) when ranks [U, K] are given)."""
    weights = static.expand(len(ranks), -1) if ranks is not None else static[None, :]
    if ranks is not None:
        position = torch.arange(1, static.shape[0] + 1, device=static.device)
        weights = weights * torch.tanh(mu * (ranks - position + 1).float()).clamp(min=0)
    return weights / weights.sum(1, keepdim=True).clamp(min=torch.finfo(weights.dtype).tiny)


class RD:
    resume_attrs = ("epoch",)

    def __init__(self, ctx: KDContext, *, k: int = 10, t: float = 1.0, mu: float = 0.1, n: int = 100, dynamic_from: int = 10):
        if not 0 < k < ctx.n_items or n < 1:
            raise ValueError(f"kd.rd: expected 0 < k ({k}) < {ctx.n_items} items and n ({n}) >= 1")
        self.ctx, self.mu, self.n, self.dynamic_from, self.epoch = ctx, mu, n, dynamic_from, 0
        self.top, _ = ctx.teacher.topk(k, exclude=ctx.train)  # [U, K], best first
        self.static = rank_decay(k, t, ctx.device, offset=1.0)  # exp(−r / T), r = 1..K

    @torch.no_grad()
    def prepare_epoch(self, student: nn.Module, generator: torch.Generator) -> dict[str, float]:
        ctx = self.ctx
        self.epoch += 1
        if self.epoch < self.dynamic_from:
            self.weights = rd_weights(self.static, None, self.mu).expand(ctx.n_users, -1)
            return {}
        users = torch.arange(ctx.n_users, device=ctx.device)
        sampled = uniform_excluding(users, self.n, ctx.n_items, ctx.train.contains, generator)  # [U, n]
        ranks = torch.empty_like(self.top)
        for start, end, scores in score_chunks(student, ctx.n_users, exclude=[], chunk=ctx.chunk, device=ctx.device):
            ranks[start:end] = estimated_ranks(scores.gather(1, self.top[start:end]), scores.gather(1, sampled[start:end]), ctx.n_items)
        self.weights = rd_weights(self.static, ranks, self.mu)
        return {"rank_hat": float(ranks.float().mean())}

    def loss(self, users: torch.Tensor, user_vecs: torch.Tensor, item_table: torch.Tensor) -> dict[str, torch.Tensor]:
        scores = pair_scores(user_vecs, item_table, self.top[users])  # [B, K]
        return {"kd": -(self.weights[users] * F.logsigmoid(scores)).sum(1)}
