"""What the sequence backbones (HSTU, SASRec) share: each user's window of training items in time order
(the last `max_len`, left-padded), batches of users run in length groups, and the user vector as the
output at the window's last position.

A batch runs in length groups: its sequences are grouped by window length (powers of two, from
MIN_WINDOW) and each group runs over its own longest window only. A backbone whose blocks never let
left padding change a real position's output (both of ours, tested) computes the padded batch this way
without its padding (CiteULike's windows average 16 of 100 positions).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import numpy as np
import torch

from rcekd.backbones.base import Backbone


def last_items(train: np.ndarray, n_users: int, max_len: int, pad: int) -> np.ndarray:
    """[U, max_len] each user's last max_len training items in row order, left-padded with `pad`."""
    users = train[:, 0]
    order = np.argsort(users, kind="stable")  # keeps each user's time order
    users, items = users[order], train[order, 1]
    counts = np.bincount(users, minlength=n_users)
    end = np.cumsum(counts)
    from_end = end[users] - np.arange(len(users)) - 1  # 0 for a user's last item
    keep = from_end < max_len
    out = np.full((n_users, max_len), pad, dtype=np.int64)
    out[users[keep], max_len - 1 - from_end[keep]] = items[keep]
    return out


MIN_WINDOW = 4  # the shortest group window; a group of window w holds the lengths in (w / 2, w]


class Groups(NamedTuple):
    """A batch of sequences in length groups (worked out per epoch, so that a step needs no host sync)."""

    order: torch.Tensor  # [B] the batch's rows, group after group
    inverse: torch.Tensor  # [B] where each row went: grouped[inverse] is the batch's order
    sizes: tuple[tuple[int, int], ...]  # (rows, window) of each group, in order


