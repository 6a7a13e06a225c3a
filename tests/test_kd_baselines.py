"""The competing distillation methods and the RCE-KD ablations, each against a direct computation
on tiny inputs: which items each one samples, and the loss it computes from them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_rcekd_pieces import fixed_mf, make_context, reference_ce

from rcekd.kd import CD, RRD, SLD, FullCE, UnKD
from rcekd.kd.cd import soft_labels
from rcekd.kd.common import list_nll, soft_ce
from rcekd.kd.rcekd import RCEKD, scheduled_gamma
from rcekd.kd.unkd import popularity_groups

N_USERS, N_ITEMS = 6, 40
RNG = np.random.default_rng(0)
TEACHER_SCORES = RNG.normal(size=(N_USERS, N_ITEMS)).astype(np.float32).astype(np.float64)  # exact in float32, no ties
STUDENT_SCORES = RNG.normal(size=(N_USERS, N_ITEMS)).astype(np.float32).astype(np.float64)
TRAIN = {u: set(RNG.choice(N_ITEMS, 3, replace=False).tolist()) for u in range(N_USERS)}
USERS = torch.arange(N_USERS)


@pytest.fixture
def ctx(tmp_path):
    return make_context(tmp_path, TEACHER_SCORES.tolist(), TRAIN, topk=20, chunk=4)


def student_vectors():
    student = fixed_mf(STUDENT_SCORES)
    return student, *student.encode(USERS)


def teacher_order(u: int) -> list[int]:
    """The teacher's ranking of u's non-training items, best first."""
    return [i for i in np.argsort(-TEACHER_SCORES[u], kind="stable") if i not in TRAIN[u]]


def student_order(u: int) -> list[int]:
    return [i for i in np.argsort(-STUDENT_SCORES[u], kind="stable") if i not in TRAIN[u]]


def plackett_luce_nll(listed: list[float], below: list[float]) -> float:
    """−log P(listed in this order above every `below` item), one factor per position."""
    total = 0.0
    for k, score in enumerate(listed):
        rest = listed[k:] + below
        total -= score - np.log(np.sum(np.exp(rest)))
    return total


def test_list_nll_is_the_plackett_luce_likelihood() -> None:
    listed = [[2.0, 0.5, -1.0], [0.1, 0.3, 0.2]]
    below = [[0.0, 1.5], [-2.0, 4.0]]
    got = list_nll(torch.tensor(listed), torch.tensor(below))
    np.testing.assert_allclose(got.numpy(), [plackett_luce_nll(a, b) for a, b in zip(listed, below)], rtol=1e-6)
    masked = list_nll(torch.tensor(listed), torch.tensor(below), list_mask=torch.tensor([[True, False, True]] * 2))
    np.testing.assert_allclose(masked.numpy()[0], plackett_luce_nll([2.0, -1.0], below[0]), rtol=1e-6)


@pytest.mark.parametrize("sample", [True, False])
def test_rrd_lists_and_loss(ctx, sample) -> None:
    method = RRD(ctx, k=4, l=6, m=10, t=2.0, sample=sample)
    student, user_vecs, table = student_vectors()
    method.prepare_epoch(student, torch.Generator().manual_seed(1))
    for u in range(N_USERS):
        top = teacher_order(u)[:10]
        listed = method.interesting[u].tolist()
        assert len(set(listed)) == 4 and set(listed) <= set(top)
        assert listed == sorted(listed, key=top.index)  # kept in teacher order
        if not sample:
            assert listed == top[:4]
        below = method.uninteresting[u].tolist()
        assert not set(below) & (set(top) | TRAIN[u])
    loss = method.loss(USERS, user_vecs, table)["kd"]
    expected = [
        plackett_luce_nll(STUDENT_SCORES[u, method.interesting[u]].tolist(), STUDENT_SCORES[u, method.uninteresting[u]].tolist())
        for u in range(N_USERS)
    ]
    np.testing.assert_allclose(loss.detach().numpy(), expected, rtol=1e-5)


def test_rrd_sampling_favours_the_teacher_top(ctx) -> None:
    method = RRD(ctx, k=2, l=2, m=10, t=1.0)
    counts = np.zeros(10)
    generator = torch.Generator().manual_seed(0)
    for _ in range(200):
        method.prepare_epoch(fixed_mf(STUDENT_SCORES), generator)
        top = teacher_order(0)[:10]
        for item in method.interesting[0].tolist():
            counts[top.index(item)] += 1
    assert counts[0] > counts[3] > counts[9]


def test_cd_soft_labels_by_hand() -> None:
    scores = torch.tensor([[0.0, 2.0, -4.0]])
    np.testing.assert_allclose(soft_labels(scores, t1=2.0, t2=0.0).numpy(), [[0.5, 1 / (1 + np.exp(-1)), 1 / (1 + np.exp(2))]], rtol=1e-6)
    np.testing.assert_allclose(soft_labels(scores, t1=1.0, t2=1.0).numpy(), 1 / (1 + np.exp(-(scores.numpy() + 1))), rtol=1e-6)


def test_cd_samples_and_loss(ctx) -> None:
    method = CD(ctx, n=3, pool=8, rank_temperature=4.0, t1=2.0)
    student, user_vecs, table = student_vectors()
    method.prepare_epoch(student, torch.Generator().manual_seed(0))
    for u in range(N_USERS):
        items = method.items[u].tolist()
        assert len(set(items)) == 3 and set(items) <= set(student_order(u)[:8])
    loss = method.loss(USERS, user_vecs, table)["kd"]
    s = STUDENT_SCORES[np.arange(N_USERS)[:, None], method.items.numpy()]
    y = 1 / (1 + np.exp(-TEACHER_SCORES[np.arange(N_USERS)[:, None], method.items.numpy()] / 2.0))
    bce = -(y * np.log(1 / (1 + np.exp(-s))) + (1 - y) * np.log(1 - 1 / (1 + np.exp(-s))))
    np.testing.assert_allclose(loss.detach().numpy(), bce.mean(1), rtol=1e-5)


def test_sld_samples_and_loss(ctx) -> None:
    method = SLD(ctx, q=6, t=3.0, pool=10)
    student, user_vecs, table = student_vectors()
    method.prepare_epoch(student, torch.Generator().manual_seed(0))
    loss = method.loss(USERS, user_vecs, table)["kd"]
    for u in range(N_USERS):
        items = method.items[u].tolist()
        assert set(items) <= set(student_order(u)[:10])
        distinct = list(dict.fromkeys(items))
        assert method.mask[u].sum() == len(distinct)
        assert loss[u].item() == pytest.approx(reference_ce(TEACHER_SCORES[u, distinct], STUDENT_SCORES[u, distinct]), rel=1e-5)


def test_full_ce_over_every_non_training_item(ctx) -> None:
    method = FullCE(ctx)
    _, user_vecs, table = student_vectors()
    loss = method.loss(USERS, user_vecs, table)["kd"]
    for u in range(N_USERS):
        keep = [i for i in range(N_ITEMS) if i not in TRAIN[u]]
        assert loss[u].item() == pytest.approx(reference_ce(TEACHER_SCORES[u, keep], STUDENT_SCORES[u, keep]), rel=1e-5)


@pytest.mark.parametrize("resident_gb", [2.0, 0.0])  # the teacher's distribution kept, or recomputed per batch
def test_full_ce_gradient_matches_the_masked_soft_ce(ctx, resident_gb) -> None:
    method = FullCE(ctx, tau=2.0, resident_gb=resident_gb)
    _, user_vecs, table = student_vectors()
    user_vecs = user_vecs.detach().requires_grad_()
    grad = torch.autograd.grad(method.loss(USERS, user_vecs, table)["kd"].sum(), user_vecs)[0]
    keep = torch.tensor([[i not in TRAIN[u] for i in range(N_ITEMS)] for u in range(N_USERS)])
    teacher = torch.tensor(TEACHER_SCORES, dtype=torch.float32)
    reference = soft_ce(teacher, user_vecs @ table.T, mask=keep, tau=2.0)
    assert torch.allclose(torch.autograd.grad(reference.sum(), user_vecs)[0], grad, atol=1e-5)


def test_popularity_groups_have_equal_mass() -> None:
    # item popularity: 0 → 6, 1 → 3, 2 → 2, 3 → 1, 4 → 0 (total 12); quarters of the mass at 3, 6, 9
    items = np.array([0] * 6 + [1] * 3 + [2] * 2 + [3])
    np.testing.assert_array_equal(popularity_groups(items, 5, 4), [0, 2, 3, 3, 3])
    np.testing.assert_array_equal(popularity_groups(items, 5, 2), [0, 1, 1, 1, 1])


def test_unkd_pairs_and_loss(ctx) -> None:
    method = UnKD(ctx, groups=2, pairs_per_group=3, pool=5, t=5.0)
    student, user_vecs, table = student_vectors()
    method.prepare_epoch(student, torch.Generator().manual_seed(0))
    group = method.group.numpy()
    for u in range(N_USERS):
        order = teacher_order(u)
        for high, low, ok in zip(method.high[u].tolist(), method.low[u].tolist(), method.ok[u].tolist()):
            in_group = [i for i in order if group[i] == group[high]]
            assert ok == (len(in_group) >= 2)
            if ok:  # two of the group's top-5 non-training items, the teacher's better one first
                assert group[low] == group[high] and order.index(high) < order.index(low)
                assert in_group.index(low) < 5
    assert method.high.shape == (N_USERS, 6) and method.ok.any()
    loss = method.loss(USERS, user_vecs, table)["kd"]
    rows = np.arange(N_USERS)[:, None]
    gap = STUDENT_SCORES[rows, method.high.numpy()] - STUDENT_SCORES[rows, method.low.numpy()]
    ok = method.ok.numpy()
    np.testing.assert_allclose(loss.detach().numpy(), (np.log1p(np.exp(-gap)) * ok).sum(1) / np.maximum(ok.sum(1), 1), rtol=1e-5)


def test_unkd_user_with_too_few_items_in_a_group(tmp_path) -> None:
    """Group 0 holds the two most popular items; user 0 trained on one of them: no group-0 pairs."""
    teacher = RNG.normal(size=(3, 8)).astype(np.float32).astype(np.float64)
    train = {0: {0}, 1: {0, 1, 2}, 2: {0, 1, 3}}
    context = make_context(tmp_path, teacher.tolist(), train, topk=4, chunk=2)
    method = UnKD(context, groups=2, pairs_per_group=2, pool=4, t=5.0)
    assert method.group.tolist()[:2] == [0, 0]
    method.prepare_epoch(fixed_mf(teacher), torch.Generator().manual_seed(0))
    assert method.ok[:, :2].tolist() == [[False, False], [False, False], [False, False]]


def rcekd(ctx, **kwargs):
    method = RCEKD(ctx, k=5, l=4, beta=3.0, **kwargs)
    student, user_vecs, table = student_vectors()
    method.prepare_epoch(student, torch.Generator().manual_seed(0))
    return method, method.loss(USERS, user_vecs, table)


def test_rcekd_ablation_wo_t_is_l1_and_wo_s_is_ce_on_the_teacher_top(ctx) -> None:
    _, full = rcekd(ctx)
    _, wo_t = rcekd(ctx, variant="wo_t")
    torch.testing.assert_close(wo_t["kd"].mean(), full["l1"])
    _, wo_s = rcekd(ctx, variant="wo_s")
    for u in range(N_USERS):
        top = teacher_order(u)[:5]
        assert wo_s["kd"][u].item() == pytest.approx(reference_ce(TEACHER_SCORES[u, top], STUDENT_SCORES[u, top]), rel=1e-5)


def test_rcekd_ablation_wo_sep_is_one_ce_on_the_union(ctx) -> None:
    method, out = rcekd(ctx, variant="wo_sep")
    for u in range(N_USERS):
        union = set(method.student_items[u].tolist())
        union |= {i for i, ok in zip(method.set_items[u].tolist(), method.set_mask[u].tolist()) if ok}
        union = sorted(union)
        assert out["kd"][u].item() == pytest.approx(reference_ce(TEACHER_SCORES[u, union], STUDENT_SCORES[u, union]), rel=1e-5)


def test_rcekd_gamma_shapes_and_schedules(ctx) -> None:
    exponential, _ = rcekd(ctx)
    linear, _ = rcekd(ctx, gamma_shape="linear")
    share = -torch.log(exponential.gamma) / 3.0  # s_u back from γ_u = exp(−3 s_u)
    torch.testing.assert_close(linear.gamma, 1 - share, rtol=1e-5, atol=1e-6)
    constant, _ = rcekd(ctx, gamma_schedule="constant", gamma_value=0.3)
    assert torch.all(constant.gamma == 0.3)
    assert [scheduled_gamma("decreasing", e, epochs=5, value=0) for e in (1, 3, 5, 9)] == [1.0, 0.5, 0.0, 0.0]
    assert [scheduled_gamma("increasing", e, epochs=5, value=0) for e in (1, 3, 5, 9)] == [0.0, 0.5, 1.0, 1.0]
    with pytest.raises(ValueError, match="variant"):
        rcekd(ctx, variant="wo_everything")
