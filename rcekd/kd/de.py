"""DE, the distillation experts of DE-RRD (Kang et al., 2020), as the authors' KD framework computes
them (MKD.md §1.7): per side (users, items), M experts d_S → (d_S + d_T) / 2 → ReLU → d_T and a
selection network on the teacher's vector, z = softmax((log softmax(W t + b) + Gumbel) / τ_e), with
τ_e = max(τ_end · a^(1 − e / E), τ_end) annealed over epochs (from τ_end · a towards a hard choice);
L_DE = Σ ‖t − Σ_m z_m · expert_m(s)‖² over the batch's unique users + ½ (unique i⁺ + unique i⁻),
divided by the batch's rows (BPR's divisor).
`de_rrd` adds RRD (kd.rrd's method, reused): "kd" = λ_DE · L_DE + λ_RRD · RRD_u. The experts and the
selectors are the method's parameters (their own Adam group, weight decay `param_weight_decay`; the
authors' one weight decay for experts and student is not kept: the student keeps rcekd's L2 on the
embeddings a batch uses)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rcekd.kd.common import KDContext, expert, mixture_of_experts, own_initialisation
from rcekd.kd.rrd import RRD


class Experts(nn.Module):
    """One side's experts and selection network."""

    def __init__(self, d_student: int, d_teacher: int, experts: int):
        super().__init__()
        self.experts = nn.ModuleList(expert(d_student, d_teacher) for _ in range(experts))
        self.selector = nn.Linear(d_teacher, experts)

    def select(self, teacher: torch.Tensor, tau: float, *, gumbel: bool = True) -> torch.Tensor:
        """z [N, M]: the Gumbel-softmax choice of expert per entity from its teacher vector [N, d_T]."""
        logits = F.log_softmax(self.selector(teacher), dim=-1)
        if gumbel:
            logits = logits - torch.log(-torch.log(torch.rand_like(logits).clamp(min=1e-20)))
        return F.softmax(logits / tau, dim=-1)

    def forward(self, student: torch.Tensor, choice: torch.Tensor) -> torch.Tensor:
        """Σ_m z_m · expert_m(s): [N, d_S], [N, M] → [N, d_T]."""
        return mixture_of_experts(self.experts, student, choice)


def seeded_experts(ctx: KDContext, experts: int) -> tuple[Experts, Experts]:
    """The users' and items' Experts, initialised from the run's seed only (torch's generator left alone)."""
    if ctx.student_dim is None:
        raise ValueError("the student's dimension is unknown (KDContext.student_dim)")
    d_teacher = ctx.teacher.factors()[0].shape[1]
    with own_initialisation(ctx.seed, "experts"):
        return Experts(ctx.student_dim, d_teacher, experts), Experts(ctx.student_dim, d_teacher, experts)


class DE(nn.Module):
    resume_attrs = ("epoch",)

    def __init__(
        self, ctx: KDContext, *, experts: int = 30, tau_end: float = 1e-10, anneal: float = 1e10,
        anneal_epochs: int = 1000, param_weight_decay: float = 1e-4,
    ):
        super().__init__()
        if experts < 1 or not 0 < tau_end or anneal < 1 or anneal_epochs < 1:
            raise ValueError(f"kd.de: expected experts ({experts}) >= 1, tau_end ({tau_end}) > 0, anneal ({anneal}) >= 1, "
                             f"anneal_epochs ({anneal_epochs}) >= 1")
        self.ctx, self.tau_end, self.anneal, self.anneal_epochs = ctx, tau_end, anneal, anneal_epochs
        self.param_weight_decay, self.wants, self.epoch = param_weight_decay, ("pairs",), 0
        self.teacher_users, self.teacher_items = ctx.teacher.factors()
        self.user_experts, self.item_experts = seeded_experts(ctx, experts)

    @torch.no_grad()
    def prepare_epoch(self, student: nn.Module, generator: torch.Generator) -> dict[str, float]:
        self.epoch += 1
        self.tau = max(self.tau_end * self.anneal ** (1 - self.epoch / self.anneal_epochs), self.tau_end)
        return {"tau": self.tau}

    def de_sum(self, users: torch.Tensor, user_vecs: torch.Tensor, item_table: torch.Tensor, items: torch.Tensor,
               item_weights: torch.Tensor) -> torch.Tensor:
        """Σ ‖t − Σ_m z_m · expert_m(s)‖² over the unique users, and over the unique items weighted by
        `item_weights` [J] (a scalar)."""
        total = user_vecs.new_zeros(())
        for side, student, teacher, weights in ((self.user_experts, user_vecs, self.teacher_users[users], None),
                                                (self.item_experts, item_table[items], self.teacher_items[items], item_weights)):
            errors = (teacher - side(student, side.select(teacher, self.tau))).square().sum(-1)  # [N]
            total = total + (errors.sum() if weights is None else (errors * weights).sum())
        return total

    def item_weights(self, pairs: tuple[torch.Tensor, torch.Tensor, torch.Tensor], items: torch.Tensor) -> torch.Tensor:
        """[J] ½ for each unique item among the positives plus ½ among the negatives (the authors' code:
        unique users + ½ (unique i⁺ + unique i⁻)), from membership marks, with no host sync."""
        _, pos, neg = pairs
        marks = torch.zeros(2, self.ctx.n_items, device=items.device)
        marks[0, pos], marks[1, neg] = 0.5, 0.5
        return marks[:, items].sum(0)

    def loss(self, users: torch.Tensor, user_vecs: torch.Tensor, item_table: torch.Tensor, *,
             pairs: tuple[torch.Tensor, torch.Tensor, torch.Tensor], items: torch.Tensor) -> dict[str, torch.Tensor]:
        de = self.de_sum(users, user_vecs, item_table, items, self.item_weights(pairs, items)) / len(pairs[1])
        return {"kd": de.expand(len(users)), "de": de}


class DERRD(DE):
    def __init__(
        self, ctx: KDContext, *, de_weight: float = 0.05, rrd_weight: float = 0.1, rrd: dict | None = None,
        experts: int = 30, tau_end: float = 1e-10, anneal: float = 1e10, anneal_epochs: int = 1000,
        param_weight_decay: float = 1e-4,
    ):
        super().__init__(ctx, experts=experts, tau_end=tau_end, anneal=anneal, anneal_epochs=anneal_epochs,
                         param_weight_decay=param_weight_decay)
        self.de_weight, self.rrd_weight = de_weight, rrd_weight
        self.rrd = RRD(ctx, **(rrd or {}))

    @torch.no_grad()
    def prepare_epoch(self, student: nn.Module, generator: torch.Generator) -> dict[str, float]:
        return {**super().prepare_epoch(student, generator), **self.rrd.prepare_epoch(student, generator)}

    def loss(self, users: torch.Tensor, user_vecs: torch.Tensor, item_table: torch.Tensor, *,
             pairs: tuple[torch.Tensor, torch.Tensor, torch.Tensor], items: torch.Tensor) -> dict[str, torch.Tensor]:
        de = super().loss(users, user_vecs, item_table, pairs=pairs, items=items)["de"]
        rrd = self.rrd.loss(users, user_vecs, item_table)["kd"]  # [B]
        return {"kd": self.de_weight * de + self.rrd_weight * rrd, "de": de, "rrd": rrd.mean()}
