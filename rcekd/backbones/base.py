"""What every backbone offers the one training loop, and the pairwise BPR objective of MF and LightGCN.

A backbone maps a batch of users to user vectors and gives an item table (`encode`), so a score is a
dot product. It is bound once to the training pairs (`bind`) for what it derives from them (the
graph, the sequences), then trained through `training_batches` (all randomness, from the loop's
generator) and `batch_loss` (one forward, whose user vectors and item table the distillation loss
reuses). Whatever only the host can size (a batch's unique users, its sequences' length groups) is
worked out for the whole epoch in `training_batches`, so that a step never waits for the device
(tests/test_sync_guard.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from rcekd.sparse import UserItems


@dataclass
class Step:
    """One batch's forward: the base loss and what a distillation method needs."""

    base: torch.Tensor  # scalar
    users: torch.Tensor  # [B] unique users of the batch
    user_vecs: torch.Tensor  # [B, D]
    item_table: torch.Tensor  # [I, D]
    rows: torch.Tensor  # [B] training rows (pairs or positions) of each user in the batch
    # for methods that want them (KDMethod.wants), pairwise backbones only:
    pairs: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # [P] each: row's index into users, i⁺, i⁻
    items: torch.Tensor | None = None  # [J] the batch's unique items (i⁺ ∪ i⁻), sorted
    user_table: torch.Tensor | None = None  # [U, D] every user's vector, from this forward (`full_user_table`)


