"""Raw interactions → core filter → per-user chronological split → processed Parquet, and its reader.

The writer (`preprocess`) and the reader (`load_splits`) live side by side so that the format has
one owner. A processed dataset is a directory with `train/valid/test.parquet` (int32 user, item),
`users.parquet` / `items.parquet` (new id → raw id) and `meta.json` (sizes and a fingerprint of the
split that every downstream artifact records and checks).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from rcekd.io import atomic_path, read_json, write_json
from rcekd.sources import SOURCES

FORMAT_VERSION = 1
SPLITS = ("train", "valid", "test")
MODES = ("chronological", "holdout", "leave_one_out")
PAIR_SCHEMA = pa.schema([("user", pa.int32()), ("item", pa.int32())])
MAP_SCHEMA = pa.schema([("id", pa.int32()), ("raw", pa.string())])


# ---------------------------------------------------------------- protocol


def deduplicate(df: pd.DataFrame) -> pd.DataFrame:
    """Keep the earliest occurrence of each (user, item) pair (time, then file order)."""
    keys = ["time", "order"] if "time" in df else ["order"]
    return df.sort_values(keys, kind="stable").drop_duplicates(["user", "item"], keep="first")


def core_filter(df: pd.DataFrame, *, min_user: int, min_item: int) -> pd.DataFrame:
    """Iteratively drop users with < min_user and items with < min_item interactions."""
    while True:
        user_counts = df["user"].map(df["user"].value_counts())
        item_counts = df["item"].map(df["item"].value_counts())
        keep = (user_counts >= min_user) & (item_counts >= min_item)
        if keep.all():
            return df
        df = df[keep]


def split_sizes(n: np.ndarray, *, train: float, valid: float) -> tuple[np.ndarray, np.ndarray]:
    """Per-user boundaries: train = first max(⌊train·n⌋, 1), valid up to ⌊(train+valid)·n⌋, test the rest."""
    eps = 1e-9  # 0.8 + 0.1 is 0.9000000000000001 in floating point; guard ⌊·⌋ both ways
    n_train = np.maximum(np.floor(train * n + eps), 1).astype(np.int64)
    n_train_valid = np.maximum(np.floor((train + valid) * n + eps).astype(np.int64), n_train)
    return n_train, n_train_valid


def chrono_split(df: pd.DataFrame, *, train: float, valid: float) -> dict[str, pd.DataFrame]:
    """Per-user chronological split: each user's interactions sorted by time (file order breaks ties)."""
    keys = ["user", "time", "order"] if "time" in df else ["user", "order"]
    df = df.sort_values(keys, kind="stable")
    pos = df.groupby("user", sort=False).cumcount().to_numpy()
    n = df["user"].map(df["user"].value_counts()).to_numpy()
    n_train, n_train_valid = split_sizes(n, train=train, valid=valid)
    return {
        "train": df[pos < n_train],
        "valid": df[(pos >= n_train) & (pos < n_train_valid)],
        "test": df[pos >= n_train_valid],
    }


def holdout_split(df: pd.DataFrame, *, holdout: float, valid_users: float, seed: int) -> dict[str, pd.DataFrame]:
    """MKD's protocol (UnKD's split): per user a seeded random ⌊holdout · n⌋ interactions held out (at
    least one kept in train, at least one held out where n > 1), then a seeded random share `valid_users`
    of the users whose held-out items are validation targets; the other users' are test targets."""
    rng = np.random.default_rng(seed)
    keys = rng.random(len(df))
    rank = pd.Series(keys, index=df.index).groupby(df["user"].to_numpy()).rank(method="first").to_numpy() - 1
    n = df["user"].map(df["user"].value_counts()).to_numpy()
    n_held = np.where(n > 1, np.clip(np.floor(holdout * n + 1e-6), 1, n - 1), 0)
    held = rank < n_held
    users = np.sort(df["user"].unique())
    valid_set = set(rng.permutation(users)[: int(round(valid_users * len(users)))].tolist())
    in_valid = df["user"].isin(valid_set).to_numpy()
    return {"train": df[~held], "valid": df[held & in_valid], "test": df[held & ~in_valid]}


