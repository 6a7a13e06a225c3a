"""RCE-KD (Zhu & Zhang, ICLR 2026, §5): split the teacher's top items by whether the student ranks
them in its own top-K, distil each part with its own CE, and mix the two per user.

Per epoch, from the student's full ranking:
  Q^S = student top-K; (Q^T)_1 = Q^T ∩ Q^S; (Q^T)_2 = Q^T \\ Q^S.
  L1 = CE on Q^S.
  z_j = #{i ∈ (Q^T)_2 : the student ranks j above i}; draw L items with p_j ∝ exp(z_j / T_s) (z is
  constant between consecutive (Q^T)_2 scores: a draw picks a bucket, then an item in it; `draw_by_z`);
  A^u = (Q^T)_2 ∪ sampled; L2 = CE on A^u.
  γ_u = exp(−β · |(Q^T)_1| / K); L_KD = (1 − γ_u) L1 + γ_u L2.
The authors' code differs in places (../shared/docs/METHODS.md §5); each is an option, default off:
  sampling="code": pool = the student's top-M positions, without replacement, z counting all of Q^T
  and capped at z_cap; gamma_from="sampled": γ from |Q^T ∩ sampled| / K; keep_train_items: the
  user's training items stay in the teacher's and student's lists.
Ablations (paper §6.4, App. C.5), options too: variant = wo_sep (one CE on A^u ∪ Q^S), wo_s (CE on
Q^T only), wo_t (CE on Q^S only); gamma_shape = linear (γ_u = 1 − s_u) instead of exponential;
gamma_schedule = constant (γ = gamma_value), decreasing (global γ from 1 to 0 over schedule_epochs)
or increasing (0 to 1) instead of per_user.
One top-(K + L) of each chunk of the student's scores gives Q^S (its first K, ties as topk orders
them) and the top-|A^u| lists of a_overlap.
Logged per epoch: overlap = mean s_u; a_overlap = the mean share of A^u that the student ranks in its own
top-|A^u| (paper Table 7: how well the sampled set stands in for the items the student puts first).
"""

from __future__ import annotations

import torch
from torch import nn

from rcekd.evaluate import score_chunks
from rcekd.kd.common import KDContext, pair_scores, soft_ce


def rank_above_counts(scores: torch.Tensor, ref_items: torch.Tensor, ref_mask: torch.Tensor) -> torch.Tensor:
    """z [B, I]: for each item j, how many reference items i (where ref_mask) score strictly below j.

    "The student ranks j above i" for i ∈ (Q^T)_2 is s_j > s_i, so z_j counts those i.
    """
    ref_scores = scores.gather(1, ref_items).masked_fill(~ref_mask, float("inf"))  # [B, K]
    return torch.searchsorted(ref_scores.sort(1).values, scores.contiguous(), side="left", out_int32=True)


def ordered_keys(values: torch.Tensor) -> torch.Tensor:
    """float32 → int64 in [0, 2^32) with the same order (−0.0 taken as +0.0, as `<` does; no NaN)."""
    bits = (values + 0.0).view(torch.int32).long()
    return torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits) + 2**31


def in_lists(items: torch.Tensor, members: torch.Tensor, members_mask: torch.Tensor | None = None) -> torch.Tensor:
    """items [B, N], members [B, M] → [B, N] bool: is items[b, n] among members[b, m] (where members_mask)?
    By direct comparison: cheaper than an |I|-wide table when N·M ≪ |I|, as here (K, L ≤ a few hundred)."""
    equal = items[:, :, None] == members[:, None, :]  # [B, N, M]
    if members_mask is not None:
        equal &= members_mask[:, None, :]
    return equal.any(2)


