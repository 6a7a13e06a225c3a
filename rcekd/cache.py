"""Teacher cache: the teacher's scores written once, read by every distillation method.

A cache directory holds
- the scores, in one of three stores (params `cache.store`):
  `float32`: `scores.f32`, the full |U|×|I| score matrix, raw, row-major (Gowalla: 4.9 GB);
  `float16`: `scores.f16`, the same at half precision (half the disk and reads);
  `factors`: only the factors below, whose products are the scores (MF dim 400 on Gowalla: 0.11 GB);
  rows are computed on read;
- `users.f32` [|U|, D] and `items.f32` [|I|, D]: the teacher's final user vectors and item table, in
  every store (the representations that feature-level methods such as MKD distil);
- `topk.parquet`: per user the teacher's top-K items among non-training items, with scores (always
  from the float32 scores);
- `meta.json`: store, shape, K, the split fingerprint and the teacher checkpoint's sha256.
Scores are written and read with plain file I/O in chunks of users, never mapped into memory, so a
process's resident memory stays at a few chunks whatever the matrix's size.
`TeacherCache` validates all of it before any method uses the cache.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import nn

from rcekd.data import Splits
from rcekd.evaluate import score_chunks
from rcekd.io import atomic_path, read_json, write_json
from rcekd.sparse import UserItems

FORMAT_VERSION = 3  # 3: factors in every store
TOPK_SCHEMA = pa.schema([("user", pa.int32()), ("rank", pa.int16()), ("item", pa.int32()), ("score", pa.float32())])
SCORE_FILES = {"float32": ("scores.f32", np.float32), "float16": ("scores.f16", np.float16)}
STORES = (*SCORE_FILES, "factors")


@torch.no_grad()
def encode_all(model: nn.Module, n_users: int, *, chunk: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's user vectors [U, D] (in chunks of users) and item table [I, D], in eval mode."""
    was_training = model.training
    model.eval()
    try:
        parts, table = [], None
        for start in range(0, n_users, chunk):
            vecs, table = model.encode(torch.arange(start, min(start + chunk, n_users), device=device))
            parts.append(vecs)
        return torch.cat(parts), table.detach()
    finally:
        model.train(was_training)


def product_chunks(users: torch.Tensor, items: torch.Tensor, chunk: int) -> Iterator[tuple[int, int, torch.Tensor]]:
    """(start, end, users[start:end] @ items.T) over chunks of users: the scores of a factors store."""
    for start in range(0, len(users), chunk):
        end = min(start + chunk, len(users))
        yield start, end, users[start:end] @ items.T

