"""Data protocol (METHODS.md §1): reading users.dat, dedup, iterative core filter, per-user chronological
8:1:1 split (and MKD's holdout and the sequential leave-one-out), the processed directory and its
validating reader."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rcekd.data import PAIR_SCHEMA, Splits, core_filter, deduplicate, load_splits, preprocess, split_sizes
from rcekd.sources import read_users_dat

ROOT = Path(__file__).resolve().parents[1]
RAW = ROOT / "data" / "raw" / "citeulike-t" / "users.dat"
PROTOCOL = dict(source="users_dat", min_user=5, min_item=0, train=0.8, valid=0.1)


@pytest.fixture(scope="module")
def processed(tmp_path_factory) -> tuple[Path, dict]:
    """CiteULike-t preprocessed once per module with the paper-matching protocol."""
    out = tmp_path_factory.mktemp("processed") / "citeulike-t"
    stats = preprocess(RAW, out, **PROTOCOL)
    return out, stats


def raw_lines() -> list[list[int]]:
    """users.dat parsed independently: line u → the item list after the count field."""
    lines = []
    for line in RAW.read_text().splitlines():
        fields = [int(x) for x in line.split()]
        lines.append(fields[1:])
    return lines


def first_occurrences(items: list[int]) -> list[int]:
    seen, out = set(), []
    for item in items:
        if item not in seen:
            seen.add(item)
            out.append(item)
    return out


def test_citeulike_counts_match_the_paper(processed):
    """5,219 users / 25,181 items / 125,580 interactions, split 98,405 / 12,451 / 14,724."""
    _, stats = processed
    assert (stats["users"], stats["items"], stats["interactions"]) == (5219, 25181, 125580)
    assert (stats["train"], stats["valid"], stats["test"]) == (98405, 12451, 14724)


def test_citeulike_counts_independent_recount():
    """The same numbers from a plain-Python pass over the raw file (dedup, users with >= 5 distinct items)."""
    kept = [first_occurrences(items) for items in raw_lines()]
    kept = [items for items in kept if len(items) >= 5]
    assert len(kept) == 5219
    assert len({i for items in kept for i in items}) == 25181
    assert sum(len(items) for items in kept) == 125580
    n_train = sum(max(8 * len(items) // 10, 1) for items in kept)
    n_train_valid = sum(max(9 * len(items) // 10, max(8 * len(items) // 10, 1)) for items in kept)
    assert (n_train, n_train_valid - n_train) == (98405, 12451)


def test_load_splits_round_trip(processed):
    """load_splits returns the counts, dtypes and id ranges of the written directory."""
    directory, stats = processed
    splits = load_splits(directory)
    assert isinstance(splits, Splits)
    assert (splits.n_users, splits.n_items) == (5219, 25181)
    assert splits.name == "citeulike-t"
    assert isinstance(splits.fingerprint, str) and len(splits.fingerprint) > 0
    for name in ("train", "valid", "test"):
        pairs = splits.pairs(name)
        assert pairs.shape == (stats[name], 2)
        assert pairs.dtype == np.int64
        assert pairs.min() >= 0
        assert pairs[:, 0].max() < splits.n_users and pairs[:, 1].max() < splits.n_items
    every = np.concatenate([splits.train, splits.valid, splits.test])
    assert len(np.unique(every[:, 0] * splits.n_items + every[:, 1])) == 125580  # no pair in two splits
    assert len(np.unique(every[:, 0])) == 5219 and len(np.unique(every[:, 1])) == 25181
    with pytest.raises(ValueError, match="unknown split"):
        splits.pairs("dev")
    # reading twice is stable
    again = load_splits(directory)
    assert again.fingerprint == splits.fingerprint
    np.testing.assert_array_equal(again.test, splits.test)


def test_every_user_split_follows_the_rule(processed):
    """Per user with n interactions: train = max(⌊0.8n⌋, 1), valid = max(⌊0.9n⌋, train) − train, test = rest."""
    directory, _ = processed
    splits = load_splits(directory)
    counts = {name: np.bincount(splits.pairs(name)[:, 0], minlength=splits.n_users) for name in ("train", "valid", "test")}
    n = counts["train"] + counts["valid"] + counts["test"]
    assert n.min() >= 5
    expected_train = np.maximum(8 * n // 10, 1)
    expected_train_valid = np.maximum(9 * n // 10, expected_train)
    np.testing.assert_array_equal(counts["train"], expected_train)
    np.testing.assert_array_equal(counts["valid"], expected_train_valid - expected_train)
    np.testing.assert_array_equal(counts["test"], n - expected_train_valid)


def test_split_is_chronological_in_file_order(processed):
    """For a sample of users, via the raw-id maps: train = the first items of the user's line (file
    order, duplicates dropped), then valid, then test."""
    directory, _ = processed
    splits = load_splits(directory)
    user_raw = pq.read_table(directory / "users.parquet").to_pandas()
    item_raw = pq.read_table(directory / "items.parquet").to_pandas()
    assert user_raw["id"].tolist() == list(range(splits.n_users))
    assert item_raw["id"].tolist() == list(range(splits.n_items))
    raw_to_item = {int(raw): int(new) for new, raw in zip(item_raw["id"], item_raw["raw"])}
    lines = raw_lines()

    rng = np.random.default_rng(0)
    sample = np.concatenate([[0, splits.n_users - 1], rng.choice(splits.n_users, 300, replace=False)])
    per_split = {name: pd.DataFrame(splits.pairs(name), columns=["user", "item"]).groupby("user")["item"].apply(list)
                 for name in ("train", "valid", "test")}
    checked_with_valid = 0
    for user in sample:
        raw_user = int(user_raw["raw"][user])
        sequence = [raw_to_item[i] for i in first_occurrences(lines[raw_user])]
        n = len(sequence)
        n_train = max(8 * n // 10, 1)
        n_train_valid = max(9 * n // 10, n_train)
        got = {name: per_split[name].get(user, []) for name in per_split}
        assert sorted(got["train"]) == sorted(sequence[:n_train]), user
        assert sorted(got["valid"]) == sorted(sequence[n_train:n_train_valid]), user
        assert sorted(got["test"]) == sorted(sequence[n_train_valid:]), user
        checked_with_valid += bool(got["valid"])
    assert checked_with_valid > 100


def test_raw_id_maps_are_sorted_raw_ids(processed):
    """New ids follow the sorted raw ids, and the users kept are exactly those with >= 5 distinct items."""
    directory, _ = processed
    user_raw = pq.read_table(directory / "users.parquet")["raw"].to_pylist()
    expected = [u for u, items in enumerate(raw_lines()) if len(set(items)) >= 5]
    assert [int(u) for u in user_raw] == expected


def test_split_sizes_rule():
    """n = 1..12, the rule written out: train = max(⌊0.8n⌋, 1), train+valid = max(⌊0.9n⌋, train)."""
    n = np.arange(1, 13)
    n_train, n_train_valid = split_sizes(n, train=0.8, valid=0.1)
    #                 n:  1  2  3  4  5  6  7  8  9 10 11 12
    expected_train = [1, 1, 2, 3, 4, 4, 5, 6, 7, 8, 8, 9]
    expected_tv = [1, 1, 2, 3, 4, 5, 6, 7, 8, 9, 9, 10]
    assert list(n_train) == expected_train
    assert list(n_train_valid) == expected_tv
    assert list(n_train) == [max(8 * k // 10, 1) for k in n]
    assert list(n_train_valid) == [max(9 * k // 10, max(8 * k // 10, 1)) for k in n]


def test_core_filter_is_iterative():
    """Dropping the rare item i2 leaves user u2 with one interaction, which must then drop u2 as well."""
    df = pd.DataFrame(
        {
            "user": [0, 0, 1, 1, 2, 2],
            "item": [0, 1, 0, 1, 0, 2],
            "order": [0, 1, 2, 3, 4, 5],
        }
    )
    out = core_filter(df, min_user=2, min_item=2)
    assert sorted(zip(out["user"], out["item"])) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    # with min_item = 0 nothing is dropped; with min_user = 3 everything is
    assert len(core_filter(df, min_user=2, min_item=0)) == 6
    assert len(core_filter(df, min_user=3, min_item=0)) == 0


def test_core_filter_cascades_two_levels():
    """Item 3 occurs once → user 2 falls to 1 → item 2 falls to 1 → user 1 falls to 1 → item 4 falls to 1;
    user 0 keeps its two other items. Five rounds, each removing one row."""
    df = pd.DataFrame(
        {
            "user": [0, 0, 0, 1, 1, 2, 2, 3, 3],
            "item": [0, 1, 4, 4, 2, 2, 3, 0, 1],
            "order": range(9),
        }
    )
    out = core_filter(df, min_user=2, min_item=2)
    assert sorted(zip(out["user"], out["item"])) == [(0, 0), (0, 1), (3, 0), (3, 1)]


def test_deduplicate_keeps_earliest():
    """A repeated (user, item) keeps its first file position, or its earliest time when there is one."""
    df = pd.DataFrame({"user": [0, 0, 0, 1], "item": [5, 6, 5, 5], "order": [0, 1, 2, 3]})
    out = deduplicate(df)
    assert sorted(out["order"]) == [0, 1, 3]

    timed = pd.DataFrame(
        {"user": [0, 0, 0], "item": [5, 6, 5], "order": [0, 1, 2], "time": [30, 10, 20]}
    )
    out = deduplicate(timed)
    assert sorted(zip(out["item"], out["time"])) == [(5, 20), (6, 10)]


def test_read_users_dat_orders_and_users(tmp_path):
    """Line u is user u; `order` is the file position; blank lines are skipped without shifting users."""
    path = tmp_path / "users.dat"
    path.write_text("2 7 3\n1 9\n")
    df = read_users_dat(path)
    assert df["user"].tolist() == ["0", "0", "1"]  # raw ids are kept as text
    assert df["item"].tolist() == ["7", "3", "9"]
    assert df["order"].tolist() == [0, 1, 2]


@pytest.mark.parametrize(
    "content, line, what",
    [
        ("3 1 2 3\n3 1 2\n2 4 5\n", 2, "count field"),
        ("2 1 2\n2 4 5\n2 1 x\n", 3, "integers"),
        ("2 1.5 2\n", 1, "integers"),
    ],
)
def test_read_users_dat_malformed(tmp_path, content, line, what):
    """A malformed line raises ValueError naming the file and the 1-based line number."""
    path = tmp_path / "users.dat"
    path.write_text(content)
    with pytest.raises(ValueError) as err:
        read_users_dat(path)
    message = str(err.value)
    assert str(path) in message
    assert re.search(rf"\bline {line}\b", message), message
    assert what in message
    # preprocess surfaces the same error
    with pytest.raises(ValueError, match=re.escape(str(path))):
        preprocess(path, tmp_path / "out", **PROTOCOL)
    assert not (tmp_path / "out").exists()


def test_load_splits_refuses_altered_parquet(processed, tmp_path):
    """Changing one item id in train.parquet (same schema) is caught by the fingerprint."""
    directory, _ = processed
    copy = tmp_path / "copy"
    shutil.copytree(directory, copy)
    table = pq.read_table(copy / "train.parquet")
    items = table["item"].to_numpy().copy()
    items[10] = (items[10] + 1) % 25181
    altered = pa.table([table["user"], pa.array(items, type=pa.int32())], schema=PAIR_SCHEMA)
    pq.write_table(altered, copy / "train.parquet")
    with pytest.raises(ValueError, match="fingerprint"):
        load_splits(copy)


def test_load_splits_refuses_missing_meta(processed, tmp_path):
    """A directory without meta.json is not a processed dataset."""
    directory, _ = processed
    copy = tmp_path / "copy"
    shutil.copytree(directory, copy)
    (copy / "meta.json").unlink()
    with pytest.raises(FileNotFoundError, match="meta.json"):
        load_splits(copy)


def test_holdout_split_is_mkds_protocol(tmp_path):
    """MKD's split: per user a random 10% held out, whose items are validation targets for a random 10% of
    the users and test targets for the others; seeded, and another seed draws another split."""
    out = tmp_path / "holdout"
    stats = preprocess(RAW, out, **PROTOCOL, mode="holdout", holdout=0.1, valid_users=0.1, split_seed=3)
    splits = load_splits(out)
    train, valid, test = (pd.DataFrame(splits.pairs(name), columns=["user", "item"]) for name in ("train", "valid", "test"))
    n = pd.concat([train, valid, test]).groupby("user").size()
    held = pd.concat([valid, test]).groupby("user").size().reindex(n.index, fill_value=0)
    assert (held == np.clip(np.floor(0.1 * n + 1e-6), 1, n - 1)).all()  # every user: ⌊10%⌋, at least one
    assert not set(valid["user"]) & set(test["user"])  # a user's targets are validation or test, never both
    assert abs(valid["user"].nunique() / splits.n_users - 0.1) < 0.005
    assert stats["valid"] + stats["test"] == held.sum()
    chrono = load_splits(preprocess(RAW, tmp_path / "chrono", **PROTOCOL) and tmp_path / "chrono")
    assert set(map(tuple, splits.test)) != set(map(tuple, chrono.test))  # random, not the last items
    again = load_splits(preprocess(RAW, tmp_path / "again", **PROTOCOL, mode="holdout", split_seed=3) and tmp_path / "again")
    other = load_splits(preprocess(RAW, tmp_path / "other", **PROTOCOL, mode="holdout", split_seed=4) and tmp_path / "other")
    assert again.fingerprint == splits.fingerprint != other.fingerprint


def test_leave_one_out_on_a_hand_made_log(tmp_path):
    """RCE-KD's sequential protocol: per user in time order, file order breaking ties (u1's items 12 and
    13 share a timestamp), the last item is test and the one before it validation; a user with two items
    has no validation target, one with a single item only trains; the protocol has its own fingerprint."""
    log = tmp_path / "log.csv"
    log.write_text("user,item,ts\n"
                   "1,10,5\n1,11,1\n1,12,9\n1,13,9\n1,14,3\n"  # time order 11, 14, 10, then the tie 12, 13 in file order
                   "2,20,7\n2,21,2\n"  # two items: 21 trains, 20 is test
                   "3,30,4\n")  # one item: it trains
    options = {"user": "user", "item": "item", "time": "ts"}
    out = tmp_path / "loo"
    stats = preprocess(log, out, source="table", min_user=0, min_item=0, train=0.8, valid=0.1, source_options=options,
                       mode="leave_one_out")
    splits = load_splits(out)
    raw_user = pq.read_table(out / "users.parquet")["raw"].to_pylist()
    raw_item = pq.read_table(out / "items.parquet")["raw"].to_pylist()
    named = {name: [(raw_user[u], raw_item[i]) for u, i in splits.pairs(name)] for name in ("train", "valid", "test")}
    assert named["test"] == [("1", "13"), ("2", "20")]
    assert named["valid"] == [("1", "12")]
    assert named["train"] == [("1", "11"), ("1", "14"), ("1", "10"), ("2", "21"), ("3", "30")]  # each user's in time order
    assert (stats["train"], stats["valid"], stats["test"]) == (5, 1, 2)
    assert json.loads((out / "meta.json").read_text())["protocol"]["mode"] == "leave_one_out"
    chrono = preprocess(log, tmp_path / "chrono", source="table", min_user=0, min_item=0, train=0.8, valid=0.1,
                        source_options=options)
    assert chrono and load_splits(tmp_path / "chrono").fingerprint != splits.fingerprint


def test_leave_one_out_without_timestamps_is_file_order(processed, tmp_path):
    """CiteULike-t (no timestamps): the last item of each users.dat line is test, the one before valid."""
    stats = preprocess(RAW, tmp_path / "loo", **PROTOCOL, mode="leave_one_out")
    splits = load_splits(tmp_path / "loo")
    assert stats["valid"] == stats["test"] == splits.n_users  # every user has >= 5 items here
    raw_item = pq.read_table(tmp_path / "loo" / "items.parquet")["raw"].to_pylist()
    raw_user = pq.read_table(tmp_path / "loo" / "users.parquet")["raw"].to_pylist()
    lines = raw_lines()
    for split, from_end in (("test", 1), ("valid", 2)):
        for user, item in splits.pairs(split)[:200]:
            assert int(raw_item[item]) == lines[int(raw_user[user])][-from_end]
