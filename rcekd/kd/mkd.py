"""MKD (Zhu & Zhang, "From Input to Output: A Multi-layer Knowledge Distillation Framework for
Compressing Recommendation Models"): the student's representations and scores distilled at three
layers (../shared/docs/MKD.md §1), with the defaults of its §4 where the paper is open:

- NKD (input layer): each batch user and item e is mixed with a random one of its K teacher-cosine
  neighbours v, the same v on both sides, by independent per-dimension masks (K-Mix, hard: own value
  kept with probability α); the projectors pull the mixed student vector to the mixed teacher one:
  Σ_e ‖f(K-Mix(e^S)) − K-Mix(e^T)‖₂, over unique users (f) and unique items i⁺ ∪ i⁻ (g).
- CPD (intermediate layer): the projectors must keep the student's pairwise orders. CPD1 on the
  batch's triples: Σ max(−order(g(i⁺), g(i⁻) | f(u)) · order(i⁺, i⁻ | u), 0); CPD2 over the teacher's
  top-N non-training items: CE of softmax(f(u)·g(i)) against softmax(u·i). Its inputs and targets are
  the student's vectors with gradients stopped, so CPD trains f and g only.
- SLD (output layer): `kd.sld`, reused.

Each of NKD and CPD is its batch sum over the batch's training rows (BPR's divisor, A7), added to
every user's entry, so both loop reductions keep it; "kd" = λ_SLD·SLD_u + λ_NKD·NKD + λ_CPD·(CPD1 +
λ_CPD2·CPD2), trained with kd.mkd.weight 1. The projectors are this module's parameters: the loop
trains them in their own Adam group with weight decay `param_weight_decay`. Table 4's ablations are
`parts` (a subset of nkd, cpd, sld) and `mix` (false: NKD without K-Mix, i.e. plain feature
distillation, which every "without NKD" variant keeps: CPD alone ties no projector to the teacher, A11).

The authors' code where it differs from the paper, as options (paper by default; MKD.md §1, §4):
`neighbour_space: pca` (A2: Euclidean neighbours after PCA to `pca_dim` components), `distance: cosine`
(A3: NKD = 1 − cos(f(x), t), and CPD's S' scores cosines of f(u) and g(i) in CPD1, flip and CPD2; the
authors' CPD then uses τ 0.1: `tau`), `item_weight: 0.5` (A9: NKD's item side, unique(i⁺ ∪ i⁻), at half
weight; the code weighs unique i⁺ and unique i⁻ at 0.5 each, so an item on both sides counts twice there). The part `flip` (Eq. 25's diagnostic, not a loss) is the
share of the batch's rows whose order the projectors reverse. K-Mix on LightGCN's layer 0 (A8) is not
offered: the teacher cache holds the final vectors only.
Per-step randomness (neighbours, masks) comes from torch's global generator, which the loop seeds
and keeps in its resume state.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rcekd.kd.common import KDContext, expert, mixture_of_experts, own_initialisation, pair_scores, soft_ce
from rcekd.kd.sld import SLD

PARTS = ("nkd", "cpd", "sld")


class Projector(nn.Module):
    """f (users) or g (items): the mean of `experts` MLPs d_S → (d_S + d_T) / 2 → ReLU → d_T (MKD's
    code; PEFD's output ReLU could not fit signed teacher vectors, A4), computed as one wide MLP
    (`mixture_of_experts`); CPD reads its hidden units and output layer apart."""

    def __init__(self, d_in: int, d_out: int, experts: int):
        super().__init__()
        self.experts = nn.ModuleList(expert(d_in, d_out) for _ in range(experts))

    def hidden(self, x: torch.Tensor) -> torch.Tensor:  # [N, d_S] → [N, M·h]
        first = [e[0] for e in self.experts]
        return F.relu(F.linear(x, torch.cat([l.weight for l in first]), torch.cat([l.bias for l in first])))

    def output_layer(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(W [d_T, M·h], b [d_T]) with forward(x) = (hidden(x) Wᵀ + b) / M."""
        last = [e[2] for e in self.experts]
        return torch.cat([l.weight for l in last], dim=1), torch.stack([l.bias for l in last]).sum(0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [N, d_S] → [N, d_T]
        return mixture_of_experts(self.experts, x)


@torch.no_grad()
def cosine_neighbours(vectors: torch.Tensor, k: int, chunk: int = 1024) -> torch.Tensor:
    """[N, k]: each row's k most cosine-similar other rows of `vectors` [N, D], most similar first."""
    normed = F.normalize(vectors, dim=1)
    out = []
    for start in range(0, len(normed), chunk):
        sims = normed[start : start + chunk] @ normed.T  # [c, N]
        rows = torch.arange(len(sims), device=sims.device)
        sims[rows, start + rows] = float("-inf")  # never its own neighbour
        out.append(sims.topk(k, dim=1).indices)
    return torch.cat(out)


def k_mix(own: torch.Tensor, neighbour: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """M ⊙ e + (1 − M) ⊙ v (Eq. 3–6)."""
    return mask * own + (1 - mask) * neighbour


@torch.no_grad()
def pca_neighbours(vectors: torch.Tensor, k: int, components: int, chunk: int = 1024) -> torch.Tensor:
    """[N, k]: each row's k nearest other rows in Euclidean distance after projecting the centred
    `vectors` [N, D] on their first `components` principal axes (all of them when D is smaller)."""
    centred = vectors - vectors.mean(0)
    axes = torch.linalg.svd(centred, full_matrices=False).Vh[:components]  # [c, D]; a sign flip keeps distances
    points = centred @ axes.T
    out = []
    for start in range(0, len(points), chunk):
        distances = torch.cdist(points[start : start + chunk], points)  # [c, N]
        rows = torch.arange(len(distances), device=distances.device)
        distances[rows, start + rows] = float("inf")  # never its own neighbour
        out.append(distances.topk(k, dim=1, largest=False).indices)
    return torch.cat(out)


def l2_distance(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Row-wise unsquared ‖a − b‖₂ [N] (Eq. 7), with ε inside the root so that its gradient stays finite."""
    return ((a - b).square().sum(-1) + eps).sqrt()


def cosine_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise 1 − cos(a, b) [N] (the authors' code's NKD)."""
    return 1 - F.cosine_similarity(a, b, dim=-1, eps=1e-12)


def cpd1(f_users: torch.Tensor, g_pos: torch.Tensor, g_neg: torch.Tensor, raw_order: torch.Tensor) -> torch.Tensor:
    """Per row max(−order(g(i⁺), g(i⁻) | f(u)) · order(i⁺, i⁻ | u), 0) (Eq. 9): [P, d_T] × 3, [P] → [P].
    The definition; MKD.loss computes the same from g's hidden units."""
    return F.relu(-(f_users * (g_pos - g_neg)).sum(-1) * raw_order)


class MKD(nn.Module):
    def __init__(
        self, ctx: KDContext, *, nkd_weight: float = 1.0, cpd_weight: float = 0.1, cpd2_weight: float = 1.0,
        sld_weight: float = 10.0, neighbours: int = 5, alpha: float = 0.5, mask: str = "hard", mix: bool = True,
        experts: int = 5, top_n: int = 50, tau: float = 1.0, parts: tuple[str, ...] | list[str] = PARTS,
        param_weight_decay: float = 1.0, sld: dict | None = None, neighbour_space: str = "cosine", pca_dim: int = 150,
        distance: str = "l2", item_weight: float = 1.0,
    ):
        super().__init__()
        if not parts or set(parts) - set(PARTS):
            raise ValueError(f"kd.mkd.parts = {list(parts)}: expected a non-empty subset of {', '.join(PARTS)}")
        if mask not in ("hard", "soft") or not 0 <= alpha <= 1:
            raise ValueError(f"kd.mkd: mask {mask!r}, alpha {alpha}: expected mask hard or soft and 0 <= alpha <= 1")
        if not 0 < neighbours < min(ctx.n_users, ctx.n_items) or not 0 < top_n <= ctx.n_items or experts < 1:
            raise ValueError(f"kd.mkd: expected 0 < neighbours ({neighbours}) < users and items, 0 < top_n ({top_n}) "
                             f"<= {ctx.n_items} items, experts ({experts}) >= 1")
        if neighbour_space not in ("cosine", "pca") or distance not in ("l2", "cosine") or pca_dim < 1 or item_weight < 0:
            raise ValueError(f"kd.mkd: neighbour_space {neighbour_space!r}, distance {distance!r}, pca_dim {pca_dim}, "
                             f"item_weight {item_weight}: expected cosine or pca, l2 or cosine, pca_dim >= 1, item_weight >= 0")
        if ctx.student_dim is None:
            raise ValueError("kd.mkd: the student's dimension is unknown (KDContext.student_dim)")
        self.ctx, self.parts, self.mix, self.hard, self.alpha = ctx, tuple(parts), mix, mask == "hard", alpha
        self.weights = {"nkd": nkd_weight, "cpd": cpd_weight, "cpd2": cpd2_weight, "sld": sld_weight}
        self.tau, self.param_weight_decay, self.item_weight = tau, param_weight_decay, item_weight
        self.distance = l2_distance if distance == "l2" else cosine_distance
        self.normalised = distance == "cosine"
        self.wants = ("pairs", "user_table")
        teacher_users, teacher_items = ctx.teacher.factors()  # [U, d_T], [I, d_T]
        self.teacher_users, self.teacher_items = teacher_users, teacher_items
        with own_initialisation(ctx.seed, "mkd"):  # the projectors' initial weights follow the run's seed only
            self.f = Projector(ctx.student_dim, teacher_users.shape[1], experts)
            self.g = Projector(ctx.student_dim, teacher_users.shape[1], experts)
        near = cosine_neighbours if neighbour_space == "cosine" else lambda v, k, c: pca_neighbours(v, k, pca_dim, c)
        self.user_neighbours = near(teacher_users, neighbours, ctx.chunk)  # [U, K], once (Eq. 2)
        self.item_neighbours = near(teacher_items, neighbours, ctx.chunk)  # [I, K]
        self.top = ctx.teacher.topk(top_n, exclude=ctx.train)[0] if "cpd" in parts else None  # [U, N]
        if self.top is not None:  # the items in some user's top-N (CiteULike-t, MF-400 teacher: 14,742 of 25,181)
            self.top_items, self.top_at = torch.unique(self.top, return_inverse=True)  # [T]; [U, N], top's places in it
        self.sld = SLD(ctx, **(sld or {})) if "sld" in parts else None

    @torch.no_grad()
    def prepare_epoch(self, student: nn.Module, generator: torch.Generator) -> dict[str, float]:
        return self.sld.prepare_epoch(student, generator) if self.sld is not None else {}

    def mixed(self, ids: torch.Tensor, student_table: torch.Tensor, teacher_table: torch.Tensor,
              neighbours: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(K-Mix(e^S) [N, d_S], K-Mix(e^T) [N, d_T]) of entities `ids`; the plain vectors without mix."""
        own_s, own_t = student_table[ids], teacher_table[ids]
        if not self.mix:
            return own_s, own_t
        pick = torch.randint(neighbours.shape[1], (len(ids), 1), device=ids.device)
        other = neighbours[ids].gather(1, pick).squeeze(1)  # [N] one neighbour per entity, both sides
        draw = lambda like: (torch.rand_like(like) < self.alpha).to(like.dtype) if self.hard else torch.rand_like(like) * self.alpha
        return k_mix(own_s, student_table[other], draw(own_s)), k_mix(own_t, teacher_table[other], draw(own_t))

    def loss(
        self, users: torch.Tensor, user_vecs: torch.Tensor, item_table: torch.Tensor, *,
        pairs: tuple[torch.Tensor, torch.Tensor, torch.Tensor], items: torch.Tensor, user_table: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        inverse, pos, neg = pairs  # [P] each
        n_rows = len(pos)
        zero = user_vecs.new_zeros(())
        parts = {"nkd": zero, "cpd1": zero, "cpd2": zero, "flip": zero, "sld": zero}
        kd = user_vecs.new_zeros(len(users))  # [B]
        if "nkd" in self.parts:
            # user_table's rows of the batch users are user_vecs' (one forward), so either carries the gradient
            mixed_user = self.mixed(users, user_table, self.teacher_users, self.user_neighbours)
            mixed_item = self.mixed(items, item_table, self.teacher_items, self.item_neighbours)
            parts["nkd"] = (self.distance(self.f(mixed_user[0]), mixed_user[1]).sum()
                            + self.item_weight * self.distance(self.g(mixed_item[0]), mixed_item[1]).sum()) / n_rows
        if "cpd" in self.parts:
            # f(u)·g(i) = (aᵤ · hᵢ + cᵤ) / M with hᵢ = g's hidden units, aᵤ = Wᵀ f(u), cᵤ = b · f(u): g's first
            # layer only (not its d_T-wide output), and only on the rows' items and the items of some user's
            # top-N, not on the item table: the same function (tested); the cosine option needs each ‖g(i)‖,
            # so there g's output runs on those items
            frozen_users, frozen_items = user_vecs.detach(), item_table.detach()
            f_users = self.f(frozen_users)  # [B, d_T]
            weight, bias = self.g.output_layer()
            h_pos, h_neg = self.g.hidden(frozen_items[pos]), self.g.hidden(frozen_items[neg])  # [P, M·h]
            h_top, top_at = self.g.hidden(frozen_items[self.top_items]), self.top_at[users]  # [T, M·h], [B, N]
            raw_order = (frozen_users[inverse] * (frozen_items[pos] - frozen_items[neg])).sum(-1)  # [P]
            if self.normalised:  # the code's: every score after the projectors a cosine (CPD1, flip and CPD2)
                g_hat = lambda h: F.normalize((h @ weight.T + bias) / len(self.g.experts), dim=-1)  # noqa: E731
                f_hat = F.normalize(f_users, dim=-1)
                projected_order = (f_hat[inverse] * (g_hat(h_pos) - g_hat(h_neg))).sum(-1)
                projected = pair_scores(f_hat, g_hat(h_top), top_at)
            else:
                a, c, m = f_users @ weight, f_users @ bias, len(self.g.experts)  # [B, M·h], [B]
                projected_order = (a[inverse] * (h_pos - h_neg)).sum(-1) / m  # order(g(i⁺), g(i⁻) | f(u)), biases cancel
                projected = (pair_scores(a, h_top, top_at) + c[:, None]) / m  # r^{S'} = f(u)·g(i)
            parts["cpd1"] = F.relu(-projected_order * raw_order).sum() / n_rows
            parts["flip"] = (projected_order * raw_order < 0).float().mean().detach()  # Eq. 25's share, reported only
            target = pair_scores(frozen_users, frozen_items, self.top[users])  # r^S, the student before the projectors
            parts["cpd2"] = soft_ce(target, projected, tau=self.tau).sum() / n_rows
        if self.sld is not None:
            parts["sld"] = self.sld.loss(users, user_vecs, item_table)["kd"]  # [B]
            kd = kd + self.weights["sld"] * parts["sld"]
        w = self.weights
        kd = kd + w["nkd"] * parts["nkd"] + w["cpd"] * (parts["cpd1"] + w["cpd2"] * parts["cpd2"])
        shown = lambda name: (name.rstrip("12") if name != "flip" else "cpd") in self.parts  # noqa: E731
        return {"kd": kd, **{name: value.mean() for name, value in parts.items() if shown(name)}}