def write_cache(
    teacher: nn.Module,
    splits: Splits,
    out_dir: str | Path,
    *,
    topk: int,
    checkpoint_sha256: str,
    chunk: int,
    device: torch.device,
    store: str = "float32",
    progress: Callable[[int, int], None] = lambda done, total: None,
) -> dict:
    """Score every user against every item in chunks; write the store, the top-K Parquet and meta."""
    if not 0 < topk <= splits.n_items:
        raise ValueError(f"cache.topk = {topk}: expected 1..{splits.n_items} (the number of items)")
    if store not in STORES:
        raise ValueError(f"cache.store = {store!r}: expected one of {', '.join(STORES)}")
    train = UserItems(splits.train, splits.n_users, splits.n_items, device)
    shape = (splits.n_users, splits.n_items)
    items = np.empty(shape[0] * topk, dtype=np.int32)
    values = np.empty(shape[0] * topk, dtype=np.float32)
    extra: dict = {}
    with atomic_path(out_dir) as tmp:
        tmp.mkdir(parents=True)
        user_vecs, item_table = encode_all(teacher, splits.n_users, chunk=chunk, device=device)  # in every store
        (tmp / "users.f32").write_bytes(user_vecs.float().cpu().numpy().tobytes())
        (tmp / "items.f32").write_bytes(item_table.float().cpu().numpy().tobytes())
        extra["dim"] = int(user_vecs.shape[1])
        if store == "factors":
            blocks = product_chunks(user_vecs, item_table, chunk)
            handle = None
        else:
            blocks = score_chunks(teacher, splits.n_users, exclude=[], chunk=chunk, device=device)
            name, dtype = SCORE_FILES[store]
            handle = open(tmp / name, "wb")
        try:
            for start, end, scores in blocks:
                if handle is not None:
                    handle.write(np.ascontiguousarray(scores.cpu().numpy(), dtype=dtype))  # the buffer itself, no bytes copy
                rows, cols = train.block(start, end)
                scores[rows, cols] = float("-inf")
                top = scores.topk(topk, dim=1)
                items[start * topk : end * topk] = top.indices.cpu().numpy().reshape(-1)
                values[start * topk : end * topk] = top.values.cpu().numpy().reshape(-1)
                progress(end, splits.n_users)
        finally:
            if handle is not None:
                handle.close()
        table = pa.table(
            [
                pa.array(np.repeat(np.arange(shape[0], dtype=np.int32), topk)),
                pa.array(np.tile(np.arange(topk, dtype=np.int16), shape[0])),
                pa.array(items),
                pa.array(values),
            ],
            schema=TOPK_SCHEMA,
        )
        pq.write_table(table, tmp / "topk.parquet")
        meta = {
            "format_version": FORMAT_VERSION,
            "store": store,
            "shape": list(shape),
            **extra,
            "topk": topk,
            "topk_excludes": "train",
            "split_fingerprint": splits.fingerprint,
            "teacher_sha256": checkpoint_sha256,
        }
        write_json(tmp / "meta.json", meta)
    return meta


