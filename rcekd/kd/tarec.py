"""TaReC (Zhuang et al., 2025), logits-only form: a teaching assistant (TA) of intermediate size is
first distilled from the teacher, then the student from the TA, both with the same ranking-KD term.

The term compares the BPR loss values of the two models on the same triples: each epoch every user
gets `triples` triples (u, i, j), i uniform among its training items and j uniform among the rest;
ℓ(u, i, j) = −log σ(r_ui − r_uj) for the source model and for the learner. Per user, the distance
between the two sets of values is the entropic optimal-transport (Sinkhorn) cost with squared
differences as ground cost, uniform weights, ε = `epsilon` × the user's mean cost, `iterations`
log-domain iterations
(`sinkhorn` below, tested against a direct computation). Grouping by user is our choice: it keeps
the term per user like every other method's, and the cost O(B · triples²) instead of O((B · triples)²).

The TA is the student's backbone with `assistant` overriding its size, trained through the one loop
(same data, optimiser, early stopping) when the method is built; its training time is logged as
`assistant_seconds`. While the student trains, the term is damped by `damping` (0.6) whenever the
TA's best validation Recall@20 (over its epochs) is below the student's best so far.
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from torch import nn

from rcekd.kd.common import KDContext, pair_scores, uniform_excluding


def sinkhorn(x: torch.Tensor, y: torch.Tensor, *, epsilon: float, iterations: int) -> torch.Tensor:
    """Entropic OT cost Σ P ∘ C between the uniform point sets x [B, n] and y [B, m] on the line,
    C = (x_a − y_b)², P the Sinkhorn plan (log-domain updates) of regularisation ε · mean(C) per row:
    `epsilon` is relative to the row's cost scale, so the iterations needed do not depend on how
    spread the values are. Returns [B].

    The plan is found without autograd and held fixed, so the gradient is P (the gradient of the
    regularised objective ⟨P, C⟩ + ε KL(P) at its optimum, a close approximation of that of the value
    returned) and memory does not grow with the iterations."""
    cost = (x[:, :, None] - y[:, None, :]) ** 2  # [B, n, m]
    log_a, log_b = -math.log(x.shape[1]), -math.log(y.shape[1])
    with torch.no_grad():
        fixed = cost.detach()
        eps = epsilon * fixed.mean((1, 2), keepdim=True).clamp(min=1e-12)  # [B, 1, 1]
        f = torch.zeros_like(x)
        g = torch.zeros_like(y)
        for _ in range(iterations):
            f = -eps[:, :, 0] * torch.logsumexp((g[:, None, :] - fixed) / eps + log_b, dim=2)
            g = -eps[:, 0, :] * torch.logsumexp((f[:, :, None] - fixed) / eps + log_a, dim=1)
        plan = torch.exp((f[:, :, None] + g[:, None, :] - fixed) / eps + log_a + log_b)
    return (plan * cost).sum((1, 2))


class TripleOT:
    """The ranking-KD term against one source of scores: `source(items [U, N]) -> scores [U, N]`."""

    def __init__(self, ctx: KDContext, source, *, triples: int, epsilon: float, iterations: int):
        if ctx.train.counts.min() < 1:
            raise ValueError("kd.tarec: every user needs a training item to form triples")
        self.ctx, self.source, self.triples, self.epsilon, self.iterations = ctx, source, triples, epsilon, iterations
        self.scale = 1.0

    @torch.no_grad()
    def prepare_epoch(self, student: nn.Module, generator: torch.Generator) -> dict[str, float]:
        ctx, n = self.ctx, self.triples
        users = torch.arange(ctx.n_users, device=ctx.device)
        offsets = (torch.rand(ctx.n_users, n, generator=generator, device=ctx.device) * ctx.train.counts[:, None]).long()
        self.pos = ctx.train.items[ctx.train.indptr[:-1, None] + offsets]  # [U, n]
        self.neg = uniform_excluding(users, n, ctx.n_items, ctx.train.contains, generator)  # [U, n]
        scores = self.source(torch.cat([self.pos, self.neg], 1))
        self.source_losses = F.softplus(-(scores[:, :n] - scores[:, n:]))  # −log σ(r_ui − r_uj): [U, n]
        return {}

    def loss(self, users: torch.Tensor, user_vecs: torch.Tensor, item_table: torch.Tensor) -> dict[str, torch.Tensor]:
        mine = F.softplus(-(pair_scores(user_vecs, item_table, self.pos[users]) - pair_scores(user_vecs, item_table, self.neg[users])))
        distance = sinkhorn(self.source_losses[users], mine, epsilon=self.epsilon, iterations=self.iterations)
        return {"kd": self.scale * distance}


class TaReC:
    resume_attrs = ("student_best",)  # kept between epochs (the assistant is retrained, deterministically)

    def __init__(
        self, ctx: KDContext, *, assistant: dict | None = None, triples: int = 8, epsilon: float = 0.1,
        iterations: int = 50, damping: float = 0.6,
    ):
        if ctx.build_student is None or ctx.fit_student is None:
            raise ValueError("kd.tarec trains a teaching assistant: the distill stage must provide build_student/fit_student")
        if triples < 2 or epsilon <= 0 or iterations < 1 or not 0 <= damping <= 1:
            raise ValueError(f"kd.tarec: expected triples >= 2 ({triples}), epsilon > 0 ({epsilon}), iterations >= 1 ({iterations}), 0 <= damping <= 1 ({damping})")
        self.ctx, self.damping = ctx, damping
        options = dict(triples=triples, epsilon=epsilon, iterations=iterations)
        started = time.perf_counter()
        assistant_model = ctx.build_student(dict(assistant or {"dim": 100}))
        result = ctx.fit_student(assistant_model, TripleOT(ctx, ctx.teacher.gather, **options), "assistant")
        assistant_model.load_state_dict(result.best_state)
        assistant_model.eval()
        self.assistant_seconds = time.perf_counter() - started
        self.assistant_recall = max((row["valid_recall@20"] for row in result.history), default=0.0)
        self.term = TripleOT(ctx, lambda items: scores_of(assistant_model, items, ctx.chunk), **options)
        self.student_best = 0.0

    def observe(self, valid: dict[str, float]) -> None:
        """The loop's validation metrics after each epoch: the student's best Recall@20 so far."""
        self.student_best = max(self.student_best, valid["recall@20"])

    def prepare_epoch(self, student: nn.Module, generator: torch.Generator) -> dict[str, float]:
        self.term.scale = self.damping if self.assistant_recall < self.student_best else 1.0
        self.term.prepare_epoch(student, generator)
        return {"damped": float(self.term.scale < 1.0), "assistant_recall": self.assistant_recall, "assistant_seconds": self.assistant_seconds}

    def loss(self, users: torch.Tensor, user_vecs: torch.Tensor, item_table: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.term.loss(users, user_vecs, item_table)


@torch.no_grad()
def scores_of(model: nn.Module, items: torch.Tensor, chunk: int) -> torch.Tensor:
    """A model's scores of (u, items[u, n]) for every user u, in chunks of users: [U, N]."""
    out = torch.empty(items.shape, device=items.device)
    for start in range(0, len(items), chunk):
        users = torch.arange(start, min(start + chunk, len(items)), device=items.device)
        user_vecs, item_table = model.encode(users)
        out[start : start + len(users)] = pair_scores(user_vecs, item_table, items[users])
    return out
