"""HetComp (Kang et al., WWW 2023), single-teacher form: the teacher's top-K lists at checkpoints of
its own training (rcekd/trajectory.py), then its final list (the cache's top-K), are an easy-to-hard
sequence of targets. Each user starts on the first list and moves to the next one when the student
has learned the current one well enough relative to the next:

  g(list) = NDCG@K of the student's top-K with the list's items as the relevant ones;
  advance when g(current) / g(next) > α · 0.995^(epoch / p)   (α = 1.05, p = 10),

a threshold that relaxes with the epochs (the ratio's form is our reading of the paper's "discrepancy
ratio"). It relaxes slowly (0.64 at epoch 1000), and a user whose student top-K misses the current
list never passes it, so a user also advances after `max_stay` epochs on one list (ours): every user
reaches the final list within max_stay × (number of lists − 1) epochs. Until every user is on the final list the loss asks the
student to rank the current list above everything else: −mean_{i ∈ list} log(e^{s_i} / (e^{s_i} + Σ_{j ∈ N}
e^{s_j})), N = `negatives` uniform items outside the list and the training items. Then it is list-wise:
the Plackett–Luce (ListMLE) NLL of the final list's top `top` items, in teacher order, above N,
divided by `top` so that both phases are means per listed item.
"""

from __future__ import annotations

import torch
from torch import nn

from rcekd.kd.common import KDContext, list_nll, pair_scores, sets_of, student_top, uniform_excluding


class HetComp:
    resume_attrs = ("epoch", "stage", "stay")  # kept between epochs

    def __init__(
        self, ctx: KDContext, *, k: int = 50, alpha: float = 1.05, p: float = 10.0, negatives: int = 100,
        top: int = 20, max_stay: int = 20,
    ):
        if ctx.trajectory is None:
            raise ValueError("kd.hetcomp needs the teacher's trajectory: pass --trajectory (written by train --trajectory)")
        width = ctx.trajectory.shape[2] if len(ctx.trajectory) else k
        if not 0 < top <= k <= min(width, ctx.n_items):
            raise ValueError(f"kd.hetcomp: expected 0 < top ({top}) <= k ({k}) <= the trajectory's {width} items per list")
        final, _ = ctx.teacher.topk(k, exclude=ctx.train)
        checkpoints = ctx.trajectory[:, :, :k].to(ctx.device) if len(ctx.trajectory) else final[None][:0]
        self.lists = torch.cat([checkpoints, final[None]])  # [C + 1, U, K], the final list last
        self.ctx, self.k, self.alpha, self.p, self.negatives, self.top = ctx, k, alpha, p, negatives, top
        self.max_stay = max_stay
        self.stage = torch.zeros(ctx.n_users, dtype=torch.long, device=ctx.device)
        self.stay = torch.zeros(ctx.n_users, dtype=torch.long, device=ctx.device)  # epochs on the current list
        self.epoch = 0
        self.discount = 1.0 / torch.log2(torch.arange(k, device=ctx.device, dtype=torch.float32) + 2)

    @torch.no_grad()
    def prepare_epoch(self, student: nn.Module, generator: torch.Generator) -> dict[str, float]:
        ctx, last = self.ctx, len(self.lists) - 1
        self.epoch += 1
        users = torch.arange(ctx.n_users, device=ctx.device)
        if bool((self.stage < last).any()):
            mine, _ = student_top(student, ctx, self.k)
            current = self.lists[self.stage, users]
            following = self.lists[(self.stage + 1).clamp(max=last), users]
            ratio = self.ndcg(mine, current) / self.ndcg(mine, following).clamp(min=1e-6)
            threshold = self.alpha * 0.995 ** (self.epoch / self.p)
            self.stay += 1
            advance = (self.stage < last) & ((ratio > threshold) | (self.stay > self.max_stay))
            self.stage = torch.where(advance, self.stage + 1, self.stage)
            self.stay = torch.where(advance, torch.ones_like(self.stay), self.stay)
        self.final = bool((self.stage == last).all())
        self.current = self.lists[self.stage, users]
        members = sets_of(self.current, ctx.n_items)
        self.below = uniform_excluding(
            users, self.negatives, ctx.n_items, lambda u, i: ctx.train.contains(u, i) | members.contains(u, i), generator
        )
        return {"mean_stage": float(self.stage.float().mean()), "listwise": float(self.final)}

    def ndcg(self, ranking: torch.Tensor, relevant: torch.Tensor) -> torch.Tensor:
        """NDCG@K per user of `ranking` [U, K] against the set `relevant` [U, K]."""
        hits = (ranking[:, :, None] == relevant[:, None, :]).any(2).float()
        return (hits * self.discount).sum(1) / self.discount.sum()

    def loss(self, users: torch.Tensor, user_vecs: torch.Tensor, item_table: torch.Tensor) -> dict[str, torch.Tensor]:
        below = pair_scores(user_vecs, item_table, self.below[users])
        if self.final:
            listed = pair_scores(user_vecs, item_table, self.current[users, : self.top])
            return {"kd": list_nll(listed, below) / self.top}  # per listed item, the scale of the first phase
        listed = pair_scores(user_vecs, item_table, self.current[users])  # [B, K]
        rest = torch.logsumexp(below, dim=1, keepdim=True)
        return {"kd": -(listed - torch.logaddexp(listed, rest)).mean(1)}
