"""Per-user item sets in CSR form, used to mask known items and to mark targets in chunks of users."""

from __future__ import annotations

import numpy as np
import torch


class UserItems:
    """Items of each user as CSR (indptr over users, sorted item ids), kept on one device."""

    def __init__(self, pairs: np.ndarray, n_users: int, n_items: int, device: torch.device | str = "cpu"):
        order = np.lexsort((pairs[:, 1], pairs[:, 0]))
        users, items = pairs[order, 0], pairs[order, 1]
        counts = np.bincount(users, minlength=n_users)
        self.n_users, self.n_items = n_users, n_items
        self.indptr = torch.from_numpy(np.concatenate([[0], np.cumsum(counts)])).to(device)  # [U + 1]
        self.items = torch.from_numpy(items.astype(np.int64)).to(device)  # [nnz]
        self.users = torch.from_numpy(users.astype(np.int64)).to(device)  # [nnz]
        self.counts = torch.from_numpy(counts).to(device)  # [U]
        self.keys = self.users * n_items + self.items  # sorted, for membership tests

    def block(self, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(row, item) of the users in [start, end); row is relative to start."""
        lo, hi = int(self.indptr[start]), int(self.indptr[end])
        return self.users[lo:hi] - start, self.items[lo:hi]

    def cells(self, users: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(row, item) of the given users' items, row = position in `users` (any order, repeats allowed)."""
        if len(users) and bool((users[1:] - users[:-1] == 1).all()):  # a range of users: a slice of the CSR
            return self.block(int(users[0]), int(users[0]) + len(users))
        counts = self.counts[users]  # [B]
        rows = torch.repeat_interleave(torch.arange(len(users), device=users.device), counts)  # [nnz]
        first = torch.repeat_interleave(self.indptr[users] - (counts.cumsum(0) - counts), counts)
        return rows, self.items[first + torch.arange(len(rows), device=users.device)]

    def dense(self, start: int, end: int) -> torch.Tensor:
        """[end - start, n_items] bool mask of the users' items."""
        mask = torch.zeros(end - start, self.n_items, dtype=torch.bool, device=self.items.device)
        rows, cols = self.block(start, end)
        mask[rows, cols] = True
        return mask

    def contains(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """Elementwise: is items[...] among the items of users[...]? (same shapes)"""
        keys = users * self.n_items + items
        pos = torch.searchsorted(self.keys, keys).clamp(max=max(len(self.keys) - 1, 0))
        return self.keys[pos] == keys if len(self.keys) else torch.zeros_like(keys, dtype=torch.bool)