def draw_by_z(
    scores: torch.Tensor,
    ref_items: torch.Tensor,
    ref_mask: torch.Tensor,
    table: torch.Tensor,
    n: int,
    n_excluded: torch.Tensor,
    generator: torch.Generator,
) -> torch.Tensor:
    """[B, n] items drawn with replacement, p_j ∝ table[z_j] over each row's eligible items j (finite
    score, not a reference item), z_j = the number of reference items (where ref_mask) scoring strictly
    below j, as `rank_above_counts` counts them.

    z is constant between consecutive reference scores, so no |I|-wide weight row is needed:
    - the items above the row's lowest reference score (z >= 1; about 12% of CiteULike's items for a
      trained student) are listed with their z (a binary search), and a draw that falls there picks
      one by its weight through one cumulative sum of the listed weights (float64);
    - bucket 0 (z = 0: at or below the lowest reference score) carries n_0 · table[0]; a draw that
      falls there takes a uniform item of the bucket, by rejection (a uniform item, kept when in the
      bucket; 4 tries at once) when the bucket holds at least a quarter of the items, else from a list
      of the bucket.
    scores [B, I] with excluded items at -inf, `n_excluded` [B] of them per row; ref_items, ref_mask
    [B, K]; table [K + 1].
    """
    n_rows, n_items = scores.shape
    device = scores.device
    ref = scores.gather(1, ref_items).masked_fill(~ref_mask, float("inf")).sort(1).values  # [B, K]
    low = ref[:, :1]  # [B, 1] the lowest reference score; +inf when the row has none (every z is 0)
    above = scores > low  # [B, I]: z >= 1
    refs_above = (above.gather(1, ref_items) & ref_mask).sum(1)  # [B]
    above.scatter_(1, ref_items, above.gather(1, ref_items) & ~ref_mask)  # reference items are never drawn
    rows, cols = torch.nonzero(above, as_tuple=True)  # row-major: each row's listed items side by side
    bounds = torch.searchsorted(rows, torch.arange(n_rows + 1, device=device))  # [B + 1] each row's segment
    first, last = bounds[:-1], bounds[1:]
    refs_low = ((ref == low) & (ref > float("-inf"))).sum(1)  # reference items in bucket 0 (ties with the lowest)
    n_zero = n_items - (last - first) - refs_above - n_excluded - refs_low  # [B] eligible items of bucket 0

    offsets = torch.arange(n_rows, device=device)[:, None] * 2**32
    ref_keys = (ordered_keys(ref) + offsets).flatten()  # sorted: rows in order, each sorted
    z = torch.searchsorted(ref_keys, ordered_keys(scores[rows, cols]) + rows * 2**32) - rows * ref.shape[1]
    cumulative = torch.zeros(len(z) + 1, dtype=torch.float64, device=device)  # [N + 1] listed weights' running sum
    torch.cumsum(table[z].double(), 0, out=cumulative[1:])
    zero_weight = float(table[0])
    zero_mass = n_zero.double() * zero_weight  # [B]
    total = zero_mass + cumulative[last] - cumulative[first]
    if bool((total <= 0).any()):
        raise ValueError("RCE-KD sampling: a user has no item to draw (every item excluded or in (Q^T)_2)")
    u = torch.rand(n_rows, n, generator=generator, dtype=torch.float64, device=device) * total[:, None]
    in_zero = u < zero_mass[:, None]  # [B, n]
    index = torch.searchsorted(cumulative[1:], u - zero_mass[:, None] + cumulative[first][:, None], right=True)
    index = torch.minimum(torch.maximum(index, first[:, None]), (last - 1).clamp(min=0)[:, None])
    drawn = cols[index.clamp(max=len(cols) - 1)] if len(cols) else torch.zeros_like(index)

    listed_zero = n_zero < n_items // 4  # [B] bucket 0 too small for rejection: list it
    pending_rows, pending_cols = torch.nonzero(in_zero & ~listed_zero[:, None], as_tuple=True)
    while len(pending_rows):  # each pending draw: the first of 4 uniform items that lies in bucket 0
        candidates = torch.randint(n_items, (len(pending_rows), 4), generator=generator, device=device)
        values = scores[pending_rows[:, None], candidates]  # [P, 4]
        bound = low[pending_rows]  # [P, 1]
        ok = (values < bound) & (values > float("-inf"))
        tie = values == bound  # only a tie with the lowest reference score can be a reference item itself
        if bool(tie.any()):
            at, tries = torch.nonzero(tie, as_tuple=True)
            row = pending_rows[at]
            is_ref = ((ref_items[row] == candidates[at, tries][:, None]) & ref_mask[row]).any(1)
            ok[at, tries] = ~is_ref
        found = ok.any(1)
        chosen = candidates.gather(1, ok.to(torch.uint8).argmax(1, keepdim=True)).squeeze(1)  # the first accepted
        drawn[pending_rows, pending_cols] = torch.where(found, chosen, drawn[pending_rows, pending_cols])
        pending_rows, pending_cols = pending_rows[~found], pending_cols[~found]
    if bool(listed_zero.any()):
        small = torch.nonzero(listed_zero).squeeze(1)  # [S]
        sub = scores[small]
        below = (sub <= low[small]) & (sub > float("-inf"))
        below.scatter_(1, ref_items[small], below.gather(1, ref_items[small]) & ~ref_mask[small])
        below_rows, below_cols = torch.nonzero(below, as_tuple=True)
        below_first = torch.searchsorted(below_rows, torch.arange(len(small), device=device))  # [S]
        rank = torch.minimum((u[small] / zero_weight).long(), (n_zero[small, None] - 1).clamp(min=0))  # uniform in bucket 0
        position = (below_first[:, None] + rank).clamp(max=max(len(below_cols) - 1, 0))
        pick = below_cols[position] if len(below_cols) else drawn[small]
        drawn[small] = torch.where(in_zero[small], pick, drawn[small])
    return drawn


