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

A batch runs in length groups (sequence.py); the dropout multipliers are drawn for the whole padded
batch, as one padded forward draws them, so only rounding differs from the padded computation.
"""

from __future__ import annotations

import math
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from rcekd.backbones.base import Step
from rcekd.backbones.sequence import (  # noqa: F401
    Groups, SequenceBackbone, SequenceBatch, group_windows, last_items, length_groups, lookup,
)


class HSTUBlock(nn.Module):
    def __init__(self, dim: int, heads: int, max_len: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"hstu: dim = {dim} must be a multiple of heads = {heads}")
        self.heads = heads
        self.norm_in = nn.LayerNorm(dim)
        self.uvqk = nn.Linear(dim, 4 * dim)
        self.rel_bias = nn.Parameter(torch.zeros(heads, max_len))
        self.norm_attn = nn.LayerNorm(dim)
        self.out = nn.Linear(dim, dim)

    def forward(
        self, x: torch.Tensor, divisor: torch.Tensor, distance: torch.Tensor, noise: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x [B, L, D]; divisor [B, L, L]: the number of keys query i attends where key j is attendable,
        +inf where not (so A is 0 there); distance [L, L]; noise [B, L, D]: dropout's multipliers, or None."""
        batch, length, dim = x.shape
        u, v, q, k = F.silu(self.uvqk(self.norm_in(x))).chunk(4, dim=-1)

        def split(t: torch.Tensor) -> torch.Tensor:  # [B, L, D] → [B, H, L, D/H]
            return t.view(batch, length, self.heads, dim // self.heads).transpose(1, 2)

        logits = split(q) @ split(k).transpose(-1, -2) + self.rel_bias[:, distance]  # [B, H, L, L]
        attn = F.silu(logits) / divisor[:, None]
        mixed = (attn @ split(v)).transpose(1, 2).reshape(batch, length, dim)
        gated = u * self.norm_attn(mixed)
        return x + self.out(gated if noise is None else gated * noise)


class HSTU(SequenceBackbone):
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
        super().__init__(n_users, n_items, max_len)
        if min(dim, blocks, heads, max_len, negatives) < 1 or not 0 <= dropout < 1 or temperature <= 0:
            raise ValueError(
                f"hstu: dim, blocks, heads, max_len, negatives must be >= 1, 0 <= dropout < 1, temperature > 0 "
                f"(got dim={dim}, blocks={blocks}, heads={heads}, max_len={max_len}, negatives={negatives}, "
                f"dropout={dropout}, temperature={temperature})"
            )
        self.temperature, self.negatives = temperature, negatives
        self.logit_scale = 1.0 / temperature
        self.item_emb = nn.Embedding(n_items + 1, dim, padding_idx=n_items)  # row n_items: padding
        self.pos_emb = nn.Embedding(max_len, dim)
        nn.init.normal_(self.item_emb.weight[:n_items], std=1.0 / math.sqrt(dim))
        nn.init.normal_(self.pos_emb.weight, std=1.0 / math.sqrt(dim))
        self.blocks = nn.ModuleList(HSTUBlock(dim, heads, max_len) for _ in range(blocks))
        self.dropout = dropout

    def use_raw_cosine(self) -> None:
        """Scores become the raw cosine instead of cosine / temperature (the authors' code's teacher logit)."""
        self.logit_scale = 1.0

    def item_table(self) -> torch.Tensor:
        return F.normalize(self.item_emb.weight[: self.n_items], dim=-1)

    def grouped(self, seq: torch.Tensor, groups: Groups) -> list[torch.Tensor]:
        """seq [B, L] (left-padded; rows in group order) → the outputs [rows, window, D] of each group over
        its own last `window` positions. Dropout's multipliers are drawn for the padded [B, L', D] batch
        (L' the longest window), one draw per layer in order (a uniform below 1 − dropout keeps an element, as
        a Bernoulli draw does, at half its cost on a CPU), and each group takes
        its rows' (`groups.order`: the batch row of each grouped row) last `window` positions."""
        length = max(window for _, window in groups.sizes)
        noise = [None] * (len(self.blocks) + 1)
        if self.training and self.dropout > 0:
            shape = (len(seq), length, self.item_emb.embedding_dim)
            keep = 1 - self.dropout
            dtype = self.item_emb.weight.dtype
            noise = [(torch.rand(shape, device=seq.device) < keep).to(dtype).div_(keep) for _ in noise]
        windows = group_windows(seq, groups)
        inputs, start = [], 0  # per group: (x, divisor, distance, its dropout multipliers per layer)
        for (rows, window), group_seq, emb in zip(groups.sizes, windows, lookup(self.item_emb, windows)):
            picked = slice(start, start + rows) if groups.order is None else groups.order[start : start + rows]
            group_noise = [None if n is None else n[picked, length - window :] for n in noise]
            inputs.append(self._embed(group_seq, emb, group_noise))
            start += rows
        xs = [x for x, *_ in inputs]
        for layer, block in enumerate(self.blocks, start=1):
            xs = [block(x, divisor, distance, n[layer]) for x, (_, divisor, distance, n) in zip(xs, inputs)]
        return [F.normalize(x, dim=-1) for x in xs]

    def _embed(self, seq: torch.Tensor, emb: torch.Tensor, noise: list[torch.Tensor | None]) -> tuple:
        """A group's inputs to the blocks from its items `seq` [B, L] and their embeddings `emb` [B, L, D]:
        (x [B, L, D], divisor [B, L, L], distance [L, L], noise)."""
        length = seq.shape[1]
        real = seq != self.n_items
        first = length - real.sum(1, keepdim=True)  # index of each user's first real item
        positions = (torch.arange(length, device=seq.device) - first).clamp(min=0)
        x = emb + self.pos_emb(positions)
        x = (x if noise[0] is None else x * noise[0]) * real[..., None]
        mask = torch.ones(length, length, dtype=torch.bool, device=seq.device).tril() & real[:, None, :]
        count = mask.sum(-1, keepdim=True).clamp(min=1).to(x.dtype)
        divisor = torch.where(mask, count, torch.tensor(float("inf"), device=seq.device))
        index = torch.arange(length, device=seq.device)
        distance = (index[:, None] - index[None, :]).clamp(0, self.max_len - 1)
        return x, divisor, distance, noise

    def training_batches(self, batch_size: int, generator: torch.Generator) -> Iterator[SequenceBatch]:
        """Batches of `batch_size` users (sorted within the batch), the batch's shared negatives and its
        length groups; the groups of the whole epoch come to the host at once, so that no step waits."""
        device = self._device()
        users, groups = self.epoch_batches(batch_size, generator)
        for b, lo in enumerate(range(0, self.n_users, batch_size)):
            negatives = torch.randint(self.n_items, (self.negatives,), generator=generator, device=device)
            yield SequenceBatch(users[lo : lo + batch_size], negatives, groups[b])

    def batch_loss(self, batch: SequenceBatch | tuple, *, weight_decay: float) -> Step:
        """Sampled softmax at every position that has a next item, a mean over those positions; `batch`
        a `SequenceBatch`, or (users, negatives) by hand (its groups then cost a host sync)."""
        if not isinstance(batch, SequenceBatch):
            users, negatives = batch
            users = users.sort().values
            batch = SequenceBatch(users, negatives, self.groups_of(users))
        users, negatives, groups = batch
        seq, outs, last = self.last_outputs(users, groups)
        items = self.item_table()
        windows = group_windows(seq, groups)
        targets = [group_seq[:, 1:] for group_seq in windows]
        *target_vecs, negative_items = lookup(lambda ids: items[ids.clamp(max=self.n_items - 1)], [*targets, negatives])
        target_embs = lookup(self.item_emb, targets) if weight_decay else targets
        total = penalty = n_rows = 0
        rows = []
        for group_seq, out, target, target_vec, target_emb in zip(windows, outs, targets, target_vecs, target_embs):
            inputs = out[:, :-1]  # out [b, w, D]
            has_target = group_seq[:, :-1] != self.n_items  # left padding: a real input is followed by a real item
            pos = (inputs * target_vec).sum(-1, keepdim=True)  # [b, w-1, 1]
            neg = inputs @ negative_items.T  # [b, w-1, N]
            neg = neg.masked_fill(negatives[None, None, :] == target[..., None], float("-inf"))
            logits = torch.cat([pos, neg], dim=-1) / self.temperature
            nll = -F.log_softmax(logits, dim=-1)[..., 0]
            total = total + (nll * has_target).sum()
            n_rows = n_rows + has_target.sum()
            if weight_decay:  # L2 on the embeddings of the targets, a masked sum (no boolean indexing)
                penalty = penalty + (target_emb.square().sum(-1) * has_target).sum()
            rows.append(has_target.sum(1))
        n_rows = n_rows.clamp(min=1)
        base = total / n_rows + (0.5 * weight_decay * penalty / n_rows if weight_decay else 0.0)
        return Step(base, users, last * self.logit_scale, items, torch.cat(rows)[groups.inverse])
