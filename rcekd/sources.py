"""Raw interaction sources, each in the format it is published in.

Every reader returns a DataFrame with columns `user`, `item` (raw ids as strings), `order` (position
in the file) and, where the format has them, `time` (int64 seconds since the epoch) or `split`
('train' / 'test', for data published pre-split). Errors name the file and the problem.
"""

from __future__ import annotations

import functools
import gzip
import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq


def _reader(read):
    """A reader whose decoding and CSV-structure errors name the file, as its own errors do."""

    @functools.wraps(read)
    def checked(path: str | Path, *args, **kwargs) -> pd.DataFrame:
        try:
            return read(path, *args, **kwargs)
        except UnicodeDecodeError as err:
            raise ValueError(f"{path}: not UTF-8 text ({err.reason}, byte {err.object[err.start:err.start + 1]!r})") from None
        except pd.errors.ParserError as err:
            raise ValueError(f"{path}: {err}") from None

    return checked


def _exists(path: str | Path) -> Path:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: dataset file not found (fetch it with `rcekd fetch` or fix its path in params.yaml)")
    return path


def _open_text(path: Path):
    return gzip.open(path, "rt") if path.suffix == ".gz" else open(path)


def _frame(path: Path, users: list, items: list, **extra) -> pd.DataFrame:
    if not users:
        raise ValueError(f"{path}: no interactions found")
    frame = pd.DataFrame({"user": pd.Series(users, dtype=str), "item": pd.Series(items, dtype=str), **extra})
    blank = lambda ids: ids.isna() | (ids.str.strip() == "")  # noqa: E731  (a JSON null is a missing id too)
    empty = (blank(frame["user"]) | blank(frame["item"])).to_numpy()
    if empty.any():
        first = int(np.flatnonzero(empty)[0])
        raise ValueError(f"{path}: {int(empty.sum())} interaction(s) with an empty user or item id, first at row {first + 1}")
    frame["order"] = np.arange(len(frame), dtype=np.int64)
    return frame


def _adjacency_lines(path: Path, *, counted: bool) -> tuple[list[str], list[str]]:
    """Lines `<n> item item ...` (counted, user = line number) or `user item item ...`."""
    users, items = [], []
    with _open_text(path) as handle:
        for lineno, line in enumerate(handle, start=1):
            fields = line.split()
            if not fields:
                continue
            if not all(f.isascii() and f.isdigit() for f in fields):
                raise ValueError(f"{path}, line {lineno}: expected non-negative integers, got {line.strip()[:60]!r}")
            if counted:
                if int(fields[0]) != len(fields) - 1:
                    raise ValueError(
                        f"{path}, line {lineno}: count field says {fields[0]} items but the line has {len(fields) - 1}"
                    )
                user, rest = str(lineno - 1), fields[1:]
            else:
                user, rest = fields[0], fields[1:]
            users += [user] * len(rest)
            items += rest
    return users, items


@_reader
def read_users_dat(path: str | Path) -> pd.DataFrame:
    """CiteULike-t `users.dat`: line u (0-based) is `<n> <item> <item> ...`; no timestamps."""
    path = _exists(path)
    return _frame(path, *_adjacency_lines(path, counted=True))


@_reader
def read_lightgcn(path: str | Path) -> pd.DataFrame:
    """NGCF/LightGCN layout: a directory with train.txt and test.txt, lines `user item item ...`.

    Published pre-split (random 80/20, no timestamps): rows carry split = 'train' or 'test'.
    """
    path = _exists(path)
    parts = []
    for split in ("train", "test"):
        users, items = _adjacency_lines(_exists(path / f"{split}.txt"), counted=False)
        parts.append(_frame(path / f"{split}.txt", users, items, split=split))
    frame = pd.concat(parts, ignore_index=True)
    frame["order"] = np.arange(len(frame), dtype=np.int64)
    return frame


