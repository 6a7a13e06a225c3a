"""LightGCN (He et al., SIGIR 2020): embeddings smoothed over the user–item graph of training pairs.

Â = D^-1/2 A D^-1/2 over the bipartite graph (users then items, no self loops); E^(k+1) = Â E^(k);
the final embedding is the mean of layers 0..L. One propagation per training step serves both the
BPR loss and the distillation loss (they share `encode`'s output); in eval mode the propagation is
computed once and reused until the model trains again.
"""

from __future__ import annotations

import warnings
from typing import Iterator

import numpy as np
import torch
from torch import nn

from rcekd.backbones.base import PairBatch, PairwiseBPR

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


def _product(adjacency: torch.Tensor, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Â @ X written into `out`: `Â @ X` itself would allocate, zero-fill and copy a fresh result, which
    here costs twice the sparse product."""
    return torch.addmm(out, adjacency, x, beta=0, out=out)


class _Propagation(torch.autograd.Function):
    """(final[users], final[U:]) with final = mean(X, ÂX, ..., Â^L X), X = [user table; item table],
    and its backward: G = the two outputs' gradients scattered into one [U + I, D] matrix, D = G / (L + 1),
    X's gradient D + Â(D + Â(... D)) (Â is symmetric: no transpose is built). Everything |U + I|-sized
    but the result and X's gradient goes through three buffers of the model's, reused by every step,
    forward and backward (fresh matrices of this size cost more in page faults than the sparse
    products); the operations are autograd's through the plain loop, in its order, so the numbers are
    the same (tested)."""

    @staticmethod
    def forward(ctx, adjacency, layers: int, buffers: tuple, users, user_table, item_table):
        n_users = user_table.shape[0]
        x, current, spare = buffers
        torch.cat([user_table, item_table], out=x)
        ctx.adjacency, ctx.layers, ctx.buffers, ctx.n_users = adjacency, layers, buffers, n_users
        ctx.save_for_backward(users)
        if layers == 0:
            total = x / 1
        else:
            current = _product(adjacency, x, current)
            total = x + current
            for _ in range(layers - 1):
                current, spare = _product(adjacency, current, spare), current
                total += current
            total.div_(layers + 1)
        return total[users], total[n_users:]

    @staticmethod
    def backward(ctx, grad_users, grad_items):
        (users,) = ctx.saved_tensors
        n_users, adjacency = ctx.n_users, ctx.adjacency
        share, product, running = ctx.buffers
        share[:n_users].zero_()
        if grad_users is not None:
            share[:n_users].index_put_((users,), grad_users, accumulate=True)  # as indexing's own backward
        if grad_items is not None:
            torch.add(grad_items, 0.0, out=share[n_users:])  # + the other output's zeros, as autograd sums them
        else:
            share[n_users:].zero_()
        if ctx.layers == 0:
            grad = share / 1
        else:
            share.div_(ctx.layers + 1)
            upstream = share  # the gradient of the last layer; each earlier layer's is share + Â · the next's
            for _ in range(ctx.layers - 1):
                torch.add(share, _product(adjacency, upstream, product), out=running)
                upstream = running
            grad = share + _product(adjacency, upstream, product)
        return None, None, None, None, grad[:n_users], grad[n_users:]


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
        self._frozen: tuple[torch.Tensor, torch.Tensor] | None = None  # eval mode: (all users, items)
        self._layer_buffers: tuple[torch.Tensor, ...] | None = None  # the propagation's [U + I, D] work space

    def bind(self, train: np.ndarray) -> "LightGCN":
        super().bind(train)
        self._adjacency, self._frozen = None, None  # a new graph: propagate again
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

    def propagate(self, users: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The mean of layers 0..L: (users' rows [B, D] (all users when None), the item table [I, D])."""
        weights = self.user_emb.weight
        size = (self.n_users + self.n_items, weights.shape[1])
        if self._layer_buffers is None or self._layer_buffers[0].shape != size or self._layer_buffers[0].device != weights.device:
            self._layer_buffers = tuple(torch.empty(size, dtype=weights.dtype, device=weights.device) for _ in range(3))
        if users is None:
            users = torch.arange(self.n_users, device=weights.device)
        return _Propagation.apply(self.adjacency(), self.layers, self._layer_buffers, users, weights, self.item_emb.weight)

    def training_batches(self, batch_size: int, generator: torch.Generator) -> Iterator[PairBatch]:
        self.adjacency()  # built and put on the device before the epoch's steps, never inside one
        return super().training_batches(batch_size, generator)

    def train(self, mode: bool = True) -> "LightGCN":
        self._frozen = None  # weights may change: drop the eval-mode propagation
        return super().train(mode)

    def encode(self, users: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.training:
            return self.propagate(users)
        if self._frozen is None:
            with torch.no_grad():
                self._frozen = self.propagate()
        return self._frozen[0][users], self._frozen[1]

    def encode_all_users(self, users: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One propagation of every user: the batch's rows are indexed from it."""
        user_table, item_table = self.propagate()
        return user_table[users], item_table, user_table

    def _ego(self, users: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor) -> tuple:
        return self.user_emb(users), self.item_emb(pos), self.item_emb(neg)
