"""LightGCN (He et al., SIGIR 2020): embeddings smoothed over the user–item graph of training pairs.

Â = D^-1/2 A D^-1/2 over the bipartite graph (users then items, no self loops); E^(k+1) = Â E^(k);
the final embedding is the mean of layers 0..L. One propagation per training step serves both the
BPR loss and the distillation loss (they share `encode`'s output); in eval mode the propagation is
computed once and reused until the model trains again.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from torch import nn

from rcekd.backbones.base import PairwiseBPR

_GRAPHS: dict[tuple, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}


def normalized_adjacency(train: np.ndarray, n_users: int, n_items: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """CSR (indptr, indices, values) of Â over n_users + n_items nodes; item i is node n_users + i.

    Built once per training set within a process (teacher and student of one run share it).
    """
    key = (n_users, n_items, len(train), hash(train.tobytes()))
    if key not in _GRAPHS:
        pairs = np.unique(train, axis=0)
        rows = np.concatenate([pairs[:, 0], n_users + pairs[:, 1]])
        cols = np.concatenate([n_users + pairs[:, 1], pairs[:, 0]])
        degree = np.bincount(rows, minlength=n_users + n_items).astype(np.float64)
        inv_sqrt = np.zeros_like(degree)
        inv_sqrt[degree > 0] = degree[degree > 0] ** -0.5
        order = np.lexsort((cols, rows))
        rows, cols = rows[order], cols[order]
        values = (inv_sqrt[rows] * inv_sqrt[cols]).astype(np.float32)
        indptr = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=n_users + n_items))])
        _GRAPHS[key] = (indptr, cols, values)
    return _GRAPHS[key]


class _SymmetricSpMM(torch.autograd.Function):
    """Â @ X with the backward Â @ G (Â is symmetric), so no transpose is ever built."""

    @staticmethod
    def forward(ctx, adjacency: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        ctx.adjacency = adjacency
        return adjacency @ x

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return None, ctx.adjacency @ grad


class LightGCN(PairwiseBPR):
    def __init__(self, *, n_users: int, n_items: int, dim: int, layers: int = 3, init_std: float = 0.1):
        super().__init__(n_users, n_items)
        if layers < 0:
            raise ValueError(f"lightgcn: layers = {layers}; expected >= 0")
        self.layers = layers
        self.user_emb = nn.Embedding(n_users, dim)
        self.item_emb = nn.Embedding(n_items, dim)
        nn.init.normal_(self.user_emb.weight, std=init_std)
        nn.init.normal_(self.item_emb.weight, std=init_std)
        self._adjacency: torch.Tensor | None = None
        self._frozen: torch.Tensor | None = None

    def bind(self, train: np.ndarray) -> "LightGCN":
        super().bind(train)
        self._adjacency = None
        return self

    def adjacency(self) -> torch.Tensor:
        device = self._device()
        if self._adjacency is None or self._adjacency.device != device:
            indptr, indices, values = normalized_adjacency(self._bound(), self.n_users, self.n_items)
            size = self.n_users + self.n_items
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
                self._adjacency = torch.sparse_csr_tensor(
                    torch.from_numpy(indptr), torch.from_numpy(indices), torch.from_numpy(values), (size, size)
                ).to(device)
        return self._adjacency

    def propagate(self) -> torch.Tensor:
        """Mean of layers 0..L of all nodes: [U + I, D]."""
        layer = torch.cat([self.user_emb.weight, self.item_emb.weight])
        total = layer
        adjacency = self.adjacency()
        for _ in range(self.layers):
            layer = _SymmetricSpMM.apply(adjacency, layer)
            total = total + layer
        return total / (self.layers + 1)

    def train(self, mode: bool = True) -> "LightGCN":
        self._frozen = None  # weights may change: drop the eval-mode propagation
        return super().train(mode)

    def encode(self, users: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.training:
            final = self.propagate()
        else:
            if self._frozen is None:
                with torch.no_grad():
                    self._frozen = self.propagate()
            final = self._frozen
        return final[users], final[self.n_users :]

    def _ego(self, users: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor) -> tuple:
        return self.user_emb(users), self.item_emb(pos), self.item_emb(neg)
