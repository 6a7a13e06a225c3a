"""SASRec (Kang & McAuley, ICDM 2018): causal self-attention over each user's training items in time
order (the last `max_len`), in plain dense PyTorch.

Input: the item embedding × √d plus a learned position embedding (positions counted from the user's
first item in the window, as HSTU's, so that left padding changes nothing), dropout, padding zeroed.
One block, as the paper's code: q = LayerNorm(x); x = q + Attention(q, x, x); x = LayerNorm(x);
x = x + FFN(x), FFN = Linear → ReLU → dropout → Linear → dropout; padding zeroed. Attention is
multi-head softmax attention with a causal mask that also hides the left padding (a padding query
attends to itself alone; its output is zeroed), so neither padding nor later items change a real
position's output. A final LayerNorm gives the outputs.

Training is autoregressive (position t predicts item t+1) with the paper's binary cross-entropy: the
next item against one uniform negative per position (never a training item of the user), averaged
over the positions that have a next item. The user vector is the last position's output and a score
is its dot product with the item's embedding, the logit it was trained on.
"""

from __future__ import annotations

import math
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from rcekd.backbones.base import Step, sample_negatives
from rcekd.backbones.sequence import Groups, SequenceBackbone, SequenceBatch, group_windows, lookup
from rcekd.sparse import UserItems


def causal_padding_mask(real: torch.Tensor) -> torch.Tensor:
    """real [B, L] (False at left padding) → additive attention mask [B, 1, L, L]: 0 where query i may
    attend key j (j ≤ i and j real; a padding query only itself), −inf elsewhere."""
    length = real.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=real.device).tril()
    allowed = (causal & real[:, None, :]) | torch.eye(length, dtype=torch.bool, device=real.device)
    zero = torch.zeros((), dtype=torch.float32, device=real.device)
    return torch.where(allowed, zero, torch.tensor(float("-inf"), device=real.device))[:, None]


