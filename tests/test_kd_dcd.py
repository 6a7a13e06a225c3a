"""DCD against a direct computation on tiny inputs: rank lookups, each item's top users, the
gap weights and draws of both corrections, and the user- and item-side list losses."""

from __future__ import annotations

import numpy as np
import torch
from test_kd_baselines import N_ITEMS, N_USERS, STUDENT_SCORES, TEACHER_SCORES, TRAIN, USERS, ctx, plackett_luce_nll, student_order, student_vectors, teacher_order  # noqa: F401

from rcekd.kd.dcd import DCD, gap_weight, positions_in, top_users

OPTIONS = dict(m=4, n_under=2, n_over=2, mu=0.5, rank_cap=6, rrd={"k": 3, "l": 5, "m": 10})


def column_order(scores: np.ndarray, i: int) -> list[int]:
    """Users ranked by their score for item i, best first, users with i in training left out."""
    return [u for u in np.argsort(-scores[:, i], kind="stable") if i not in TRAIN[u]]


def test_positions_in_by_hand() -> None:
    lists = torch.tensor([[3, 1, 4], [0, 2, 5]])
    entries = torch.tensor([[4, 3, 0], [5, 1, 0]])
    assert positions_in(lists, entries, 6, chunk=1).tolist() == [[2, 0, 3], [2, 3, 0]]


def test_top_users_are_each_items_best_users(ctx) -> None:  # noqa: F811
    from rcekd.kd.dcd import teacher_blocks

    got = top_users(teacher_blocks(ctx), 4)  # chunks of 4 users: the running top-k is exercised
    for i in range(N_ITEMS):
        expected = column_order(TEACHER_SCORES, i)[:4]  # fewer than 4 when the item is in most users' training
        assert got[i].tolist()[: len(expected)] == expected


def test_corrections_draw_by_the_rank_gaps(ctx) -> None:  # noqa: F811
    method = DCD(ctx, item_side=False, **OPTIONS)
    student, user_vecs, table = student_vectors()
    stats = method.prepare_epoch(student, torch.Generator().manual_seed(0))
    under_all = []
    for u in range(N_USERS):
        teacher_top, student_top = teacher_order(u)[:6], student_order(u)[:6]
        rank_s = [student_top.index(i) if i in student_top else 6 for i in teacher_top[:4]]
        rank_t = [teacher_top.index(i) if i in teacher_top else 6 for i in student_top[:4]]
        w_under = [np.tanh(max(0.5 * (r - k), 0)) for k, r in enumerate(rank_s)]
        w_over = [np.tanh(max(0.5 * (r - k), 0)) for k, r in enumerate(rank_t)]
        under_all += w_under
        drawn = method.user_under[u].tolist()
        assert len(set(drawn)) == 2 and drawn == sorted(drawn, key=teacher_top.index)  # distinct, teacher order
        for item, ok in zip(drawn, method.user_under_ok[u].tolist()):
            assert ok == (w_under[teacher_top.index(item)] > 0)
        over = method.user_over[u].tolist()
        assert len(set(over)) == 2 and set(over) <= set(student_top[:4])
        for item, ok in zip(over, method.user_over_ok[u].tolist()):
            assert ok == (w_over[student_top.index(item)] > 0)
        # a positive-weight position is always drawn before a zero-weight one
        assert sum(method.user_under_ok[u].tolist()) == min(2, sum(w > 0 for w in w_under))
    assert np.isclose(stats["under_share"], np.mean([w > 0 for w in under_all]))
    np.testing.assert_allclose(gap_weight(torch.tensor([-3, 0, 2]), 0.5).numpy(), [0, 0, np.tanh(1.0)], rtol=1e-6)


def test_user_side_loss_is_rrd_plus_the_correction_list(ctx) -> None:  # noqa: F811
    method = DCD(ctx, item_side=False, **OPTIONS)
    student, user_vecs, table = student_vectors()
    method.prepare_epoch(student, torch.Generator().manual_seed(3))
    got = method.loss(USERS, user_vecs, table)
    for u in range(N_USERS):
        listed = [STUDENT_SCORES[u, i] for i, ok in zip(method.user_under[u].tolist(), method.user_under_ok[u].tolist()) if ok]
        below = [STUDENT_SCORES[u, i] for i, ok in zip(method.user_over[u].tolist(), method.user_over_ok[u].tolist()) if ok]
        rrd = plackett_luce_nll(STUDENT_SCORES[u, method.rrd.interesting[u]].tolist(), STUDENT_SCORES[u, method.rrd.uninteresting[u]].tolist())
        ucd = plackett_luce_nll(listed, below) if listed else 0.0
        np.testing.assert_allclose(float(got["kd"][u].detach()), rrd + ucd, rtol=1e-5)


def test_item_side_loss_and_its_gradient_reaches_the_listed_users(ctx) -> None:  # noqa: F811
    method = DCD(ctx, **OPTIONS)
    student, user_vecs, table = student_vectors()
    method.prepare_epoch(student, torch.Generator().manual_seed(5))
    items = torch.tensor([0, 7, 19])
    loss = method.item_loss(items, table)
    expected = []
    for i in items.tolist():
        teacher_top = column_order(TEACHER_SCORES, i)[:4]
        under = method.item_under[i].tolist()
        assert set(under) <= set(teacher_top) and under == sorted(under, key=teacher_top.index)
        listed = [STUDENT_SCORES[u, i] for u, ok in zip(under, method.item_under_ok[i].tolist()) if ok]
        below = [STUDENT_SCORES[u, i] for u, ok in zip(method.item_over[i].tolist(), method.item_over_ok[i].tolist()) if ok]
        expected.append(plackett_luce_nll(listed, below) if listed else 0.0)
    np.testing.assert_allclose(float(loss.detach()), np.mean(expected), rtol=1e-5)
    loss.backward()
    touched = set(torch.cat([method.item_under[items], method.item_over[items]]).flatten().tolist())
    grad_rows = set(torch.nonzero(student.user_emb.weight.grad.abs().sum(1)).flatten().tolist())
    assert grad_rows <= touched and (grad_rows or not any(expected))


def test_item_batches_walk_the_permutation_and_wrap_around(ctx) -> None:  # noqa: F811
    method = DCD(ctx, item_batch=15, **OPTIONS)
    method.prepare_epoch(student_vectors()[0], torch.Generator().manual_seed(2))
    order = method.item_order.tolist()
    taken = [method.take_items().tolist() for _ in range(3)]  # 45 slots over 40 items
    assert sum(taken, []) == order + order[:5]