class Backbone(nn.Module):
    def __init__(self, n_users: int, n_items: int):
        super().__init__()
        self.n_users, self.n_items = n_users, n_items
        self.train_pairs: np.ndarray | None = None
        self.full_user_table = False  # set by the loop for a method that reads Step.user_table

    def bind(self, train: np.ndarray) -> "Backbone":
        """Attach the training pairs ([P, 2] user, item; each user's rows in time order)."""
        if len(train) and (train[:, 0].max() >= self.n_users or train[:, 1].max() >= self.n_items):
            raise ValueError(f"{type(self).__name__}: training pairs exceed {self.n_users} users / {self.n_items} items")
        self.train_pairs = train
        self._known = self._pairs = None  # the negatives' tables of the pairs bound before, if any
        return self

    def _bound(self) -> np.ndarray:
        if self.train_pairs is None:
            raise RuntimeError(f"{type(self).__name__} needs its training pairs: call bind(splits.train) first")
        return self.train_pairs

    def _device(self) -> torch.device:
        return next(self.parameters()).device

    def encode(self, users: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def training_batches(self, batch_size: int, generator: torch.Generator) -> Iterator[tuple]:
        raise NotImplementedError

    def batch_loss(self, batch: tuple, *, weight_decay: float) -> Step:
        raise NotImplementedError


def sample_negatives(users: torch.Tensor, known: UserItems, generator: torch.Generator) -> torch.Tensor:
    """One uniform item per user that is not among the user's known items (vectorised rejection)."""
    negatives = torch.randint(known.n_items, users.shape, generator=generator, device=users.device)
    bad = known.contains(users, negatives)
    while bad.any():
        negatives[bad] = torch.randint(known.n_items, (int(bad.sum()),), generator=generator, device=users.device)
        bad[bad.clone()] = known.contains(users[bad], negatives[bad])
    return negatives


def bpr_loss(
    user_vecs: torch.Tensor,
    pos_vecs: torch.Tensor,
    neg_vecs: torch.Tensor,
    *,
    weight_decay: float,
    ego: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Mean over batch rows of −log σ(s(u,i⁺) − s(u,i⁻)) + weight_decay/2 · (‖e_u‖² + ‖e_i⁺‖² + ‖e_i⁻‖²).

    The L2 penalty acts on the rows a batch uses (the usual BPR practice), on the `ego` (layer-0)
    embeddings when given (LightGCN), else on the scored vectors. Adam's own coupled weight decay
    would shrink every row absent from a batch at full learning-rate speed.
    """
    ranking = -F.logsigmoid((user_vecs * (pos_vecs - neg_vecs)).sum(-1))
    u, p, n = ego if ego is not None else (user_vecs, pos_vecs, neg_vecs)
    l2 = u.square().sum(-1) + p.square().sum(-1) + n.square().sum(-1)
    return (ranking + 0.5 * weight_decay * l2).mean()


class PairBatch(NamedTuple):
    """A batch of training pairs with its unique users worked out ahead (per epoch, in `training_batches`),
    so that a step needs no `unique` or `bincount`, whose output sizes only the host could learn."""

    users: torch.Tensor  # [P_b] the user of each pair
    pos: torch.Tensor  # [P_b] its training item
    neg: torch.Tensor  # [P_b] its negative
    batch_users: torch.Tensor  # [U_b] the batch's unique users, sorted
    inverse: torch.Tensor  # [P_b] each pair's index into batch_users
    counts: torch.Tensor  # [U_b] pairs of each unique user
    batch_items: torch.Tensor  # [J_b] the batch's unique items (positives and negatives), sorted


class PairwiseBPR(Backbone):
    """Training over the training pairs, one uniform non-training negative per pair, resampled per epoch."""

    def _ego(self, users: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor) -> tuple | None:
        return None  # the scored vectors are the embeddings (MF)

    def training_batches(self, batch_size: int, generator: torch.Generator) -> Iterator[PairBatch]:
        device = self._device()
        if getattr(self, "_known", None) is None or self._known.items.device != device:
            train = self._bound()
            self._known = UserItems(train, self.n_users, self.n_items, device)
            self._pairs = torch.from_numpy(train).to(device)
        order = torch.randperm(len(self._pairs), generator=generator, device=device)
        negatives = sample_negatives(self._pairs[order, 0], self._known, generator)
        users, pos = self._pairs[order].T  # [P] each, in the epoch's order
        # every batch's unique users at once: one unique over (batch, user) keys, sorted by batch then
        # user, so each batch's slice is its own users.unique() (same order, inverse and counts)
        batch = torch.arange(len(order), device=device) // batch_size
        keys, inverse, counts = torch.unique(batch * self.n_users + users, return_inverse=True, return_counts=True)
        bounds = torch.arange(1, -(-len(order) // batch_size) + 1, device=device) * self.n_users
        ends = torch.searchsorted(keys, bounds).tolist()  # where each batch's keys end: the epoch's host sync
        # and every batch's unique items the same way (for methods that distil item representations)
        item_keys = torch.unique(torch.cat([batch * self.n_items + pos, batch * self.n_items + negatives]))
        item_ends = torch.searchsorted(item_keys, bounds // self.n_users * self.n_items).tolist()
        first = first_item = 0
        for b, lo in enumerate(range(0, len(order), batch_size)):
            hi, last, last_item = lo + batch_size, ends[b], item_ends[b]
            yield PairBatch(
                users[lo:hi], pos[lo:hi], negatives[lo:hi],
                keys[first:last] - b * self.n_users, inverse[lo:hi] - first, counts[first:last],
                item_keys[first_item:last_item] - b * self.n_items,
            )
            first, first_item = last, last_item

    def encode_all_users(self, users: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(`users`' vectors [B, D], the item table [I, D], every user's vector [U, D]) from one forward."""
        user_vecs, item_table = self.encode(users)
        return user_vecs, item_table, self.encode(torch.arange(self.n_users, device=users.device))[0]

    def batch_loss(self, batch: PairBatch, *, weight_decay: float) -> Step:
        users, pos, neg, batch_users, inverse, counts, batch_items = batch
        if self.full_user_table:
            user_vecs, item_table, user_table = self.encode_all_users(batch_users)
        else:
            (user_vecs, item_table), user_table = self.encode(batch_users), None
        base = bpr_loss(
            user_vecs[inverse], item_table[pos], item_table[neg], weight_decay=weight_decay, ego=self._ego(users, pos, neg)
        )
        return Step(base, batch_users, user_vecs, item_table, counts, (inverse, pos, neg), batch_items, user_table)