class SASRecBlock(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        if dim % heads:
            raise ValueError(f"sasrec: dim = {dim} must be a multiple of heads = {heads}")
        self.heads = heads
        self.norm_attn = nn.LayerNorm(dim, eps=1e-8)
        self.query = nn.Linear(dim, dim)  # from the normalised x
        self.key_value = nn.Linear(dim, 2 * dim)  # from x itself, as the paper's code
        self.out = nn.Linear(dim, dim)
        self.norm_ffn = nn.LayerNorm(dim, eps=1e-8)
        self.ffn = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Dropout(dropout), nn.Linear(dim, dim), nn.Dropout(dropout))
        self.attn_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        """x [B, L, D]; mask [B, 1, L, L] additive (causal_padding_mask); real [B, L, 1] (0 at padding)."""
        batch, length, dim = x.shape
        normed = self.norm_attn(x)
        q, (k, v) = self.query(normed), self.key_value(x).chunk(2, dim=-1)

        def split(t: torch.Tensor) -> torch.Tensor:  # [B, L, D] → [B, H, L, D/H]
            return t.view(batch, length, self.heads, dim // self.heads).transpose(1, 2)

        logits = split(q) @ split(k).transpose(-1, -2) / math.sqrt(dim // self.heads) + mask  # [B, H, L, L]
        attn = self.attn_dropout(logits.softmax(-1))
        mixed = (attn @ split(v)).transpose(1, 2).reshape(batch, length, dim)
        x = self.norm_ffn(normed + self.out(mixed))
        return (x + self.ffn(x)) * real


class SASRec(SequenceBackbone):
    def __init__(
        self,
        *,
        n_users: int,
        n_items: int,
        dim: int = 64,
        blocks: int = 1,
        heads: int = 1,
        max_len: int = 100,
        dropout: float = 0.2,
    ):
        super().__init__(n_users, n_items, max_len)
        if min(dim, blocks, heads, max_len) < 1 or not 0 <= dropout < 1:
            raise ValueError(
                f"sasrec: dim, blocks, heads, max_len must be >= 1 and 0 <= dropout < 1 "
                f"(got dim={dim}, blocks={blocks}, heads={heads}, max_len={max_len}, dropout={dropout})"
            )
        self.item_emb = nn.Embedding(n_items + 1, dim, padding_idx=n_items)  # row n_items: padding
        self.pos_emb = nn.Embedding(max_len, dim)
        nn.init.normal_(self.item_emb.weight[:n_items], std=1.0 / math.sqrt(dim))
        nn.init.normal_(self.pos_emb.weight, std=1.0 / math.sqrt(dim))
        self.emb_dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(SASRecBlock(dim, heads, dropout) for _ in range(blocks))
        self.norm_out = nn.LayerNorm(dim, eps=1e-8)
        self._known: UserItems | None = None

    def item_table(self) -> torch.Tensor:
        return self.item_emb.weight[: self.n_items]

    def grouped(self, seq: torch.Tensor, groups: Groups) -> list[torch.Tensor]:
        """seq [B, L] (left-padded; rows in group order) → the outputs [rows, window, D] of each group over
        its own last `window` positions."""
        windows = group_windows(seq, groups)
        return [self._run(window, emb) for window, emb in zip(windows, lookup(self.item_emb, windows))]

    def _run(self, seq: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """seq [B, L] and its item embeddings emb [B, L, D] → outputs [B, L, D] (zero at padding)."""
        length = seq.shape[1]
        real = seq != self.n_items
        first = length - real.sum(1, keepdim=True)  # index of each user's first real item
        positions = (torch.arange(length, device=seq.device) - first).clamp(min=0)
        scale = math.sqrt(self.item_emb.embedding_dim)
        keep = real[..., None].to(self.item_emb.weight.dtype)
        x = self.emb_dropout(emb * scale + self.pos_emb(positions)) * keep
        mask = causal_padding_mask(real)
        for block in self.blocks:
            x = block(x, mask, keep)
        return self.norm_out(x) * keep

    def training_batches(self, batch_size: int, generator: torch.Generator) -> Iterator[SequenceBatch]:
        """Batches of `batch_size` users (sorted within the batch) with one negative per window position,
        drawn for the whole epoch at once (the rejection of training items syncs once, not per step)."""
        device = self._device()
        if self._known is None or self._known.items.device != device:
            self._known = UserItems(self._bound(), self.n_users, self.n_items, device)
        users, groups = self.epoch_batches(batch_size, generator)
        negatives = sample_negatives(users.repeat_interleave(self.max_len), self._known, generator).view(-1, self.max_len)
        for b, lo in enumerate(range(0, self.n_users, batch_size)):
            yield SequenceBatch(users[lo : lo + batch_size], negatives[lo : lo + batch_size], groups[b])

    def batch_loss(self, batch: SequenceBatch | tuple, *, weight_decay: float) -> Step:
        """Binary cross-entropy of the next item against its negative at every position that has a next
        item, a mean over those positions, plus weight_decay/2 · the squared norms of the embeddings they
        score; `batch` a `SequenceBatch`, or (users, negatives [B, max_len]) by hand."""
        if not isinstance(batch, SequenceBatch):
            users, negatives = batch
            order = users.argsort()
            batch = SequenceBatch(users[order], negatives[order], self.groups_of(users[order]))
        users, negatives, groups = batch
        seq, outs, last = self.last_outputs(users, groups)
        negatives = negatives[groups.order]  # rows in group order, as seq
        windows = group_windows(seq, groups)
        targets = [group_seq[:, 1:] for group_seq in windows]
        group_negs = [group_neg[:, 1:] for group_neg in group_windows(negatives, groups)]
        vecs = lookup(lambda ids: self.item_emb.weight[ids], targets + group_negs)  # as one gather
        total = penalty = n_rows = 0
        rows = []
        for group_seq, out, pos_vecs, neg_vecs in zip(windows, outs, vecs[: len(windows)], vecs[len(windows) :]):
            inputs = out[:, :-1]  # out [b, w, D]
            has_target = group_seq[:, :-1] != self.n_items  # left padding: a real input is followed by a real item
            pos = (inputs * pos_vecs).sum(-1)
            neg = (inputs * neg_vecs).sum(-1)
            nll = -F.logsigmoid(pos) - F.logsigmoid(-neg)  # [b, w-1]
            total = total + (nll * has_target).sum()
            n_rows = n_rows + has_target.sum()
            if weight_decay:
                penalty = penalty + ((pos_vecs.square().sum(-1) + neg_vecs.square().sum(-1)) * has_target).sum()
            rows.append(has_target.sum(1))
        n_rows = n_rows.clamp(min=1)
        base = total / n_rows + (0.5 * weight_decay * penalty / n_rows if weight_decay else 0.0)
        return Step(base, users, last, self.item_table(), torch.cat(rows)[groups.inverse])
