"""Matrix factorisation: score(u, i) = e_u · e_i, trained with BPR."""

from __future__ import annotations

import torch
from torch import nn

from rcekd.backbones.base import PairwiseBPR


class MF(PairwiseBPR):
    def __init__(self, *, n_users: int, n_items: int, dim: int, init_std: float = 0.01):
        super().__init__(n_users, n_items)
        self.user_emb = nn.Embedding(n_users, dim)
        self.item_emb = nn.Embedding(n_items, dim)
        nn.init.normal_(self.user_emb.weight, std=init_std)
        nn.init.normal_(self.item_emb.weight, std=init_std)

    def encode(self, users: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """User vectors [B, D] for `users` and the item table [I, D]; a score is their dot product."""
        return self.user_emb(users), self.item_emb.weight

    def encode_all_users(self, users: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.user_emb(users), self.item_emb.weight, self.user_emb.weight