def length_groups(lengths: torch.Tensor, batch_size: int, max_len: int) -> list[Groups]:
    """`Groups` of each consecutive `batch_size` rows of `lengths` [N] (window lengths): rows ordered by
    group, stably; a group's window is its longest length (at least 1). One host sync for all batches."""
    device = lengths.device
    edges = torch.tensor([MIN_WINDOW << i for i in range(max(max_len // MIN_WINDOW, 1).bit_length())], device=device)
    n_bins, n_batches = len(edges) + 1, -(-len(lengths) // batch_size)
    key = torch.arange(len(lengths), device=device) // batch_size * n_bins + torch.bucketize(lengths, edges)
    order = torch.argsort(key, stable=True)  # each batch's rows stay in its own slice
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(len(order), device=device)
    counts = torch.bincount(key, minlength=n_batches * n_bins).tolist()
    longest = torch.zeros(n_batches * n_bins, dtype=lengths.dtype, device=device).scatter_reduce(0, key, lengths, reduce="amax").tolist()
    out = []
    for b, lo in enumerate(range(0, len(lengths), batch_size)):
        bins = range(b * n_bins, (b + 1) * n_bins)
        sizes = tuple((counts[i], max(longest[i], 1)) for i in bins if counts[i])
        out.append(Groups(order[lo : lo + batch_size] - lo, inverse[lo : lo + batch_size] - lo, sizes))
    return out


def group_windows(seq: torch.Tensor, groups: Groups) -> list[torch.Tensor]:
    """Each group's rows of `seq` [B, L] (rows in group order) over the group's own last `window` positions."""
    parts, start = [], 0
    for rows, window in groups.sizes:
        parts.append(seq[start : start + rows, seq.shape[1] - window :])
        start += rows
    return parts


def lookup(embed: Callable[[torch.Tensor], torch.Tensor], parts: list[torch.Tensor]) -> list[torch.Tensor]:
    """embed(part) [..., D] of every part, as one call: one table-sized gradient per batch in the backward
    pass instead of one per part (it was most of a CPU step: benchmarks/README.md, hstu_epoch)."""
    flat = embed(torch.cat([part.reshape(-1) for part in parts]))
    return [rows.view(*part.shape, -1) for rows, part in zip(flat.split([part.numel() for part in parts]), parts)]


class SequenceBatch(NamedTuple):
    users: torch.Tensor  # [B] sorted
    negatives: torch.Tensor  # HSTU: [N] uniform items shared by the batch; SASRec: [B, max_len] one per position
    groups: Groups


class SequenceBackbone(Backbone):
    """A backbone over each user's window of training items. Subclasses give `grouped` (a batch's outputs
    per length group), `item_table`, `training_batches` and `batch_loss`."""

    logit_scale = 1.0  # a user vector's factor in scores (HSTU: 1 / temperature)

    def __init__(self, n_users: int, n_items: int, max_len: int):
        super().__init__(n_users, n_items)
        self.max_len = max_len
        self._sequences: torch.Tensor | None = None
        self._lengths: torch.Tensor | None = None

    def bind(self, train: np.ndarray) -> "SequenceBackbone":
        super().bind(train)
        self._sequences = None
        return self

    def sequences(self) -> torch.Tensor:
        """[U, max_len] each user's window of training items, left-padded (its length: `self._lengths`)."""
        device = self._device()
        if self._sequences is None or self._sequences.device != device:
            seqs = last_items(self._bound(), self.n_users, self.max_len, pad=self.n_items)
            self._sequences = torch.from_numpy(seqs).to(device)
            self._lengths = torch.from_numpy((seqs != self.n_items).sum(1)).to(device)  # [U] real items
        return self._sequences

    def item_table(self) -> torch.Tensor:
        raise NotImplementedError

    def grouped(self, seq: torch.Tensor, groups: Groups) -> list[torch.Tensor]:
        """seq [B, L] (left-padded; rows in group order) → the outputs [rows, window, D] of each group."""
        raise NotImplementedError

    def forward(self, seq: torch.Tensor) -> torch.Tensor:
        """seq [B, L] item ids, left-padded with n_items → outputs [B, L, D]."""
        return self.grouped(seq, Groups(None, None, ((len(seq), seq.shape[1]),)))[0]

    def groups_of(self, users: torch.Tensor) -> Groups:
        """The length groups of a batch of `users` (a host sync: for evaluation and hand-built batches;
        a training epoch works its batches' groups out at once in `epoch_batches`)."""
        self.sequences()
        return length_groups(self._lengths[users], len(users), self.max_len)[0]

    def last_outputs(self, users: torch.Tensor, groups: Groups) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
        """(seq [B, max_len] in group order, each group's outputs, the last positions' outputs [B, D] in
        the order of `users`)."""
        seq = self.sequences()[users[groups.order]]
        outs = self.grouped(seq, groups)
        return seq, outs, torch.cat([out[:, -1] for out in outs])[groups.inverse]

    def encode(self, users: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The last position's output (× logit_scale) and the item table.

        In length groups, except in training with gradients (a method's loss calling `encode`: DCD's
        item side), where grouping would be a host sync inside the step: there the whole window runs,
        with the same outputs up to rounding (left padding changes no position's output)."""
        if self.training and torch.is_grad_enabled():
            last = self(self.sequences()[users])[:, -1]
        else:
            last = self.last_outputs(users, self.groups_of(users))[2]
        return last * self.logit_scale, self.item_table()

    def epoch_batches(self, batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, list[Groups]]:
        """The epoch's users in batches of `batch_size` (a random permutation, sorted within each batch)
        and each batch's length groups, brought to the host at once so that no step waits."""
        device = self._device()
        self.sequences()
        order = torch.randperm(self.n_users, generator=generator, device=device)
        batch = torch.arange(self.n_users, device=device) // batch_size
        users = (batch * self.n_users + order).sort().values - batch * self.n_users  # each batch's users, sorted
        return users, length_groups(self._lengths[users], batch_size, self.max_len)
