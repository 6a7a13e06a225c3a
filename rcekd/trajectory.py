"""A teacher's training trajectory: its top-K lists (training items excluded) at every `every`-th
epoch, for HetComp's easy-to-hard sequence of targets. Only checkpoints before the best epoch are
kept; the best epoch's own list is the teacher cache's top-K.

`trajectory.parquet` holds one row per (checkpoint epoch, user, rank) with the item.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import nn

from rcekd.evaluate import score_chunks
from rcekd.io import atomic_path
from rcekd.sparse import UserItems

SCHEMA = pa.schema([("epoch", pa.int32()), ("user", pa.int32()), ("rank", pa.int16()), ("item", pa.int32())])


class TrajectoryRecorder:
    """Call with (epoch, model) after each epoch; `write` keeps the checkpoints before `best_epoch`."""

    resume_attrs = ("lists",)  # kept between epochs

    def __init__(self, train: UserItems, *, every: int, topk: int, chunk: int, device: torch.device):
        if every < 1 or not 0 < topk <= train.n_items:
            raise ValueError(f"trajectory: every = {every} (expected >= 1), topk = {topk} (expected 1..{train.n_items})")
        self.train, self.every, self.topk, self.chunk, self.device = train, every, topk, chunk, device
        self.lists: dict[int, torch.Tensor] = {}  # epoch → top-K items [U, K], on the CPU

    @torch.no_grad()
    def __call__(self, epoch: int, model: nn.Module) -> None:
        if epoch % self.every == 0:
            blocks = score_chunks(model, self.train.n_users, exclude=[self.train], chunk=self.chunk, device=self.device)
            self.lists[epoch] = torch.cat([block.topk(self.topk, dim=1).indices.cpu() for _, _, block in blocks])

    def write(self, path: str | Path, best_epoch: int) -> None:
        kept = [epoch for epoch in sorted(self.lists) if epoch < best_epoch]
        n_users = self.train.n_users
        columns = [
            np.repeat(np.array(kept, dtype=np.int32), n_users * self.topk),
            np.tile(np.repeat(np.arange(n_users, dtype=np.int32), self.topk), len(kept)),
            np.tile(np.arange(self.topk, dtype=np.int16), n_users * len(kept)),
            np.concatenate([self.lists[e].numpy().reshape(-1) for e in kept]).astype(np.int32) if kept else np.zeros(0, np.int32),
        ]
        table = pa.table([pa.array(c) for c in columns], schema=SCHEMA)
        with atomic_path(path) as tmp:
            pq.write_table(table, tmp)


def read_trajectory(path: str | Path, n_users: int) -> torch.Tensor:
    """The checkpoints' lists [C, U, K], earliest first (C may be 0)."""
    table = pq.read_table(path)
    if table.schema.names != SCHEMA.names:
        raise ValueError(f"{path}: not a teacher trajectory (columns {table.schema.names}, expected {SCHEMA.names})")
    epochs = np.unique(table["epoch"].to_numpy())
    if len(table) % max(len(epochs) * n_users, 1):
        raise ValueError(f"{path}: {len(table)} rows is not {len(epochs)} checkpoints × {n_users} users × K")
    if not len(epochs):
        return torch.zeros(0, n_users, 0, dtype=torch.long)
    items = table["item"].to_numpy().astype(np.int64)
    return torch.from_numpy(items.reshape(len(epochs), n_users, -1))
