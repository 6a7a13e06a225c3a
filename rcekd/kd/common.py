"""Pieces shared by distillation methods: what a method is given, and the soft-label CE."""

from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from rcekd.cache import TeacherCache
from rcekd.evaluate import score_chunks
from rcekd.sparse import UserItems


@dataclass(frozen=True)
class KDContext:
    """Everything a method may read: the teacher cache (and trajectory) and the training items, on one device."""

    teacher: TeacherCache
    train: UserItems
    n_users: int
    n_items: int
    device: torch.device
    chunk: int = 1024
    trajectory: torch.Tensor | None = None  # the teacher's top-K lists at checkpoints [C, U, K] (HetComp)
    # an auxiliary model through the one loop (TaReC's assistant): the student's backbone with its
    # model kwargs overridden, and fit(model, method, label) -> FitResult with the run's options
    build_student: Callable[[dict], nn.Module] | None = None
    fit_student: Callable[[nn.Module, object, str], object] | None = None
    student_dim: int | None = None  # the student's vector size (methods with projectors to the teacher's)
    seed: int = 0  # the run's seed (a method's own initial weights)


def soft_ce(
    teacher_logits: torch.Tensor,
    student_logits: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    tau: float = 1.0,
) -> torch.Tensor:
    """Per-row CE on a set: −Σ_i σ(t/τ)_i · log σ(s/τ)_i over the row's items where mask is True.

    teacher_logits, student_logits, mask: [B, N]. Returns [B]. Rows with an empty set give 0.
    """
    if mask is None:
        return -(F.softmax(teacher_logits / tau, dim=-1) * F.log_softmax(student_logits / tau, dim=-1)).sum(-1)
    empty = ~mask.any(-1)  # [B]
    mask = mask | empty[:, None]  # keep every row finite; empty rows are zeroed at the end
    target = F.softmax(teacher_logits.masked_fill(~mask, float("-inf")) / tau, dim=-1)
    log_pred = F.log_softmax(student_logits.masked_fill(~mask, float("-inf")) / tau, dim=-1)
    terms = torch.where(mask, target * log_pred, torch.zeros_like(log_pred))  # 0 · (−inf) off the set
    return (-terms.sum(-1)).masked_fill(empty, 0.0)


def rows_mask(known: UserItems, users: torch.Tensor) -> torch.Tensor:
    """[n, I] bool: row r marks the items of users[r] (any order, repeats allowed), read from the CSR arrays.

    Its size depends on the users' item counts, which the host learns (a sync): per epoch or at set-up
    only; a training step uses `unique_rows_mask`."""
    counts = known.counts[users]  # [n]
    rows = torch.repeat_interleave(torch.arange(len(users), device=users.device), counts)  # [nnz]
    first = torch.repeat_interleave(known.indptr[users] - (counts.cumsum(0) - counts), counts)
    items = known.items[first + torch.arange(len(rows), device=users.device)]
    mask = torch.zeros(len(users), known.n_items, dtype=torch.bool, device=users.device)
    mask[rows, items] = True
    return mask


def unique_rows_mask(known: UserItems, users: torch.Tensor) -> torch.Tensor:
    """rows_mask(known, users) for distinct `users` (a batch's), with no host sync: every known pair is
    written, those of users outside the batch into a spare row, so no size depends on the batch's data."""
    slot = torch.full((known.n_users,), len(users), dtype=torch.long, device=users.device)
    slot[users] = torch.arange(len(users), device=users.device)  # row of each batch user; others: the spare
    mask = torch.zeros(len(users) + 1, known.n_items, dtype=torch.bool, device=users.device)
    mask[slot[known.users], known.items] = True
    return mask[:-1]


