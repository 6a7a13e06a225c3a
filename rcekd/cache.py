"""Teacher cache: the teacher's scores written once, read by every distillation method.

A cache directory holds
- `scores.f32`: the full |U|×|I| float32 score matrix as a raw memmap, written chunk by chunk;
- `topk.parquet`: per user the teacher's top-K items among non-training items, with scores;
- `meta.json`: shape, dtype, K, the split fingerprint and the teacher checkpoint's sha256.
`TeacherCache.open` validates all of it before any method uses the cache.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import nn

from rcekd.data import Splits
from rcekd.evaluate import score_chunks
from rcekd.io import atomic_path, read_json, write_json
from rcekd.sparse import UserItems

FORMAT_VERSION = 1
TOPK_SCHEMA = pa.schema([("user", pa.int32()), ("rank", pa.int16()), ("item", pa.int32()), ("score", pa.float32())])


def write_cache(
    teacher: nn.Module,
    splits: Splits,
    out_dir: str | Path,
    *,
    topk: int,
    checkpoint_sha256: str,
    chunk: int,
    device: torch.device,
    progress: Callable[[int, int], None] = lambda done, total: None,
) -> dict:
    """Score every user against every item in chunks; write the memmap, the top-K Parquet and meta."""
    if not 0 < topk <= splits.n_items:
        raise ValueError(f"cache.topk = {topk}: expected 1..{splits.n_items} (the number of items)")
    train = UserItems(splits.train, splits.n_users, splits.n_items, device)
    shape = (splits.n_users, splits.n_items)
    tops_items, tops_scores = [], []
    with atomic_path(out_dir) as tmp:
        tmp.mkdir(parents=True)
        memmap = np.memmap(tmp / "scores.f32", dtype=np.float32, mode="w+", shape=shape)
        for start, end, scores in score_chunks(teacher, splits.n_users, exclude=[], chunk=chunk, device=device):
            memmap[start:end] = scores.cpu().numpy()
            rows, cols = train.block(start, end)
            scores[rows, cols] = float("-inf")
            top = scores.topk(topk, dim=1)
            tops_items.append(top.indices.cpu())
            tops_scores.append(top.values.cpu())
            progress(end, splits.n_users)
        memmap.flush()
        del memmap
        items = torch.cat(tops_items).numpy()  # [U, K]
        values = torch.cat(tops_scores).numpy()
        table = pa.table(
            [
                pa.array(np.repeat(np.arange(shape[0], dtype=np.int32), topk)),
                pa.array(np.tile(np.arange(topk, dtype=np.int16), shape[0])),
                pa.array(items.reshape(-1).astype(np.int32)),
                pa.array(values.reshape(-1).astype(np.float32)),
            ],
            schema=TOPK_SCHEMA,
        )
        pq.write_table(table, tmp / "topk.parquet")
        meta = {
            "format_version": FORMAT_VERSION,
            "shape": list(shape),
            "dtype": "float32",
            "topk": topk,
            "topk_excludes": "train",
            "split_fingerprint": splits.fingerprint,
            "teacher_sha256": checkpoint_sha256,
        }
        write_json(tmp / "meta.json", meta)
    return meta


class TeacherCache:
    """Validated read access to a cache directory; tensors come back on `device`."""

    def __init__(
        self,
        directory: str | Path,
        *,
        splits: Splits,
        device: torch.device,
        chunk: int = 1024,
        teacher_sha256: str | None = None,
    ):
        directory = Path(directory)
        meta_path = directory / "meta.json"
        if not meta_path.exists():
            raise FileNotFoundError(f"{directory}: not a teacher cache (no meta.json); run the cache_teacher stage")
        meta = read_json(meta_path)
        expected_shape = [splits.n_users, splits.n_items]
        problems = []
        if meta.get("format_version") != FORMAT_VERSION:
            problems.append(f"format_version {meta.get('format_version')} (expected {FORMAT_VERSION})")
        if meta.get("split_fingerprint") != splits.fingerprint:
            problems.append(
                f"split fingerprint {meta.get('split_fingerprint')} (the dataset {splits.name} has {splits.fingerprint})"
            )
        if teacher_sha256 is not None and meta.get("teacher_sha256") != teacher_sha256:
            problems.append(
                f"teacher checkpoint sha256 {str(meta.get('teacher_sha256'))[:12]}… (the teacher given has {teacher_sha256[:12]}…)"
            )
        if meta.get("shape") != expected_shape:
            problems.append(f"shape {meta.get('shape')} (the dataset has {expected_shape})")
        if meta.get("dtype") != "float32":
            problems.append(f"dtype {meta.get('dtype')} (expected float32)")
        scores_path = directory / "scores.f32"
        expected_bytes = splits.n_users * splits.n_items * 4
        if not scores_path.exists():
            problems.append("scores.f32 missing")
        elif scores_path.stat().st_size != expected_bytes:
            problems.append(f"scores.f32 has {scores_path.stat().st_size} bytes (expected {expected_bytes}: truncated?)")
        if problems:
            raise ValueError(f"{directory}: teacher cache does not match: " + "; ".join(problems))
        self.meta = meta
        self.directory = directory
        self.n_users, self.n_items = expected_shape
        self.device = device
        self.chunk = chunk
        self.scores = np.memmap(scores_path, dtype=np.float32, mode="r", shape=tuple(expected_shape))

    def rows(self, start: int, end: int) -> torch.Tensor:
        """Teacher scores of users [start, end) for all items: [end - start, I]."""
        return torch.from_numpy(np.array(self.scores[start:end])).to(self.device)

    def rows_of(self, users: torch.Tensor) -> torch.Tensor:
        """Teacher scores of the given users for all items: [B, I] (a batch's users, any order)."""
        index = users.cpu().numpy()
        return torch.from_numpy(np.asarray(self.scores[index])).to(self.device)

    def gather(self, items: torch.Tensor) -> torch.Tensor:
        """Teacher scores of (u, items[u, n]) for every user u: [U, N], read in chunks of users."""
        out = torch.empty(items.shape, dtype=torch.float32, device=self.device)
        for start in range(0, self.n_users, self.chunk):
            end = min(start + self.chunk, self.n_users)
            out[start:end] = self.rows(start, end).gather(1, items[start:end])
        return out

    def topk(self, k: int, *, exclude: UserItems | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher top-k items [U, k] and scores [U, k], best first, among items not in `exclude`.

        With `exclude` = the training items and k within the stored K this reads the Parquet lists;
        otherwise (training items kept, or a larger k) it scans the memmap in chunks of users.
        """
        if not 0 < k <= self.n_items:
            raise ValueError(f"teacher top-k with k = {k}: expected 1..{self.n_items}")
        if exclude is not None and k <= self.meta["topk"]:
            table = pq.read_table(self.directory / "topk.parquet")
            stored = self.meta["topk"]
            items = table["item"].to_numpy().reshape(self.n_users, stored)[:, :k].astype(np.int64)
            scores = table["score"].to_numpy().reshape(self.n_users, stored)[:, :k]
            return torch.from_numpy(items).to(self.device), torch.from_numpy(scores.copy()).to(self.device)
        items, scores = [], []
        for start in range(0, self.n_users, self.chunk):
            end = min(start + self.chunk, self.n_users)
            block = self.rows(start, end)
            if exclude is not None:
                rows, cols = exclude.block(start, end)
                block[rows, cols] = float("-inf")
            top = block.topk(k, dim=1)
            items.append(top.indices)
            scores.append(top.values)
        return torch.cat(items), torch.cat(scores)
