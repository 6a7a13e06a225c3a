"""HSTU (Zhai et al., ICML 2024) in plain dense PyTorch: a causal sequence model over each user's
training items in time order (the last `max_len`).

One block: LayerNorm(x) → SiLU(x W) split into U, V, Q, K; per head A = SiLU(QKᵀ + b_{i−j}) / n with
a causal mask and no softmax (b: a learned bias per head and relative distance; n: the number of
non-padding positions attended, so left padding and later items never change a position's output);
y = x + W_o(dropout(U ⊙ LayerNorm(A V))). Input: item embedding plus a learned position embedding
(positions counted from the user's first item in the window). Output: L2-normalised.

Training is autoregressive (position t predicts item t+1) with sampled softmax over cosine logits /
temperature against `negatives` uniform items shared by the batch. The user vector for ranking and
distillation is the output at the last position over the user's last `max_len` training items; the
logit is cosine / temperature (what it was trained on), or the raw cosine after `use_raw_cosine()`.
"""

from __future__ import annotations

import math
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from rcekd.backbones.base import Backbone, Step


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


class HSTUBlock(nn.Module):
    def __init__(self, dim: int, heads: int, max_len: int, dropout: float):
        super().__init__()
        if dim % heads:
            raise ValueError(f"hstu: dim = {dim} must be a multiple of heads = {heads}")
        self.heads = heads
        self.norm_in = nn.LayerNorm(dim)
        self.uvqk = nn.Linear(dim, 4 * dim)
        self.rel_bias = nn.Parameter(torch.zeros(heads, max_len))
        self.norm_attn = nn.LayerNorm(dim)
        self.out = nn.Linear(dim, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, count: torch.Tensor, distance: torch.Tensor) -> torch.Tensor:
        """x [B, L, D]; mask [B, L, L] (query, key) attendable; count [B, L] keys attended; distance [L, L]."""
        batch, length, dim = x.shape
        u, v, q, k = F.silu(self.uvqk(self.norm_in(x))).chunk(4, dim=-1)

        def split(t: torch.Tensor) -> torch.Tensor:  # [B, L, D] → [B, H, L, D/H]
            return t.view(batch, length, self.heads, dim // self.heads).transpose(1, 2)

        logits = split(q) @ split(k).transpose(-1, -2) + self.rel_bias[:, distance]  # [B, H, L, L]
        attn = F.silu(logits) * mask[:, None] / count[:, None, :, None]
        mixed = (attn @ split(v)).transpose(1, 2).reshape(batch, length, dim)
        return x + self.out(self.dropout(u * self.norm_attn(mixed)))


class HSTU(Backbone):
    def __init__(
        self,
        *,
        n_users: int,
        n_items: int,
        dim: int = 64,
        blocks: int = 8,
        heads: int = 4,
        max_len: int = 100,
        dropout: float = 0.2,
        temperature: float = 0.05,
        negatives: int = 512,
    ):
        super().__init__(n_users, n_items)
        if min(dim, blocks, heads, max_len, negatives) < 1 or not 0 <= dropout < 1 or temperature <= 0:
            raise ValueError(
                f"hstu: dim, blocks, heads, max_len, negatives must be >= 1, 0 <= dropout < 1, temperature > 0 "
                f"(got dim={dim}, blocks={blocks}, heads={heads}, max_len={max_len}, negatives={negatives}, "
                f"dropout={dropout}, temperature={temperature})"
            )
        self.max_len, self.temperature, self.negatives = max_len, temperature, negatives
        self.logit_scale = 1.0 / temperature
        self.item_emb = nn.Embedding(n_items + 1, dim, padding_idx=n_items)  # row n_items: padding
        self.pos_emb = nn.Embedding(max_len, dim)
        nn.init.normal_(self.item_emb.weight[:n_items], std=1.0 / math.sqrt(dim))
        nn.init.normal_(self.pos_emb.weight, std=1.0 / math.sqrt(dim))
        self.blocks = nn.ModuleList(HSTUBlock(dim, heads, max_len, dropout) for _ in range(blocks))
        self.dropout = nn.Dropout(dropout)
        self._sequences: torch.Tensor | None = None
        self._lengths: torch.Tensor | None = None

    def bind(self, train: np.ndarray) -> "HSTU":
        super().bind(train)
        self._sequences = None
        return self

    def use_raw_cosine(self) -> None:
        """Scores become the raw cosine instead of cosine / temperature (the authors' code's teacher logit)."""
        self.logit_scale = 1.0

    def sequences(self) -> torch.Tensor:
        """[U, max_len] each user's window of training items, left-padded (its length: `self._lengths`)."""
        device = self._device()
        if self._sequences is None or self._sequences.device != device:
            seqs = last_items(self._bound(), self.n_users, self.max_len, pad=self.n_items)
            self._sequences = torch.from_numpy(seqs).to(device)
            self._lengths = torch.from_numpy((seqs != self.n_items).sum(1)).to(device)  # [U] real items
        return self._sequences

    def item_table(self) -> torch.Tensor:
        return F.normalize(self.item_emb.weight[: self.n_items], dim=-1)

    def forward(self, seq: torch.Tensor) -> torch.Tensor:
        """seq [B, L] item ids, left-padded with n_items → L2-normalised outputs [B, L, D]."""
        length = seq.shape[1]
        real = seq != self.n_items
        first = length - real.sum(1, keepdim=True)  # index of each user's first real item
        positions = (torch.arange(length, device=seq.device) - first).clamp(min=0)
        x = self.item_emb(seq) + self.pos_emb(positions)
        x = self.dropout(x) * real[..., None]
        mask = torch.ones(length, length, dtype=torch.bool, device=seq.device).tril() & real[:, None, :]
        count = mask.sum(-1).clamp(min=1).to(x.dtype)
        index = torch.arange(length, device=seq.device)
        distance = (index[:, None] - index[None, :]).clamp(0, self.max_len - 1)
        for block in self.blocks:
            x = block(x, mask, count, distance)
        return F.normalize(x, dim=-1)

    def _window(self, users: torch.Tensor, length: int | None = None) -> torch.Tensor:
        """The users' sequences [B, length], without the columns that are padding for every row.

        `length` (the longest of the users' windows) comes with a training batch, worked out once per
        epoch. Without it, in training with gradients (a method's loss calling `encode`, DCD's item
        side) the whole window is kept, as learning the longest here would be a host sync inside the
        step; elsewhere (evaluation) it is read from the users' lengths."""
        seq = self.sequences()[users]
        if length is None:
            if self.training and torch.is_grad_enabled():
                return seq  # the same outputs up to rounding: left padding changes no position's output
            length = self.longest(users)
        return seq[:, self.max_len - max(length, 1) :]

    def longest(self, users: torch.Tensor) -> int:
        """The longest window among `users` (a host sync: not for a training step)."""
        self.sequences()
        return int(self._lengths[users].max())

    def encode(self, users: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The last position's output (× 1/temperature unless raw cosine) and the normalised item table."""
        return self(self._window(users))[:, -1] * self.logit_scale, self.item_table()

    def training_batches(self, batch_size: int, generator: torch.Generator) -> Iterator[tuple]:
        """(users, negatives, window length) per batch; the lengths of the epoch's batches come to the
        host at once, so that no step waits for the device."""
        device = self._device()
        self.sequences()
        order = torch.randperm(self.n_users, generator=generator, device=device)
        batch = torch.arange(self.n_users, device=device) // batch_size
        longest = torch.zeros(-(-self.n_users // batch_size), dtype=torch.long, device=device)
        longest = longest.scatter_reduce(0, batch, self._lengths[order], reduce="amax").tolist()  # [n_batches]
        for b, lo in enumerate(range(0, self.n_users, batch_size)):
            negatives = torch.randint(self.n_items, (self.negatives,), generator=generator, device=device)
            yield order[lo : lo + batch_size], negatives, longest[b]

    def batch_loss(self, batch: tuple, *, weight_decay: float) -> Step:
        users, negatives, *length = batch
        users = users.sort().values
        seq = self._window(users, length[0] if length else self.longest(users))  # by hand: no length given
        out = self(seq)  # [B, L, D]
        items = self.item_table()
        inputs, targets = out[:, :-1], seq[:, 1:]
        has_target = seq[:, :-1] != self.n_items  # left padding: a real input is followed by a real item
        pos = (inputs * items[targets.clamp(max=self.n_items - 1)]).sum(-1, keepdim=True)  # [B, L-1, 1]
        neg = inputs @ items[negatives].T  # [B, L-1, N]
        neg = neg.masked_fill(negatives[None, None, :] == targets[..., None], float("-inf"))
        logits = torch.cat([pos, neg], dim=-1) / self.temperature
        nll = -F.log_softmax(logits, dim=-1)[..., 0]
        n_rows = has_target.sum()
        base = (nll * has_target).sum() / n_rows.clamp(min=1)
        if weight_decay:  # L2 on the embeddings of the targets, a masked mean (no boolean indexing)
            used = self.item_emb(targets).square().sum(-1)  # [B, L-1]
            base = base + 0.5 * weight_decay * (used * has_target).sum() / n_rows.clamp(min=1)
        user_vecs = out[:, -1] * self.logit_scale
        return Step(base, users, user_vecs, items, has_target.sum(1))
