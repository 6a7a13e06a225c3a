"""HTD (Kang et al., 2021, Hierarchical Topology Distillation), as the authors' KD framework computes it
(MKD.md §1.7): per side (users, items), DE's experts and selector (rcekd/kd/de.py) with τ_e =
10^(−10 e / E), whose hard choice z = argmax selector(t) groups the batch's entities (G user groups and
G item groups). On the batch's unique users and unique items i⁺ ∪ i⁻ together, with cosines of the raw
student vectors s and teacher vectors t:
- entity level: Σ (cos_s − cos_t)² over pairs of distinct entities of one group whose teacher cosine
  is positive;
- group level: the group prototypes (the mean vector of the group's entities in the batch, no
  gradient), their relations to every entity (`choice: second`, (P, e)) or to each other
  (`choice: first`, (P, P)), (cos_s − cos_t)² summed;
- L_GA: DE's Σ ‖t − Σ_m z_m · expert_m(s)‖².
L = α L_TD + (1 − α) L_GA, divided by the batch's rows (BPR's divisor)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rcekd.kd.common import KDContext
from rcekd.kd.de import DE


def cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[N, M] cosines of the rows of a [N, D] and b [M, D]."""
    return F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T


# Devices on which L_TD's entity level runs group by group. On the CPU the host is the device: reading the
# batch's group sizes costs nothing, and only the Σ_g n_g² same-group pairs are formed instead of all N²
# (4.6-31x faster a step at CiteULike's sizes, benchmarks/htd.py). On a GPU every pair's [N, N] cosines are
# formed and masked: no host sync in a step (that path is the one tests/test_sync_guard.py checks).
GROUP_BY_GROUP = {"cpu"}


def pair_loss(student: torch.Tensor, teacher: torch.Tensor, same: torch.Tensor | None = None) -> torch.Tensor:
    """Σ (cos_s − cos_t)² over pairs of distinct entities with a positive teacher cosine (and `same`, [N, N])."""
    cos_s, cos_t = cosines(student, student), cosines(teacher, teacher)  # [N, N]
    keep = (cos_t > 0) & ~torch.eye(len(student), dtype=torch.bool, device=student.device)
    if same is not None:
        keep &= same
    return ((cos_s - cos_t).square() * keep).sum()


def topology(student: torch.Tensor, teacher: torch.Tensor, groups: torch.Tensor, n_groups: int, choice: str) -> torch.Tensor:
    """L_TD of one side's entities: student [N, d_S], teacher [N, d_T] vectors, groups [N] (a scalar)."""
    if student.device.type in GROUP_BY_GROUP:
        order = torch.argsort(groups, stable=True)
        runs = torch.split(order, torch.bincount(groups, minlength=n_groups).tolist())  # host-side sizes
        entity = sum((pair_loss(student[run], teacher[run]) for run in runs if len(run) > 1), student.new_zeros(()))
    else:
        entity = pair_loss(student, teacher, groups[:, None] == groups[None, :])
    members = F.one_hot(groups, n_groups).to(student.dtype)  # [N, G]
    sizes = members.sum(0)  # [G]
    present = (sizes > 0).to(student.dtype)  # groups with members in the batch
    proto_s = (members.T @ student.detach()) / sizes.clamp(min=1)[:, None]  # [G, d_S], no gradient
    proto_t = (members.T @ teacher) / sizes.clamp(min=1)[:, None]
    if choice == "second":  # each prototype against each entity
        group = ((cosines(proto_s, student) - cosines(proto_t, teacher)).square() * present[:, None]).sum()
    else:  # prototypes among themselves
        group = ((cosines(proto_s, proto_s) - cosines(proto_t, proto_t)).square() * (present[:, None] * present[None, :])).sum()
    return entity + group


class HTD(DE):
    def __init__(self, ctx: KDContext, *, groups: int = 30, alpha: float = 0.9, choice: str = "second",
                 anneal_epochs: int = 1000, param_weight_decay: float = 1e-4):
        if choice not in ("first", "second") or not 0 <= alpha <= 1:
            raise ValueError(f"kd.htd: choice {choice!r}, alpha {alpha}: expected choice first or second and 0 <= alpha <= 1")
        super().__init__(ctx, experts=groups, anneal_epochs=anneal_epochs, param_weight_decay=param_weight_decay)
        self.groups, self.alpha, self.choice = groups, alpha, choice

    @torch.no_grad()
    def prepare_epoch(self, student: nn.Module, generator: torch.Generator) -> dict[str, float]:
        self.epoch += 1
        self.tau = 10 ** (-10 * self.epoch / self.anneal_epochs)
        return {"tau": self.tau}

    def loss(self, users: torch.Tensor, user_vecs: torch.Tensor, item_table: torch.Tensor, *,
             pairs: tuple[torch.Tensor, torch.Tensor, torch.Tensor], items: torch.Tensor) -> dict[str, torch.Tensor]:
        teacher_users, teacher_items = self.teacher_users[users], self.teacher_items[items]
        with torch.no_grad():  # users' groups 0..G−1, items' G..2G−1: one set of entities, as the authors' code
            groups = torch.cat([self.user_experts.selector(teacher_users).argmax(-1),
                                self.item_experts.selector(teacher_items).argmax(-1) + self.groups])
        td = topology(torch.cat([user_vecs, item_table[items]]), torch.cat([teacher_users, teacher_items]),
                      groups, 2 * self.groups, self.choice)
        ga = self.de_sum(users, user_vecs, item_table, items, torch.ones_like(items, dtype=user_vecs.dtype))
        rows = len(pairs[1])
        td, ga = td / rows, ga / rows
        total = self.alpha * td + (1 - self.alpha) * ga
        return {"kd": total.expand(len(users)), "td": td, "ga": ga}
