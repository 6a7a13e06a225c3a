"""DCD (Lee & Kim, CIKM 2021, Dual Correction strategy for ranking Distillation): RRD plus two
corrections built from the rank gaps between teacher and student, on both sides.

User side (UCD), every `every` epochs: on the teacher's top-M items of u, an item the student ranks
lower than the teacher is under-estimated and drawn with p ∝ tanh(max(μ (rank_S − rank_T), 0)); on the
student's top-M items, one the teacher ranks lower is over-estimated, p ∝ tanh(max(μ (rank_T −
rank_S), 0)). UCD = the RRD list loss of the drawn under-estimated items (teacher order) above the
drawn over-estimated ones. Item side (ICD): the same with the roles of users and items swapped (the
top-M users of each item), on `item_batch` items per step taken in turn from a per-epoch permutation.
L_KD = L_RRD + L_UCD + L_ICD. Training pairs are excluded from every list.

Ranks are looked up in each model's top-`rank_cap` list; anything below counts as rank `rank_cap`
(μ · gap saturates tanh long before, so the cap only bounds memory; it is clamped to the number of
users and items). The item side needs the student
vectors of the listed users, which `student.encode` gives (for LightGCN at the cost of a second
propagation per step); `item_side: false` turns it off.
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch import nn

from rcekd.evaluate import score_chunks
from rcekd.kd.common import KDContext, list_nll, pair_scores, student_top
from rcekd.kd.rrd import RRD


class DCD:
    # kept between epochs (the corrections are redrawn every `every` epochs)
    resume_attrs = ("epoch", "stats", "user_under", "user_under_ok", "user_over", "user_over_ok",
                    "item_under", "item_under_ok", "item_over", "item_over_ok")

    def __init__(
        self, ctx: KDContext, *, m: int = 40, n_under: int = 10, n_over: int = 10, mu: float = 0.1,
        every: int = 5, rank_cap: int = 500, item_side: bool = True, item_batch: int = 512,
        rrd: dict | None = None,
    ):
        rank_cap = min(rank_cap, ctx.n_items, ctx.n_users)  # a list cannot be longer than its population
        if not (0 < n_under <= m and 0 < n_over <= m and m <= rank_cap):
            raise ValueError(
                f"kd.dcd: expected 0 < n_under ({n_under}), n_over ({n_over}) <= m ({m}) <= "
                f"min(rank_cap, items {ctx.n_items}, users {ctx.n_users}) = {rank_cap}"
            )
        unknown = set(rrd or {}) - {"k", "l", "m", "t", "sample"}
        if unknown:
            raise ValueError(f"kd.dcd.rrd: unknown key(s) {sorted(unknown)} (valid: k, l, m, t, sample)")
        self.ctx, self.m, self.n_under, self.n_over, self.mu = ctx, m, n_under, n_over, mu
        self.every, self.rank_cap, self.item_side, self.item_batch = every, rank_cap, item_side, item_batch
        self.rrd = RRD(ctx, **(rrd or {}))
        self.teacher_items, _ = ctx.teacher.topk(rank_cap, exclude=ctx.train)  # [U, R], best first
        if item_side:
            self.teacher_users = top_users(teacher_blocks(ctx), rank_cap)  # [I, R]
        self.epoch = 0

    @torch.no_grad()
    def prepare_epoch(self, student: nn.Module, generator: torch.Generator) -> dict[str, float]:
        self.rrd.prepare_epoch(student, generator)
        self.student, self.epoch = student, self.epoch + 1
        ctx = self.ctx
        if (self.epoch - 1) % self.every == 0:
            student_items, _ = student_top(student, ctx, self.rank_cap)
            self.user_under, self.user_under_ok, self.user_over, self.user_over_ok, under_share = corrections(
                self.teacher_items, student_items, self.m, self.n_under, self.n_over, self.mu, ctx.n_items, generator
            )
            stats = {"under_share": under_share}
            if self.item_side:
                student_users = top_users(score_chunks(student, ctx.n_users, exclude=[ctx.train], chunk=ctx.chunk, device=ctx.device), self.rank_cap)
                self.item_under, self.item_under_ok, self.item_over, self.item_over_ok, _ = corrections(
                    self.teacher_users, student_users, self.m, self.n_under, self.n_over, self.mu, ctx.n_users, generator
                )
            self.stats = stats
        if self.item_side:
            self.item_order = torch.randperm(ctx.n_items, generator=generator, device=ctx.device)
            self.next_item = 0
        return self.stats

    def loss(self, users: torch.Tensor, user_vecs: torch.Tensor, item_table: torch.Tensor) -> dict[str, torch.Tensor]:
        rrd = self.rrd.loss(users, user_vecs, item_table)["kd"]
        listed = pair_scores(user_vecs, item_table, self.user_under[users])
        below = pair_scores(user_vecs, item_table, self.user_over[users]).masked_fill(~self.user_over_ok[users], float("-inf"))
        ucd = list_nll(listed, below, list_mask=self.user_under_ok[users])
        parts = {"rrd": rrd.mean(), "ucd": ucd.mean()}
        kd = rrd + ucd
        if self.item_side:
            icd = self.item_loss(self.take_items(), item_table)
            parts["icd"] = icd
            kd = kd + icd
        return {"kd": kd, **parts}

    def take_items(self) -> torch.Tensor:
        """The next `item_batch` items of this epoch's permutation (wrapping around)."""
        index = (self.next_item + torch.arange(self.item_batch, device=self.item_order.device)) % self.ctx.n_items
        self.next_item += self.item_batch
        return self.item_order[index]

    def item_loss(self, items: torch.Tensor, item_table: torch.Tensor) -> torch.Tensor:
        """ICD over `items`: each item's under-estimated users ranked above its over-estimated ones."""
        under, over = self.item_under[items], self.item_over[items]  # [N, n]
        listed_users = torch.cat([under, over], 1)
        vecs, _ = self.student.encode(listed_users.flatten())  # student user vectors, with gradient
        scores = (vecs.view(*listed_users.shape, -1) * item_table[items][:, None, :]).sum(-1)
        listed, below = scores.split([under.shape[1], over.shape[1]], 1)
        below = below.masked_fill(~self.item_over_ok[items], float("-inf"))
        return list_nll(listed, below, list_mask=self.item_under_ok[items]).mean()