def _parse_times(path: Path, values: pd.Series, column: str) -> np.ndarray:
    times = pd.to_datetime(values, utc=True, errors="coerce")
    bad = times.isna()
    if bad.any():
        first = int(np.flatnonzero(bad.to_numpy())[0])
        raise ValueError(f"{path}: {int(bad.sum())} unreadable timestamp(s) in {column!r}, first {values.iloc[first]!r} (row {first + 1})")
    try:
        return ((times - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(seconds=1)).to_numpy().astype(np.int64)
    except (ValueError, OverflowError) as err:  # a date pandas parsed but cannot count in seconds ('-1': year −1)
        raise ValueError(f"{path}: a timestamp in {column!r} out of range ({err})") from None


@_reader
def read_snap_checkins(path: str | Path) -> pd.DataFrame:
    """SNAP `loc-gowalla_totalCheckins.txt(.gz)`: user, ISO time, latitude, longitude, location id (tabs)."""
    path = _exists(path)
    try:
        table = pd.read_csv(path, sep="\t", header=None, dtype=str, keep_default_na=False)
    except pd.errors.EmptyDataError:
        raise ValueError(f"{path}: empty file") from None
    if table.shape[1] != 5:
        raise ValueError(f"{path}: expected 5 tab-separated columns (user, time, lat, lon, location), found {table.shape[1]}")
    return _frame(path, list(table[0]), list(table[4]), time=_parse_times(path, table[1], "time"))


@_reader
def read_yelp_reviews(path: str | Path, *, min_stars: float = 4.0) -> pd.DataFrame:
    """Yelp Open Dataset reviews, JSON lines with user_id, business_id, stars, date; stars >= min_stars."""
    path = _exists(path)
    columns = ("user_id", "business_id", "stars", "date")
    records = []
    with _open_text(path) as handle:
        for lineno, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}, line {lineno}: not JSON ({err.msg})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}, line {lineno}: expected a JSON object, got {type(record).__name__}")
            missing = [c for c in columns if c not in record]
            if missing:
                raise ValueError(f"{path}, line {lineno}: missing field(s) {missing}")
            records.append([record[c] for c in columns])
    if not records:
        raise ValueError(f"{path}: no reviews found")
    table = pd.DataFrame(records, columns=columns)
    stars = pd.to_numeric(table["stars"], errors="coerce")
    if stars.isna().any():
        raise ValueError(f"{path}: non-numeric 'stars' value {table['stars'][stars.isna()].iloc[0]!r}")
    times = _parse_times(path, table["date"], "date")
    keep = (stars >= min_stars).to_numpy()
    return _frame(path, list(table["user_id"][keep]), list(table["business_id"][keep]), time=times[keep])


@_reader
def read_recbole_inter(path: str | Path, *, min_rating: float | None = None) -> pd.DataFrame:
    """RecBole atomic `.inter`: tab-separated, header `user_id:token item_id:token [rating:float] [timestamp:float]`."""
    path = _exists(path)
    with _open_text(path) as handle:
        header = handle.readline().rstrip("\n").split("\t")
        body = handle.read()
    names = {field.split(":")[0]: field for field in header}
    for needed in ("user_id", "item_id"):
        if needed not in names:
            raise ValueError(f"{path}: header has no {needed!r} column (header: {header})")
    table = pd.read_csv(io.StringIO(body), sep="\t", header=None, names=list(names), dtype=str, keep_default_na=False)
    extra = {}
    if "timestamp" in names:
        stamps = pd.to_numeric(table["timestamp"], errors="coerce")
        if stamps.isna().any():
            raise ValueError(f"{path}: unreadable timestamp {table['timestamp'][stamps.isna()].iloc[0]!r}")
        extra["time"] = stamps.to_numpy().astype(np.int64)
    keep = np.ones(len(table), dtype=bool)
    if min_rating is not None:
        if "rating" not in names:
            raise ValueError(f"{path}: min_rating is set but the header has no 'rating' column")
        keep = (pd.to_numeric(table["rating"], errors="coerce") >= min_rating).to_numpy()
    return _frame(path, list(table["user_id"][keep]), list(table["item_id"][keep]), **{k: v[keep] for k, v in extra.items()})


@_reader
def read_table(
    path: str | Path, *, user: str, item: str, time: str | None = None, sep: str | None = None
) -> pd.DataFrame:
    """Any interaction log as CSV / TSV / Parquet, with the names of its user, item and time columns."""
    path = _exists(path)
    if path.suffix == ".parquet":
        table = pq.read_table(path).to_pandas().astype(str)
    else:
        delimiter = sep or ("\t" if path.suffix in (".tsv", ".tab") else ",")
        table = pd.read_csv(path, sep=delimiter, dtype=str, keep_default_na=False)
    wanted = {"user": user, "item": item, **({"time": time} if time else {})}
    missing = [column for column in wanted.values() if column not in table.columns]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}; the file has {list(table.columns)}")
    extra = {}
    if time:
        values = table[time]
        numeric = pd.to_numeric(values, errors="coerce")
        extra["time"] = numeric.to_numpy().astype(np.int64) if numeric.notna().all() else _parse_times(path, values, time)
    return _frame(path, list(table[user]), list(table[item]), **extra)


SOURCES = {
    "users_dat": read_users_dat,
    "lightgcn": read_lightgcn,
    "snap_checkins": read_snap_checkins,
    "yelp_reviews": read_yelp_reviews,
    "recbole_inter": read_recbole_inter,
    "table": read_table,
}