class TeacherCache:
    """Validated read access to a cache directory; tensors come back on `device`, as float32."""

    def __init__(
        self,
        directory: str | Path,
        *,
        splits: Splits,
        device: torch.device,
        chunk: int = 1024,
        teacher_sha256: str | None = None,
        resident: bool = False,
    ):
        """With `resident`, a float32/float16 store is read once, as float32, into a tensor on `device`,
        and every later read indexes it (no file reads or host-to-device copies per epoch or step)."""
        directory = Path(directory)
        meta_path = directory / "meta.json"
        if not meta_path.exists():
            raise FileNotFoundError(f"{directory}: not a teacher cache (no meta.json); run the cache_teacher stage")
        meta = read_json(meta_path)
        expected_shape = [splits.n_users, splits.n_items]
        problems = []
        if meta.get("format_version") != FORMAT_VERSION:
            problems.append(f"format_version {meta.get('format_version')} (expected {FORMAT_VERSION}: rerun the cache_teacher stage)")
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
        store = meta.get("store")
        if store not in STORES:
            problems.append(f"store {store!r} (expected one of {', '.join(STORES)})")
        else:
            dim = meta.get("dim")
            files = {"users.f32": splits.n_users, "items.f32": splits.n_items}
            if not isinstance(dim, int) or dim < 1:
                problems.append(f"dim {dim!r} (expected an integer >= 1)")
            else:
                problems += _size_problems(directory, {name: rows * dim * 4 for name, rows in files.items()})
            if store != "factors":
                name, dtype = SCORE_FILES[store]
                problems += _size_problems(directory, {name: splits.n_users * splits.n_items * np.dtype(dtype).itemsize})
        if problems:
            raise ValueError(f"{directory}: teacher cache does not match: " + "; ".join(problems))
        self.meta = meta
        self.directory = directory
        self.store = store
        self.n_users, self.n_items = expected_shape
        self.device = device
        self.chunk = chunk
        self._factors: tuple[torch.Tensor, torch.Tensor] | None = None
        if store == "factors":
            self.user_vecs, self.item_table = self.factors()
        else:
            self.path, self.dtype = directory / SCORE_FILES[store][0], np.dtype(SCORE_FILES[store][1])
        self.resident: torch.Tensor | None = None  # [U, I] float32 on the device
        if resident and store != "factors":
            scores = torch.empty(self.n_users, self.n_items, dtype=torch.float32, device=device)
            for start in range(0, self.n_users, chunk):
                end = min(start + chunk, self.n_users)
                scores[start:end] = self.rows(start, end)
            self.resident = scores

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The teacher's final user vectors [U, D] and item table [I, D] (every store holds them), read once."""
        if self._factors is None:
            read = lambda name, rows: torch.from_numpy(np.fromfile(self.directory / name, dtype=np.float32).reshape(rows, -1))
            self._factors = read("users.f32", self.n_users).to(self.device), read("items.f32", self.n_items).to(self.device)
        return self._factors

    def rows(self, start: int, end: int) -> torch.Tensor:
        """Teacher scores of users [start, end) for all items: [end - start, I]."""
        if self.store == "factors":
            return self.user_vecs[start:end] @ self.item_table.T
        if self.resident is not None:
            return self.resident[start:end].clone()  # callers may write into it
        row_bytes = self.n_items * self.dtype.itemsize
        block = np.fromfile(self.path, dtype=self.dtype, count=(end - start) * self.n_items, offset=start * row_bytes)
        return self._tensor(block.reshape(end - start, self.n_items))

    def rows_of(self, users: torch.Tensor) -> torch.Tensor:
        """Teacher scores of the given users for all items: [B, I] (a batch's users, any order)."""
        if self.store == "factors":
            return self.user_vecs[users] @ self.item_table.T
        if self.resident is not None:
            return self.resident[users]
        out = np.empty((len(users), self.n_items), dtype=self.dtype)
        row_bytes = self.n_items * self.dtype.itemsize
        with open(self.path, "rb") as handle:
            for row, user in enumerate(users.tolist()):
                handle.seek(user * row_bytes)
                handle.readinto(memoryview(out[row]).cast("B"))
        return self._tensor(out)

    def take(self, start: int, end: int, items: torch.Tensor) -> torch.Tensor:
        """Teacher scores of users [start, end) at their own items [end - start, N]: rows(...).gather(1, items),
        without forming the rows when the store is factors."""
        if self.store == "factors":
            return torch.einsum("bd,bnd->bn", self.user_vecs[start:end], self.item_table[items])
        if self.resident is not None:
            return self.resident[start:end].gather(1, items)
        return self.rows(start, end).gather(1, items)

    def gather(self, items: torch.Tensor) -> torch.Tensor:
        """Teacher scores of (u, items[u, n]) for every user u: [U, N], read in chunks of users."""
        out = torch.empty(items.shape, dtype=torch.float32, device=self.device)
        for start in range(0, self.n_users, self.chunk):
            end = min(start + self.chunk, self.n_users)
            out[start:end] = self.take(start, end, items[start:end])
        return out

    def topk(self, k: int, *, exclude: UserItems | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher top-k items [U, k] and scores [U, k], best first, among items not in `exclude`.

        With `exclude` = the training items and k within the stored K this reads the Parquet lists;
        otherwise (training items kept, or a larger k) it scans the scores in chunks of users.
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

    def _tensor(self, block: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(block).to(self.device, torch.float32)


def fits_on_device(n_users: int, n_items: int, device: torch.device, share: float = 0.25) -> bool:
    """Whether a float32 score matrix would take at most `share` of the GPU's free memory (False on the CPU,
    where reading chunks of the file costs little)."""
    if device.type != "cuda":
        return False
    free, _ = torch.cuda.mem_get_info(device)
    return n_users * n_items * 4 <= share * free


def _size_problems(directory: Path, sizes: dict[str, int]) -> list[str]:
    """A message for each file of `sizes` (name → expected bytes) that is missing or of another size."""
    problems = []
    for name, expected in sizes.items():
        path = directory / name
        if not path.exists():
            problems.append(f"{name} missing")
        elif path.stat().st_size != expected:
            problems.append(f"{name} has {path.stat().st_size} bytes (expected {expected}: truncated?)")
    return problems
