"""HetComp and the teacher trajectory it reads, against direct computations on tiny inputs."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from test_kd_baselines import N_USERS, STUDENT_SCORES, TEACHER_SCORES, TRAIN, USERS, ctx, plackett_luce_nll, student_order, student_vectors, teacher_order  # noqa: F401
from test_rcekd_pieces import fixed_mf

from rcekd.kd.hetcomp import HetComp
from rcekd.trajectory import TrajectoryRecorder, read_trajectory

K = 5


def test_trajectory_keeps_checkpoints_before_the_best_epoch(ctx, tmp_path) -> None:  # noqa: F811
    recorder = TrajectoryRecorder(ctx.train, every=2, topk=K, chunk=4, device=torch.device("cpu"))
    models = {epoch: fixed_mf(TEACHER_SCORES + epoch * STUDENT_SCORES) for epoch in range(1, 8)}
    for epoch, model in models.items():
        recorder(epoch, model)
    recorder.write(tmp_path / "trajectory.parquet", best_epoch=6)
    lists = read_trajectory(tmp_path / "trajectory.parquet", N_USERS)
    assert lists.shape == (2, N_USERS, K)  # epochs 2 and 4; 6 is the best epoch itself, the cache's list
    for c, epoch in enumerate((2, 4)):
        scores = TEACHER_SCORES + epoch * STUDENT_SCORES
        for u in range(N_USERS):
            expected = [i for i in np.argsort(-scores[u], kind="stable") if i not in TRAIN[u]][:K]
            assert lists[c, u].tolist() == expected


def with_lists(ctx, lists: list[list[list[int]]]):  # noqa: F811
    return dataclasses.replace(ctx, trajectory=torch.tensor(lists))


def ndcg(ranking: list[int], relevant: list[int]) -> float:
    gains = [1 / np.log2(r + 2) for r, i in enumerate(ranking) if i in relevant]
    return sum(gains) / sum(1 / np.log2(r + 2) for r in range(len(ranking)))


def test_users_advance_by_the_ndcg_ratio_then_the_loss_turns_listwise(ctx) -> None:  # noqa: F811
    easy = [student_order(u)[:K] for u in range(N_USERS)]  # what the student already ranks on top
    easy[0] = teacher_order(0)[:K]  # user 0's first list is as far from the student as the final one
    method = HetComp(with_lists(ctx, [easy]), k=K, alpha=1.05, p=10.0, negatives=6, top=3)
    student, user_vecs, table = student_vectors()
    method.prepare_epoch(student, torch.Generator().manual_seed(0))
    threshold = 1.05 * 0.995 ** (1 / 10)
    for u in range(N_USERS):
        mine, final = student_order(u)[:K], teacher_order(u)[:K]
        ratio = ndcg(mine, easy[u]) / max(ndcg(mine, final), 1e-6)
        assert method.stage[u].item() == int(ratio > threshold)
    assert method.stage[1:].tolist() == [1] * (N_USERS - 1) and method.stage[0].item() == 0
    assert not method.final

    got = method.loss(USERS, user_vecs, table)["kd"].detach().numpy()
    for u in range(N_USERS):
        listed = method.current[u].tolist()
        assert listed == (easy[0] if u == 0 else teacher_order(u)[:K])
        below = method.below[u].tolist()
        assert not set(below) & (set(listed) | TRAIN[u])
        rest = np.log(np.exp(STUDENT_SCORES[u, below]).sum())
        s = STUDENT_SCORES[u, listed]
        np.testing.assert_allclose(got[u], -np.mean(s - np.logaddexp(s, rest)), rtol=1e-5)

    for _ in range(300):  # the threshold relaxes until every user is on the final list
        method.prepare_epoch(student, torch.Generator().manual_seed(1))
        if method.final:
            break
    assert method.final
    got = method.loss(USERS, user_vecs, table)["kd"].detach().numpy()
    for u in range(N_USERS):
        expected = plackett_luce_nll(STUDENT_SCORES[u, teacher_order(u)[:3]].tolist(), STUDENT_SCORES[u, method.below[u]].tolist()) / 3
        np.testing.assert_allclose(got[u], expected, rtol=1e-5)


def test_a_user_the_threshold_holds_advances_after_max_stay_epochs(ctx) -> None:  # noqa: F811
    far = [teacher_order(u)[:K] for u in range(N_USERS)]  # first list = final list: ratio 1, below 1.05
    method = HetComp(with_lists(ctx, [far, far]), k=K, negatives=6, top=3, max_stay=3)
    student = fixed_mf(STUDENT_SCORES)
    stages = []
    for _ in range(8):
        method.prepare_epoch(student, torch.Generator().manual_seed(0))
        stages.append(method.stage.tolist())
    # 3 epochs on each list, then the next: at epochs 4 and 7
    assert [row[0] for row in stages] == [0, 0, 0, 1, 1, 1, 2, 2]
    assert all(len(set(row)) == 1 for row in stages) and method.final


def test_hetcomp_refuses_a_missing_or_short_trajectory(ctx) -> None:  # noqa: F811
    with pytest.raises(ValueError, match="needs the teacher's trajectory"):
        HetComp(ctx, k=K)
    with pytest.raises(ValueError, match="top"):
        HetComp(with_lists(ctx, [[[0, 1]] * N_USERS]), k=K)