def mixing_weight(overlap: torch.Tensor, *, beta: float, shape: str = "exponential") -> torch.Tensor:
    """γ_u = exp(−β · s_u) (or 1 − s_u when linear) with s_u the overlap share in [0, 1]."""
    return torch.exp(-beta * overlap) if shape == "exponential" else 1.0 - overlap


def scheduled_gamma(schedule: str, epoch: int, *, epochs: int, value: float) -> float:
    """The global γ of a schedule at `epoch` (1-based): constant, or linear over `epochs` epochs."""
    progress = min((epoch - 1) / max(epochs - 1, 1), 1.0)
    return {"constant": value, "decreasing": 1.0 - progress, "increasing": progress}[schedule]


def top_share(top: torch.Tensor, items: torch.Tensor, valid: torch.Tensor, n_items: int) -> torch.Tensor:
    """[B]: the share of each row's valid items that the student ranks in its own top-|row| (paper Table 7).

    top [B, >= N]: the student's items, best first; items [B, N], valid [B, N]; a row with no valid item gives 0.
    """
    size = valid.sum(1)  # [B]
    top = top[:, : items.shape[1]]
    in_top = in_lists(items, top, members_mask=torch.arange(items.shape[1], device=items.device) < size[:, None])
    return (in_top & valid).sum(1) / size.clamp(min=1)