def leave_one_out(df: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """RCE-KD's sequential protocol (its appendix D.1): per user in time order (file order breaks ties and
    stands in for time where there is none), the last interaction is the test target and the one before
    it the validation target; the rest is training. A user with 2 interactions has no validation target
    (one training item, one test item); a user with 1 keeps it in training and has no target."""
    keys = ["user", "time", "order"] if "time" in df else ["user", "order"]
    df = df.sort_values(keys, kind="stable")
    from_end = df.groupby("user", sort=False).cumcount(ascending=False).to_numpy()  # 0 for a user's last
    n = df["user"].map(df["user"].value_counts()).to_numpy()
    test = (from_end == 0) & (n >= 2)
    valid = (from_end == 1) & (n >= 3)
    return {"train": df[~test & ~valid], "valid": df[valid], "test": df[test]}


def carve_valid(df: pd.DataFrame, *, share: float, seed: int) -> dict[str, pd.DataFrame]:
    """For data published pre-split (a `split` column): keep its test part, and move a seeded random
    ⌊share · n⌋ of each user's training interactions to validation (at least one stays in train)."""
    train, test = df[df["split"] == "train"], df[df["split"] == "test"]
    keys = np.random.default_rng(seed).random(len(train))
    rank = pd.Series(keys, index=train.index).groupby(train["user"].to_numpy()).rank(method="first").to_numpy() - 1
    n = train["user"].map(train["user"].value_counts()).to_numpy()
    n_valid = np.minimum(np.floor(share * n + 1e-6), n - 1)  # 0.1111111111 · 9k must still give k
    in_valid = rank < n_valid
    return {"train": train[~in_valid], "valid": train[in_valid], "test": test}


def _dense_ids(values: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """Raw ids → 0..n−1 in sorted raw order (numeric order when every id is an integer)."""
    uniques = pd.unique(values.to_numpy())
    as_text = pd.Series(uniques, dtype=str)
    numeric = as_text.str.fullmatch(r"\d+").all()
    order = np.argsort(as_text.astype(np.int64).to_numpy() if numeric else as_text.to_numpy(), kind="stable")
    raw = as_text.to_numpy()[order]
    lookup = pd.Series(np.arange(len(raw), dtype=np.int32), index=raw)
    return lookup.loc[values.astype(str).to_numpy()].to_numpy(), raw


# ---------------------------------------------------------------- writer


def preprocess(
    raw_path: str | Path,
    out_dir: str | Path,
    *,
    source: str,
    min_user: int,
    min_item: int,
    train: float,
    valid: float,
    source_options: dict | None = None,
    valid_share: float = 1 / 9,
    seed: int = 0,
    mode: str = "chronological",
    holdout: float = 0.1,
    valid_users: float = 0.1,
    split_seed: int = 0,
) -> dict:
    """Read a raw source, filter, split, re-index and write the processed directory. Returns stats.

    Sources with timestamps (or a file order) get the per-user chronological split (train, valid), with
    mode "holdout" MKD's random per-user holdout with validation and test users (holdout, valid_users,
    split_seed), or with mode "leave_one_out" the sequential protocol (last item test, the one before
    it validation); sources published pre-split keep their test part and carve validation
    from training (valid_share).
    """
    if mode not in MODES:
        raise ValueError(f"split.mode = {mode!r}: expected one of {', '.join(MODES)}")
    if source not in SOURCES:
        raise ValueError(f"unknown dataset source {source!r}; expected one of {sorted(SOURCES)}")
    if not (0 < train < 1 and 0 <= valid < 1 and train + valid < 1):
        raise ValueError(f"split ratios train={train}, valid={valid}: need 0 < train, 0 <= valid, train + valid < 1")
    df = deduplicate(SOURCES[source](raw_path, **(source_options or {})))
    df = core_filter(df, min_user=min_user, min_item=min_item)
    if df.empty:
        raise ValueError(f"{raw_path}: no interactions left after the core filter (min_user={min_user}, min_item={min_item})")

    user_ids, raw_users = _dense_ids(df["user"])
    item_ids, raw_items = _dense_ids(df["item"])
    df = df.assign(user=user_ids, item=item_ids)
    presplit = "split" in df
    if presplit and mode != "chronological":
        raise ValueError(f"{raw_path}: split.mode = {mode!r}, but this source comes split into train and test "
                         "(its own test part is kept); use split.mode chronological")
    if presplit:
        parts = carve_valid(df, share=valid_share, seed=seed)
        protocol = {"min_user": min_user, "min_item": min_item, "presplit": True, "valid_share": valid_share, "seed": seed}
    elif mode == "leave_one_out":
        parts = leave_one_out(df)
        protocol = {"min_user": min_user, "min_item": min_item, "mode": mode}
    elif mode == "holdout":
        parts = holdout_split(df, holdout=holdout, valid_users=valid_users, seed=split_seed)
        protocol = {"min_user": min_user, "min_item": min_item, "mode": mode, "holdout": holdout,
                    "valid_users": valid_users, "seed": split_seed}
    else:
        parts = chrono_split(df, train=train, valid=valid)
        protocol = {"min_user": min_user, "min_item": min_item, "train": train, "valid": valid}
    tables = {
        name: pa.Table.from_pandas(part[["user", "item"]], schema=PAIR_SCHEMA, preserve_index=False)
        for name, part in parts.items()
    }
    stats = {
        "users": int(len(raw_users)),
        "items": int(len(raw_items)),
        "interactions": int(len(df)),
        **{name: int(len(part)) for name, part in parts.items()},
        "density": float(len(df) / (len(raw_users) * len(raw_items))),
    }
    meta = {
        "format_version": FORMAT_VERSION,
        "source": source,
        "raw_file": str(raw_path),
        "protocol": protocol,
        **({"source_options": source_options} if source_options else {}),
        "n_users": stats["users"],
        "n_items": stats["items"],
        "fingerprint": _fingerprint({name: (t["user"].to_numpy(), t["item"].to_numpy()) for name, t in tables.items()}),
        "stats": stats,
    }
    with atomic_path(out_dir) as tmp:
        tmp.mkdir(parents=True)
        for name, table in tables.items():
            pq.write_table(table, tmp / f"{name}.parquet")
        for name, raw in (("users", raw_users), ("items", raw_items)):
            ids = pa.array(np.arange(len(raw), dtype=np.int32))
            pq.write_table(pa.table([ids, pa.array(raw, type=pa.string())], schema=MAP_SCHEMA), tmp / f"{name}.parquet")
        write_json(tmp / "meta.json", meta)
    return stats


def _fingerprint(splits: dict[str, tuple[np.ndarray, np.ndarray]]) -> str:
    digest = hashlib.sha256()
    for name in SPLITS:
        user, item = splits[name]
        digest.update(name.encode())
        digest.update(np.ascontiguousarray(user, dtype=np.int32).tobytes())
        digest.update(np.ascontiguousarray(item, dtype=np.int32).tobytes())
    return digest.hexdigest()[:16]


# ---------------------------------------------------------------- reader


@dataclass(frozen=True)
class Splits:
    """A processed dataset in memory: (user, item) int64 pairs per split."""

    n_users: int
    n_items: int
    train: np.ndarray  # [n_train, 2]
    valid: np.ndarray  # [n_valid, 2]
    test: np.ndarray  # [n_test, 2]
    fingerprint: str
    name: str

    def pairs(self, split: str) -> np.ndarray:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
        return getattr(self, split)


def load_splits(processed_dir: str | Path) -> Splits:
    """Read and validate a processed dataset directory written by `preprocess`."""
    processed_dir = Path(processed_dir)
    meta_path = processed_dir / "meta.json"
    if not meta_path.exists():
        raise FileNotFoundError(f"{processed_dir}: not a processed dataset (no meta.json); run the preprocess stage")
    meta = read_json(meta_path)
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{meta_path}: format_version {meta.get('format_version')}, expected {FORMAT_VERSION}")
    arrays = {}
    for name in SPLITS:
        path = processed_dir / f"{name}.parquet"
        table = pq.read_table(path)
        if table.schema != PAIR_SCHEMA:
            raise ValueError(f"{path}: schema {table.schema} differs from the expected {PAIR_SCHEMA}")
        arrays[name] = np.stack([table["user"].to_numpy(), table["item"].to_numpy()], axis=1).astype(np.int64)
    fingerprint = _fingerprint({k: (v[:, 0], v[:, 1]) for k, v in arrays.items()})
    if fingerprint != meta["fingerprint"]:
        raise ValueError(
            f"{processed_dir}: split files do not match meta.json (fingerprint {fingerprint} vs {meta['fingerprint']})"
        )
    for name, pairs in arrays.items():
        if len(pairs) and (pairs[:, 0].max() >= meta["n_users"] or pairs[:, 1].max() >= meta["n_items"]):
            raise ValueError(f"{processed_dir}/{name}.parquet: ids exceed n_users/n_items in meta.json")
    return Splits(
        n_users=int(meta["n_users"]),
        n_items=int(meta["n_items"]),
        fingerprint=meta["fingerprint"],
        name=processed_dir.name,
        **arrays,
    )
