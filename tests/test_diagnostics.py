"""Ranking diagnostics (paper Fig. 2, 5, 10) and RCE-KD's A^u overlap (Table 7) against brute-force
computations on random tiny models with a real teacher cache."""

from __future__ import annotations

import csv

import numpy as np
import torch

from rcekd.diagnostics import RankingDiagnostics
from rcekd.kd.common import rows_mask
from rcekd.kd.rcekd import top_share
from rcekd.sparse import UserItems
from tests.test_rcekd_pieces import fixed_mf, make_context

N_USERS, N_ITEMS, K = 7, 12, 4


def random_setup(tmp_path, seed: int = 0):
    rng = np.random.default_rng(seed)
    teacher = rng.normal(size=(N_USERS, N_ITEMS))
    train = {u: set(rng.choice(N_ITEMS, size=rng.integers(1, 4), replace=False).tolist()) for u in range(N_USERS)}
    ctx = make_context(tmp_path, teacher.tolist(), train, topk=K, chunk=3)
    student = rng.normal(size=(N_USERS, N_ITEMS))
    return ctx, teacher, train, student


def test_rows_mask_matches_the_dense_rows(tmp_path):
    ctx, *_ = random_setup(tmp_path)
    users = torch.tensor([5, 0, 3, 3])
    assert torch.equal(rows_mask(ctx.train, users), ctx.train.dense(0, N_USERS)[users])


def test_diagnostics_against_brute_force(tmp_path):
    ctx, teacher, train, student = random_setup(tmp_path)
    diag = RankingDiagnostics(ctx.teacher, ctx.train, users=5, rank_users=3, k=K, seed=1, device=torch.device("cpu"))
    users = diag.users.tolist()
    assert len(set(users)) == 5 and users == sorted(users)
    diag(1, fixed_mf(student))
    diag(2, fixed_mf(-student))
    diag(3, fixed_mf(student))

    s_u, ranks, ndcg = [], {}, []
    for row, u in enumerate(users):
        known = sorted(train[u])
        order = np.argsort(-student[u], kind="stable")
        gains = [1 / np.log2(r + 2) for r, i in enumerate(order[:10]) if i in train[u]]
        ideal = sum(1 / np.log2(r + 2) for r in range(min(len(known), 10)))
        ndcg.append(sum(gains) / ideal)
        t = np.where(np.isin(np.arange(N_ITEMS), known), -np.inf, teacher[u])
        s = np.where(np.isin(np.arange(N_ITEMS), known), -np.inf, student[u])
        qt, qs = np.argsort(-t)[:K], np.argsort(-s)[:K]
        s_u.append(len(set(qt) & set(qs)))
        if row < 3:
            ranks[u] = [int((s > s[i]).sum()) + 1 for i in qt]  # 1 = the best non-training item
    assert abs(diag.epochs[0]["train_ndcg@10"] - np.mean(ndcg)) < 1e-6
    assert abs(diag.epochs[0]["s_u_mean"] - np.mean(s_u) / K) < 1e-6
    assert diag.s_u[1].tolist() == np.bincount(s_u, minlength=K + 1).tolist()

    diag.write(tmp_path / "diag", best_epoch=3)
    with open(tmp_path / "diag/s_u.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert {(r["phase"], r["epoch"]) for r in rows} == {("start", "1"), ("middle", "2"), ("end", "3")}
    assert sum(int(r["users"]) for r in rows if r["phase"] == "end") == 5
    with open(tmp_path / "diag/ranks.csv") as handle:
        written = [r for r in csv.DictReader(handle) if r["phase"] == "end"]
    assert {(int(r["user"]), int(r["teacher_rank"])): int(r["student_rank"]) for r in written} == {
        (u, position + 1): rank for u, listed in ranks.items() for position, rank in enumerate(listed)
    }
    with open(tmp_path / "diag/epochs.csv") as handle:
        assert [r["epoch"] for r in csv.DictReader(handle)] == ["1", "2", "3"]


def test_diagnostics_draw_nothing_from_the_global_generator(tmp_path):
    ctx, _, _, student = random_setup(tmp_path)
    model = fixed_mf(student)  # (building a model draws its initial weights)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    diag = RankingDiagnostics(ctx.teacher, ctx.train, users=4, rank_users=2, k=K, seed=0, device=torch.device("cpu"))
    diag(1, model)
    assert torch.equal(torch.rand(3), expected)


def test_top_share_against_brute_force():
    rng = np.random.default_rng(3)
    scores = torch.tensor(rng.normal(size=(6, 15)), dtype=torch.float32)
    items = torch.tensor(np.stack([rng.choice(15, size=5, replace=False) for _ in range(6)]))
    valid = torch.tensor(rng.random((6, 5)) < 0.7)
    valid[0] = False  # an empty row gives 0
    got = top_share(scores.topk(7, dim=1).indices, items, valid, 15)  # a longer top list is cut to |row|
    for b in range(6):
        size = int(valid[b].sum())
        top = set(torch.argsort(scores[b], descending=True)[:size].tolist())
        listed = [int(i) for i, ok in zip(items[b], valid[b]) if ok]
        expected = sum(i in top for i in listed) / size if size else 0.0
        assert abs(float(got[b]) - expected) < 1e-6, b


def test_user_items_unchanged_by_rows_mask(tmp_path):
    pairs = np.array([[0, 1], [2, 0], [2, 3]])
    known = UserItems(pairs, 3, 4)
    assert rows_mask(known, torch.tensor([1])).sum() == 0
    assert rows_mask(known, torch.tensor([2, 0])).nonzero().tolist() == [[0, 0], [0, 3], [1, 1]]