def dedupe_rows(items: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mask repeats within each row: keep the first occurrence of each item. Returns the new mask."""
    order = items.sort(dim=1, stable=True)
    repeat = torch.zeros_like(valid)
    repeat[:, 1:] = order.values[:, 1:] == order.values[:, :-1]
    keep = torch.empty_like(valid)
    keep.scatter_(1, order.indices, ~repeat)
    return valid & keep


class RCEKD:
    resume_attrs = ("epoch",)  # kept between epochs (γ's schedule)

    def __init__(
        self,
        ctx: KDContext,
        *,
        k: int,
        l: int,
        beta: float,
        tau: float = 1.0,
        sample_temperature: float = 10.0,
        sampling: str = "paper",
        pool_top_m: int = 200,
        z_cap: float = 50.0,
        gamma_from: str = "overlap",
        keep_train_items: bool = False,
        variant: str = "full",
        gamma_shape: str = "exponential",
        gamma_schedule: str = "per_user",
        gamma_value: float = 0.5,
        schedule_epochs: int = 100,
    ):
        for name, value, allowed in (
            ("variant", variant, ("full", "wo_sep", "wo_s", "wo_t")),
            ("gamma_shape", gamma_shape, ("exponential", "linear")),
            ("gamma_schedule", gamma_schedule, ("per_user", "constant", "decreasing", "increasing")),
        ):
            if value not in allowed:
                raise ValueError(f"kd.rcekd.{name} = {value!r}: expected one of {', '.join(allowed)}")
        if not 0 <= gamma_value <= 1:
            raise ValueError(f"kd.rcekd.gamma_value = {gamma_value}: expected 0..1")
        self.variant, self.gamma_shape, self.gamma_schedule = variant, gamma_shape, gamma_schedule
        self.gamma_value, self.schedule_epochs, self.epoch = gamma_value, schedule_epochs, 0
        if sampling not in ("paper", "code"):
            raise ValueError(f"kd.rcekd.sampling = {sampling!r}: expected 'paper' or 'code'")
        if gamma_from not in ("overlap", "sampled"):
            raise ValueError(f"kd.rcekd.gamma_from = {gamma_from!r}: expected 'overlap' or 'sampled'")
        if sampling == "code" and not l <= pool_top_m <= ctx.n_items:
            raise ValueError(f"kd.rcekd.pool_top_m = {pool_top_m}: expected l ({l}) <= pool_top_m <= {ctx.n_items}")
        self.ctx = ctx
        self.k, self.l, self.beta, self.tau = k, l, beta, tau
        self.sample_temperature = sample_temperature
        self.sampling, self.pool_top_m, self.z_cap = sampling, pool_top_m, z_cap
        self.gamma_from = gamma_from
        self.exclude = [] if keep_train_items else [ctx.train]
        self.teacher_items, teacher_logits = ctx.teacher.topk(k, exclude=None if keep_train_items else ctx.train)  # Q^T [U, K]
        self.teacher_logits = teacher_logits if variant == "wo_s" else None

    @torch.no_grad()
    def prepare_epoch(self, student: nn.Module, generator: torch.Generator) -> dict[str, float]:
        ctx, k, l = self.ctx, self.k, self.l
        self.epoch += 1
        if self.variant == "wo_s":  # CE on the fixed Q^T: nothing to prepare
            return {}
        self.student_items = torch.empty(ctx.n_users, k, dtype=torch.long, device=ctx.device)  # Q^S
        self.student_teacher_logits = torch.empty(ctx.n_users, k, device=ctx.device)
        self.set_items = torch.empty(ctx.n_users, k + l, dtype=torch.long, device=ctx.device)  # A^u
        self.set_mask = torch.empty(ctx.n_users, k + l, dtype=torch.bool, device=ctx.device)
        self.set_teacher_logits = torch.empty(ctx.n_users, k + l, device=ctx.device)
        self.gamma = torch.empty(ctx.n_users, device=ctx.device)
        overlap_sum = a_overlap_sum = 0.0
        for start, end, scores in score_chunks(student, ctx.n_users, exclude=self.exclude, chunk=ctx.chunk, device=ctx.device):
            qt = self.teacher_items[start:end]  # [b, K]
            top = scores.topk(k + l, dim=1).indices  # [b, K + L]: the student's best items, best first
            qs = top[:, :k]  # Q^S (ties: as topk orders them)
            in_qs = in_lists(qt, qs)  # (Q^T)_1 where True, (Q^T)_2 where False
            sampled, sampled_ok = self._sample(scores, start, end, qt, ~in_qs, generator)  # [b, L]
            overlap = in_qs.float().mean(1)
            if self.gamma_from == "sampled":
                overlap = in_lists(qt, sampled).float().mean(1)
            a_items = torch.cat([qt, sampled], 1)  # [b, K + L]
            teacher_logits = ctx.teacher.take(start, end, torch.cat([qs, a_items], 1))  # [b, 2K + L]
            self.student_items[start:end] = qs
            self.student_teacher_logits[start:end] = teacher_logits[:, :k]
            self.set_items[start:end] = a_items
            self.set_mask[start:end] = torch.cat([~in_qs, sampled_ok], 1)
            self.set_teacher_logits[start:end] = teacher_logits[:, k:]
            self.gamma[start:end] = mixing_weight(overlap, beta=self.beta, shape=self.gamma_shape)
            overlap_sum += float(in_qs.float().mean(1).sum())
            a_overlap_sum += float(top_share(top, a_items, self.set_mask[start:end], ctx.n_items).sum())
        if self.gamma_schedule != "per_user":
            self.gamma.fill_(scheduled_gamma(self.gamma_schedule, self.epoch, epochs=self.schedule_epochs, value=self.gamma_value))
        n = ctx.n_users
        return {"overlap": overlap_sum / n, "a_overlap": a_overlap_sum / n, "gamma": float(self.gamma.mean())}

    def _sample(
        self, scores: torch.Tensor, start: int, end: int, qt: torch.Tensor, q2: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw L items per user with p_j ∝ exp(z_j / T_s); returns items [b, L] and a validity mask."""
        if self.sampling == "paper":
            excluded = sum((known.counts[start:end] for known in self.exclude), torch.zeros(end - start, dtype=torch.long, device=scores.device))
            sampled = draw_by_z(scores, qt, q2, self._exp_table(q2.shape[1]), self.l, excluded, generator)
            return sampled, dedupe_rows(sampled, torch.ones_like(sampled, dtype=torch.bool))
        pool = scores.topk(self.pool_top_m, dim=1)  # the student's top-M positions
        z = rank_above_counts(scores, qt, torch.ones_like(q2)).gather(1, pool.indices).clamp(max=self.z_cap)
        picks = torch.multinomial(torch.exp(z / self.sample_temperature), self.l, replacement=False, generator=generator)
        sampled = pool.indices.gather(1, picks)  # distinct; those in (Q^T)_2 are already in A^u
        # a user with fewer than M non-training items has training items (−inf) in the pool: drop them
        known = torch.isneginf(pool.values.gather(1, picks))
        return sampled, ~in_lists(sampled, qt, members_mask=q2) & ~known

    def _exp_table(self, k: int) -> torch.Tensor:
        return torch.exp(torch.arange(k + 1, dtype=torch.float32, device=self.ctx.device) / self.sample_temperature)

    def loss(self, users: torch.Tensor, user_vecs: torch.Tensor, item_table: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.variant == "wo_s":
            student = pair_scores(user_vecs, item_table, self.teacher_items[users])
            return {"kd": soft_ce(self.teacher_logits[users], student, tau=self.tau)}
        if self.variant == "wo_sep":  # one CE on A^u ∪ Q^S ((Q^T)_2 never meets Q^S; sampled items may)
            items = torch.cat([self.student_items[users], self.set_items[users]], 1)
            valid = torch.cat([torch.ones_like(self.student_items[users], dtype=torch.bool), self.set_mask[users]], 1)
            teacher = torch.cat([self.student_teacher_logits[users], self.set_teacher_logits[users]], 1)
            student = pair_scores(user_vecs, item_table, items)
            return {"kd": soft_ce(teacher, student, mask=dedupe_rows(items, valid), tau=self.tau)}
        l1 = soft_ce(
            self.student_teacher_logits[users],
            pair_scores(user_vecs, item_table, self.student_items[users]),
            tau=self.tau,
        )
        l2 = soft_ce(
            self.set_teacher_logits[users],
            pair_scores(user_vecs, item_table, self.set_items[users]),
            mask=self.set_mask[users],
            tau=self.tau,
        )
        if self.variant == "wo_t":
            return {"kd": l1, "l1": l1.mean()}
        gamma = self.gamma[users]
        return {"kd": (1 - gamma) * l1 + gamma * l2, "l1": l1.mean(), "l2": l2.mean()}