def corrections(
    teacher_lists: torch.Tensor, student_lists: torch.Tensor, m: int, n_under: int, n_over: int, mu: float,
    n_entities: int, generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """Draw each row's under- and over-estimated entries from its two top-R lists (best first).

    Returns under [N, n_under] in teacher order with its mask (weight > 0), over [N, n_over] with
    its mask, and the share of teacher top-M entries that are under-estimated."""
    rank_student = positions_in(student_lists, teacher_lists[:, :m], n_entities)  # of the teacher's top-M
    rank_teacher = positions_in(teacher_lists, student_lists[:, :m], n_entities)  # of the student's top-M
    own = torch.arange(m, device=teacher_lists.device)
    under_w = gap_weight(rank_student - own, mu)
    over_w = gap_weight(rank_teacher - own, mu)
    under_pos, under_ok = draw(under_w, n_under, generator)
    over_pos, over_ok = draw(over_w, n_over, generator)
    return (
        teacher_lists[:, :m].gather(1, under_pos), under_ok,
        student_lists[:, :m].gather(1, over_pos), over_ok,
        float((under_w > 0).float().mean()),
    )


def gap_weight(gap: torch.Tensor, mu: float) -> torch.Tensor:
    """DCD's sampling weight tanh(max(μ · gap, 0))."""
    return torch.tanh((mu * gap.float()).clamp(min=0))


def draw(weights: torch.Tensor, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """n positions per row without replacement, p ∝ weights, in increasing order; a position is
    valid (mask True) when its weight is positive (rows with fewer positive weights pad with others)."""
    picks = torch.multinomial(weights + 1e-12, n, replacement=False, generator=generator).sort(1).values
    return picks, weights.gather(1, picks) > 0


def positions_in(lists: torch.Tensor, entries: torch.Tensor, n_entities: int, chunk: int = 1024) -> torch.Tensor:
    """Position of entries[b, n] in lists[b] (best first), or len(lists[b]) when absent: [B, N]."""
    cap = lists.shape[1]
    out = torch.empty(entries.shape, dtype=torch.long, device=entries.device)
    for start in range(0, len(lists), chunk):
        block = lists[start : start + chunk]
        table = torch.full((len(block), n_entities), cap, dtype=torch.long, device=lists.device)
        table.scatter_(1, block, torch.arange(cap, device=lists.device).expand_as(block))
        out[start : start + chunk] = table.gather(1, entries[start : start + chunk])
    return out


def teacher_blocks(ctx: KDContext) -> Iterator[tuple[int, int, torch.Tensor]]:
    """The teacher's score rows in chunks of users, training pairs at −inf."""
    for start in range(0, ctx.n_users, ctx.chunk):
        end = min(start + ctx.chunk, ctx.n_users)
        block = ctx.teacher.rows(start, end)
        rows, cols = ctx.train.block(start, end)
        block[rows, cols] = float("-inf")
        yield start, end, block


def top_users(blocks: Iterator[tuple[int, int, torch.Tensor]], r: int) -> torch.Tensor:
    """Each item's top-r users [I, r], best first, from score blocks [users of the chunk, I]."""
    best_scores = best_users = None
    for start, _, block in blocks:
        users = torch.arange(start, start + len(block), device=block.device)[:, None].expand_as(block)
        if best_scores is not None:
            block, users = torch.cat([best_scores, block]), torch.cat([best_users, users])
        top = block.topk(min(r, len(block)), dim=0)
        best_scores, best_users = top.values, users.gather(0, top.indices)
    return best_users.T.contiguous()