def pair_scores(user_vecs: torch.Tensor, item_table: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
    """Scores of each user against its own item list: [B, D] × items [B, N] → [B, N]."""
    return _PairScores.apply(user_vecs, item_table, items)


CHUNK_ELEMENTS = 1 << 21  # gathered values per block of users in pair_scores (8 MB of float32)


def user_blocks(items: torch.Tensor, width: int) -> list[slice]:
    """Blocks of `items`' rows [B, N] whose gathered rows [b, N, width] hold about CHUNK_ELEMENTS values
    each, and never one user alone (a batch of one takes another matrix-product path on the CPU, whose
    last bits differ): a lone last user joins the block before it."""
    step = max(2, CHUNK_ELEMENTS // max(1, items.shape[1] * width))
    starts = list(range(0, len(items), step))
    if len(starts) > 1 and len(items) - starts[-1] == 1:
        starts.pop()
    return [slice(start, end) for start, end in zip(starts, starts[1:] + [len(items)])]


class _PairScores(torch.autograd.Function):
    """einsum("bd,bnd->bn", user_vecs, item_table[items]) with a hand-written backward: the same
    numbers, bit for bit on the CPU under deterministic algorithms (tested), and cheaper than
    autograd's, whose backward of `item_table[items]` is a sort-based index_put there.
    Users run in blocks (`user_blocks`): a wide table (MKD's projector hidden units, 550–1050 wide)
    is gathered one block at a time, again in the backward, rather than held as [B, N, D]
    (benchmarks/experts.py); score-level methods' tables (D = 20) take one or a few blocks. The blocks
    keep the order of every sum, so on the CPU the numbers do not depend on them (tested)."""

    @staticmethod
    def forward(ctx, user_vecs: torch.Tensor, item_table: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(user_vecs, item_table, items)
        out = user_vecs.new_empty(items.shape)
        for block in user_blocks(items, item_table.shape[1]):
            out[block] = torch.einsum("bd,bnd->bn", user_vecs[block], _rows(item_table, items[block]))
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        user_vecs, item_table, items = ctx.saved_tensors
        want_users, want_table = ctx.needs_input_grad[:2]
        grad_users = torch.empty_like(user_vecs) if want_users else None
        grad_table = torch.zeros_like(item_table) if want_table else None
        for block in user_blocks(items, item_table.shape[1]):
            if want_users:
                grad_users[block] = torch.bmm(grad[block, None, :], _rows(item_table, items[block])).squeeze(1)
            if want_table:
                per_pair = (grad[block, :, None] * user_vecs[block, None, :]).reshape(-1, user_vecs.shape[1])
                flat = items[block].reshape(-1)
                if grad.is_cuda:  # index_add_ is atomic (order-dependent) on CUDA; this path is deterministic
                    grad_table.index_put_((flat,), per_pair, accumulate=True)
                else:  # sequential on CPU, in the same order as autograd's own backward
                    grad_table.index_add_(0, flat, per_pair)
        return grad_users, grad_table, None


def _rows(item_table: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
    """item_table[items] [b, N, D], gathered by index_select."""
    return item_table.index_select(0, items.reshape(-1)).view(*items.shape, item_table.shape[1])


@torch.no_grad()
def student_top(student: nn.Module, ctx: KDContext, k: int, *, exclude_train: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The student's top-k items [U, k] and scores [U, k], best first, from its full ranking."""
    items, scores = [], []
    exclude = [ctx.train] if exclude_train else []
    for _, _, block in score_chunks(student, ctx.n_users, exclude=exclude, chunk=ctx.chunk, device=ctx.device):
        top = block.topk(k, dim=1)
        items.append(top.indices)
        scores.append(top.values)
    return torch.cat(items), torch.cat(scores)


def rank_decay(n: int, temperature: float, device: torch.device, *, offset: float = 0.0) -> torch.Tensor:
    """Sampling weights exp(−(k + offset) / temperature) of ranks k = 0..n−1."""
    return torch.exp(-(torch.arange(n, dtype=torch.float32, device=device) + offset) / temperature)


def sample_positions(
    weights: torch.Tensor, rows: int, n: int, *, replacement: bool, generator: torch.Generator
) -> torch.Tensor:
    """[rows, n] positions drawn from `weights` [M] (or per row [rows, M]); without replacement they
    are distinct within a row and returned in increasing order (the list's own order)."""
    if weights.dim() == 1:
        weights = weights.expand(rows, -1)
    picks = torch.multinomial(weights, n, replacement=replacement, generator=generator)
    return picks if replacement else picks.sort(1).values


def uniform_excluding(
    users: torch.Tensor, n: int, n_items: int, forbidden: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    generator: torch.Generator,
) -> torch.Tensor:
    """[len(users), n] uniform items with forbidden(users, items) False (vectorised rejection)."""
    rows = users[:, None].expand(-1, n)
    items = torch.randint(n_items, rows.shape, generator=generator, device=users.device)
    bad = forbidden(rows, items)
    while bad.any():
        items[bad] = torch.randint(n_items, (int(bad.sum()),), generator=generator, device=users.device)
        bad[bad.clone()] = forbidden(rows[bad], items[bad])
    return items


def sets_of(lists: torch.Tensor, n_items: int) -> UserItems:
    """Row u of lists [U, M] as user u's item set, for membership tests."""
    users = torch.arange(len(lists), device=lists.device)[:, None].expand_as(lists)
    pairs = torch.stack([users.flatten(), lists.flatten()], 1).cpu().numpy()
    return UserItems(pairs, len(lists), n_items, lists.device)


def list_nll(
    list_scores: torch.Tensor, below_scores: torch.Tensor, *, list_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Plackett–Luce negative log-likelihood of ranking the list (in its given order) above `below`:
    −Σ_k [ s_k − log(Σ_{l≥k} exp s_l + Σ_j exp b_j) ] per row (RRD's loss). [B, K], [B, L] → [B].
    Entries with list_mask False are left out of the list."""
    if list_mask is not None:
        list_scores = list_scores.masked_fill(~list_mask, float("-inf"))
    suffix = torch.logcumsumexp(list_scores.flip(1), dim=1).flip(1)  # log Σ_{l≥k} exp s_l
    terms = list_scores - torch.logaddexp(suffix, torch.logsumexp(below_scores, dim=1, keepdim=True))
    if list_mask is not None:
        terms = torch.where(list_mask, terms, torch.zeros_like(terms))
    return -terms.sum(1)


def expert(d_in: int, d_out: int) -> nn.Module:
    """One projector MLP d_in → (d_in + d_out) / 2 → ReLU → d_out (the experts of DE, HTD and MKD's code)."""
    hidden = (d_in + d_out) // 2
    return nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, d_out))


def mixture_of_experts(experts: nn.ModuleList, x: torch.Tensor, choice: torch.Tensor | None = None) -> torch.Tensor:
    """Σ_m choice_m · expert_m(x) for `expert`s (the mean when choice is None): x [N, d_in], choice [N, M]
    → [N, d_out]. Computed as one wide MLP, the experts' hidden units side by side and weighted: two
    matrix products instead of 2M, the same function of the same parameters."""
    first, last = [e[0] for e in experts], [e[2] for e in experts]
    hidden = F.relu(F.linear(x, torch.cat([l.weight for l in first]), torch.cat([l.bias for l in first])))  # [N, M·h]
    if choice is None:
        choice = x.new_full((len(x), len(experts)), 1.0 / len(experts))
    weighted = (hidden.view(len(x), len(experts), -1) * choice[:, :, None]).view(len(x), -1)
    return F.linear(weighted, torch.cat([l.weight for l in last], dim=1)) + choice @ torch.stack([l.bias for l in last])


@contextlib.contextmanager
def own_initialisation(seed: int, name: str) -> Iterator[None]:
    """A method's own parameters created inside are initialised from `seed` and `name` only: torch's CPU
    generator is seeded with a number derived from both (so not the student's stream, which starts from
    `seed` itself) and restored afterwards; no CUDA generator is touched (modules start on the CPU)."""
    derived = int.from_bytes(hashlib.sha256(f"{name}:{seed}".encode()).digest()[:8], "little")
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(derived)
        yield
