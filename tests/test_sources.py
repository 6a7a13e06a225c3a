"""Raw formats: real excerpts, the published datasets in ../shared/data, and malformed input."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from rcekd.data import load_splits, preprocess
from rcekd.sources import read_recbole_inter, read_snap_checkins, read_table, read_yelp_reviews

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
needs_shared = pytest.mark.skipif(not SHARED.exists(), reason="../shared/data (the development datasets) is not beside this checkout")
SPLIT = {"train": 0.8, "valid": 0.1}


@needs_shared
def test_gowalla_lightgcn_as_published(tmp_path):
    """The LightGCN Gowalla keeps its published size and test split; validation is a seeded 1/9 of train."""
    stats = preprocess(SHARED / "gowalla-lightgcn", tmp_path / "g", source="lightgcn", min_user=0, min_item=0,
                       valid_share=1 / 9, seed=0, **SPLIT)
    assert (stats["users"], stats["items"], stats["interactions"]) == (29858, 40981, 1027370)
    assert stats["test"] == 217242 and stats["train"] + stats["valid"] == 810128
    splits = load_splits(tmp_path / "g")
    n_train = np.bincount(splits.train[:, 0], minlength=splits.n_users)
    n_valid = np.bincount(splits.valid[:, 0], minlength=splits.n_users)
    expected = np.minimum(np.floor((n_train + n_valid) / 9 + 1e-9), n_train + n_valid - 1)
    assert np.array_equal(n_valid, expected)
    again = preprocess(SHARED / "gowalla-lightgcn", tmp_path / "g2", source="lightgcn", min_user=0, min_item=0,
                       valid_share=1 / 9, seed=0, **SPLIT)
    assert again == stats and load_splits(tmp_path / "g2").fingerprint == splits.fingerprint
    other = preprocess(SHARED / "gowalla-lightgcn", tmp_path / "g3", source="lightgcn", min_user=0, min_item=0,
                       valid_share=1 / 9, seed=1, **SPLIT)
    assert load_splits(tmp_path / "g3").fingerprint != splits.fingerprint and other["valid"] == stats["valid"]


@needs_shared
def test_snap_sample_ten_core_chronological(tmp_path):
    """On the real SNAP-layout sample: 10-core holds, and per user train < valid < test in time."""
    path = SHARED / "gowalla-checkins-sample" / "loc-gowalla_totalCheckins.sample.txt.gz"
    stats = preprocess(path, tmp_path / "s", source="snap_checkins", min_user=10, min_item=10, **SPLIT)
    splits = load_splits(tmp_path / "s")
    pairs = np.concatenate([splits.train, splits.valid, splits.test])
    assert np.bincount(pairs[:, 0]).min() >= 10 and np.bincount(pairs[:, 1]).min() >= 10
    assert stats["interactions"] == len(pairs) and stats["users"] == splits.n_users

    raw = read_snap_checkins(path).sort_values(["time", "order"]).drop_duplicates(["user", "item"])
    first_time = {(u, i): t for u, i, t in zip(raw["user"], raw["item"], raw["time"])}
    users = pq.read_table(tmp_path / "s/users.parquet")["raw"].to_pylist()
    items = pq.read_table(tmp_path / "s/items.parquet")["raw"].to_pylist()
    times = {name: pd.DataFrame({"user": getattr(splits, name)[:, 0],
                                 "time": [first_time[(users[u], items[i])] for u, i in getattr(splits, name)]})
             for name in ("train", "valid", "test")}
    last_train = times["train"].groupby("user")["time"].max()
    first_valid, last_valid = times["valid"].groupby("user")["time"].min(), times["valid"].groupby("user")["time"].max()
    first_test = times["test"].groupby("user")["time"].min()
    assert (last_train.reindex(first_valid.index) <= first_valid).all()
    assert (last_valid.reindex(first_test.index).dropna() <= first_test.reindex(last_valid.index).dropna()).all()
    assert (last_train.reindex(first_test.index) <= first_test).all()


def test_yelp_reviews_positive_only(tmp_path):
    path = tmp_path / "review.json"
    rows = [
        {"review_id": "r1", "user_id": "u1", "business_id": "b1", "stars": 5.0, "date": "2018-01-02 10:00:00"},
        {"review_id": "r2", "user_id": "u1", "business_id": "b2", "stars": 3.0, "date": "2018-01-03 10:00:00"},
        {"review_id": "r3", "user_id": "u2", "business_id": "b1", "stars": 4.0, "date": "2017-12-31 09:00:00"},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    df = read_yelp_reviews(path, min_stars=4)
    assert list(zip(df["user"], df["item"])) == [("u1", "b1"), ("u2", "b1")]
    assert df["time"].tolist() == [1514887200, 1514710800]


def test_recbole_inter_and_tables(tmp_path):
    inter = tmp_path / "x.inter"
    inter.write_text("user_id:token\titem_id:token\trating:float\ttimestamp:float\nA\tx\t5\t100\nB\ty\t1\t50\nA\ty\t4\t20\n")
    df = read_recbole_inter(inter, min_rating=4)
    assert list(zip(df["user"], df["item"], df["time"])) == [("A", "x", 100), ("A", "y", 20)]
    csv = tmp_path / "log.csv"
    csv.write_text("who,what,when\nA,x,2020-01-01T00:00:00Z\nB,y,2020-01-02T00:00:00Z\n")
    df = read_table(csv, user="who", item="what", time="when")
    assert df["time"].tolist() == [1577836800, 1577923200]
    tsv = tmp_path / "log.tsv"
    tsv.write_text("u\ti\nA\tx\n")
    assert read_table(tsv, user="u", item="i")["item"].tolist() == ["x"]
    parquet = tmp_path / "log.parquet"
    pd.DataFrame({"u": [1, 2], "i": [3, 4], "t": [10, 20]}).to_parquet(parquet)
    assert read_table(parquet, user="u", item="i", time="t")["time"].tolist() == [10, 20]


@pytest.mark.parametrize(
    "name, content, reader, kwargs, message",
    [
        ("x.inter", "user_id:token\trating:float\nA\t1\n", read_recbole_inter, {}, "no 'item_id' column"),
        ("x.inter", "user_id:token\titem_id:token\ttimestamp:float\nA\tx\tsoon\n", read_recbole_inter, {}, "unreadable timestamp"),
        ("log.csv", "who,what\nA,x\n", read_table, {"user": "who", "item": "item_id"}, "missing column"),
        ("log.csv", "who,what,when\nA,x,yesterday-ish\n", read_table, {"user": "who", "item": "what", "time": "when"}, "unreadable timestamp"),
        ("r.json", '{"user_id": "u", "stars": 5, "date": "2018-01-01"}\n', read_yelp_reviews, {}, "missing field"),
        ("r.json", '{"user_id": "u", "business_id": "b", "stars": 5, "date": "not a date"}\n', read_yelp_reviews, {}, "unreadable timestamp"),
        ("c.txt", "0\t2010-10-19T15:55:27Z\t30.2\t-97.7\n", read_snap_checkins, {}, "expected 5 tab-separated columns"),
        ("c.txt", "0\tlast tuesday\t30.2\t-97.7\t12\n", read_snap_checkins, {}, "unreadable timestamp"),
    ],
)
def test_malformed_input_names_file_and_problem(tmp_path, name, content, reader, kwargs, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(ValueError) as err:
        reader(path, **kwargs)
    assert str(path) in str(err.value) and message in str(err.value), str(err.value)


def test_empty_after_filter_is_an_error(tmp_path):
    path = tmp_path / "c.txt.gz"
    with gzip.open(path, "wt") as handle:
        handle.write("0\t2010-10-19T15:55:27Z\t30.2\t-97.7\t12\n1\t2010-10-19T15:56:27Z\t30.2\t-97.7\t13\n")
    with pytest.raises(ValueError, match=r"c\.txt\.gz: no interactions left after the core filter"):
        preprocess(path, tmp_path / "out", source="snap_checkins", min_user=10, min_item=10, **SPLIT)
    assert not (tmp_path / "out").exists()


@needs_shared
def test_recbole_and_table_agree_with_snap_on_real_checkins(tmp_path):
    """The real check-in sample written as a RecBole .inter file and as a CSV preprocesses to the same split."""
    path = SHARED / "gowalla-checkins-sample" / "loc-gowalla_totalCheckins.sample.txt.gz"
    raw = read_snap_checkins(path).head(20000)
    snap = tmp_path / "c.txt"
    pd.DataFrame({"u": raw["user"], "t": pd.to_datetime(raw["time"], unit="s").dt.strftime("%Y-%m-%dT%H:%M:%SZ"),
                  "a": 0.0, "b": 0.0, "i": raw["item"]}).to_csv(snap, sep="\t", header=False, index=False)
    inter = tmp_path / "gowalla.inter"
    with open(inter, "w") as handle:
        handle.write("user_id:token\titem_id:token\ttimestamp:float\n")
        for u, i, t in zip(raw["user"], raw["item"], raw["time"]):
            handle.write(f"{u}\t{i}\t{t}\n")
    csv = tmp_path / "log.csv"
    raw.rename(columns={"user": "uid", "item": "loc", "time": "ts"})[["uid", "loc", "ts"]].to_csv(csv, index=False)
    runs = {
        "snap": preprocess(snap, tmp_path / "a", source="snap_checkins", min_user=5, min_item=5, **SPLIT),
        "inter": preprocess(inter, tmp_path / "b", source="recbole_inter", min_user=5, min_item=5, **SPLIT),
        "csv": preprocess(csv, tmp_path / "c", source="table", min_user=5, min_item=5,
                          source_options={"user": "uid", "item": "loc", "time": "ts"}, **SPLIT),
    }
    assert runs["snap"] == runs["inter"] == runs["csv"] and runs["snap"]["interactions"] > 1000
    fingerprints = {load_splits(tmp_path / d).fingerprint for d in "abc"}
    assert len(fingerprints) == 1
