"""RCE-KD (METHODS.md §5): its pure tensor pieces on hand examples, then one epoch of `RCEKD` on a tiny
real setup (hand-set teacher and student MF, a real teacher cache) checked set by set."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from rcekd.backbones import MF
from rcekd.cache import TeacherCache, write_cache
from rcekd.data import Splits
from rcekd.kd import KDContext
from rcekd.kd.rcekd import RCEKD, dedupe_rows, draw_by_z, in_lists, mixing_weight, ordered_keys, rank_above_counts
from rcekd.sparse import UserItems

# ---------------------------------------------------------------- pure pieces


def test_in_lists():
    """items[b, n] ∈ members[b, :], optionally only where members_mask; rows are independent."""
    items = torch.tensor([[0, 3, 5], [1, 2, 2]])
    members = torch.tensor([[3, 4], [2, 0]])
    got = in_lists(items, members)
    assert got.tolist() == [[False, True, False], [False, True, True]]

    members_mask = torch.tensor([[True, False], [False, True]])  # members are {3} and {0}
    got = in_lists(items, members, members_mask=members_mask)
    assert got.tolist() == [[False, True, False], [False, False, False]]

    # the last item id (n_items − 1) is a real item, not the spare column
    got = in_lists(torch.tensor([[5, 4]]), torch.tensor([[5, 5]]), members_mask=torch.tensor([[False, True]]))
    assert got.tolist() == [[True, False]]


def test_rank_above_counts_hand_example():
    """1 user, 9 items; reference = items 2, 4, 6 (item 0 is in the list but masked out).

    item:   0    1    2    3    4    5    6    7    8
    score: 0.5  3.0  1.0  7.0  2.0  6.0  4.0  5.0  2.0
    reference scores {1.0, 2.0, 4.0}; z_j = #reference scores strictly below s_j:
    z:      0    2    0    3    1    3    2    3    1     (item 8 ties item 4: not counted)
    """
    scores = torch.tensor([[0.5, 3.0, 1.0, 7.0, 2.0, 6.0, 4.0, 5.0, 2.0]])
    ref_items = torch.tensor([[2, 4, 6, 0]])
    ref_mask = torch.tensor([[True, True, True, False]])
    z = rank_above_counts(scores, ref_items, ref_mask)
    assert z.tolist() == [[0, 2, 0, 3, 1, 3, 2, 3, 1]]


def test_rank_above_counts_brute_force():
    """Random scores with ties and -inf entries, several users, against a double loop."""
    gen = torch.Generator().manual_seed(3)
    scores = torch.randint(0, 6, (5, 15), generator=gen).float()
    scores[0, :3] = float("-inf")
    ref_items = torch.stack([torch.randperm(15, generator=gen)[:6] for _ in range(5)])
    ref_mask = torch.rand(5, 6, generator=gen) < 0.6
    z = rank_above_counts(scores, ref_items, ref_mask)
    for b in range(5):
        refs = [scores[b, i].item() for i, m in zip(ref_items[b].tolist(), ref_mask[b].tolist()) if m]
        for j in range(15):
            assert z[b, j].item() == sum(r < scores[b, j].item() for r in refs), (b, j)


def dense_z_weights(scores, ref_items, ref_mask, table) -> torch.Tensor:
    """The reference sampler's weights: table[z] over every item, 0 for excluded (−inf) and reference items."""
    weights = table[rank_above_counts(scores, ref_items, ref_mask)].masked_fill(torch.isneginf(scores), 0.0)
    return weights.scatter(1, ref_items, torch.where(ref_mask, 0.0, weights.gather(1, ref_items)))


def test_draw_by_z_draws_the_dense_distribution():
    """The bucket sampler draws p_j ∝ table[z_j] over eligible items, as the dense |I|-wide multinomial
    does: per row pattern (ties, −inf, ±0.0 among the scores, no reference at all, a bucket 0 big enough
    for rejection and one too small), a chi-square test of its item counts against the exact
    probabilities, of its z-bucket counts against the dense sampler's draws at the same seed, and of
    the counts against a wrong temperature (which must fail: the test has power)."""
    gen = torch.Generator().manual_seed(5)
    n_items, k = 40, 9
    patterns = torch.randint(-8, 9, (6, n_items), generator=gen).float() / 2
    patterns[0, :5] = float("-inf")  # excluded items
    patterns[1, :4] = torch.tensor([0.0, -0.0, 1e-30, -1e-30])
    ref_items = torch.stack([torch.randperm(n_items, generator=gen)[:k] for _ in range(6)])
    ref_mask = torch.rand(6, k, generator=gen) < 0.6
    ref_mask[2] = False  # no reference: every z is 0
    others = torch.tensor([i for i in torch.randperm(n_items, generator=gen).tolist() if i not in (1, 2)])
    ref_items[1] = torch.cat([torch.tensor([1, 2]), others[: k - 2]])  # −0.0 and 1e-30 as references (distinct, as Q^T is)
    ref_mask[1, :2] = True
    patterns[3] = torch.arange(n_items).float()  # references at the top: bucket 0 holds most items (rejection)
    ref_items[3] = torch.tensor([39, 36, 33, 30, 37, 38, 31, 32, 35])  # z = 1, 2, 3 above item 30
    ref_mask[3] = torch.arange(k) < 4
    patterns[4] = torch.arange(n_items).float()  # references at the bottom: every item listed
    ref_items[4], ref_mask[4] = torch.arange(k), True
    copies, draws = 400, 50
    scores = patterns.repeat_interleave(copies, 0)
    refs, mask = ref_items.repeat_interleave(copies, 0), ref_mask.repeat_interleave(copies, 0)
    excluded = torch.isneginf(scores).sum(1)
    for temperature, wrong in ((10.0, 5.0), (0.5, 1.0)):
        table = torch.exp(torch.arange(k + 1, dtype=torch.float32) / temperature)
        drawn = draw_by_z(scores, refs, mask, table, draws, excluded, torch.Generator().manual_seed(0))
        dense = torch.multinomial(dense_z_weights(scores, refs, mask, table), draws, replacement=True,
                                  generator=torch.Generator().manual_seed(0))
        wrong_table = torch.exp(torch.arange(k + 1, dtype=torch.float32) / wrong)
        z_all = rank_above_counts(patterns, ref_items, ref_mask)
        for p in range(6):
            counts = torch.bincount(drawn[p * copies : (p + 1) * copies].reshape(-1), minlength=n_items).double()
            weights = dense_z_weights(patterns[p : p + 1], ref_items[p : p + 1], ref_mask[p : p + 1], table)[0].double()
            eligible = weights > 0
            assert counts[~eligible].sum() == 0, (p, "drew an excluded or reference item")
            expected = weights[eligible] / weights.sum() * counts.sum()
            assert stats.chisquare(counts[eligible], expected).pvalue > 1e-3, (temperature, p)
            z = z_all[p]
            dense_counts = torch.bincount(dense[p * copies : (p + 1) * copies].reshape(-1), minlength=n_items).double()
            by_z = [[float(c[(z == b) & eligible].sum()) for b in range(k + 1)] for c in (counts, dense_counts)]
            used = [b for b in range(k + 1) if by_z[0][b] + by_z[1][b] > 0]
            if len(used) > 1:
                table_2xb = np.array([[row[b] for b in used] for row in by_z])
                assert stats.chi2_contingency(table_2xb).pvalue > 1e-3, (temperature, p, table_2xb)
                wrong_w = dense_z_weights(patterns[p : p + 1], ref_items[p : p + 1], ref_mask[p : p + 1], wrong_table)[0].double()
                wrong_expected = wrong_w[eligible] / wrong_w.sum() * counts.sum()
                assert stats.chisquare(counts[eligible], wrong_expected).pvalue < 1e-6, (temperature, p)


def test_ordered_keys_keep_the_order_of_floats():
    values = torch.tensor([float("-inf"), -3e38, -1.0, -1e-30, -0.0, 0.0, 1e-30, 1.0, 3e38, float("inf")])
    keys = ordered_keys(values)
    assert (keys[1:] >= keys[:-1]).all() and keys[4] == keys[5]  # −0.0 == +0.0, as `<` sees them
    assert int(keys.min()) >= 0 and int(keys.max()) < 2**32
    shuffled = torch.randn(1000)
    assert torch.equal(torch.argsort(ordered_keys(shuffled), stable=True), torch.argsort(shuffled, stable=True))


def test_mixing_weight():
    """γ = exp(−β s): 1 with no overlap, exp(−β) with full overlap."""
    overlap = torch.tensor([0.0, 0.25, 0.5, 1.0])
    got = mixing_weight(overlap, beta=3.0)
    np.testing.assert_allclose(got.numpy(), [1.0, math.exp(-0.75), math.exp(-1.5), math.exp(-3.0)], rtol=1e-6)
    assert mixing_weight(torch.tensor([0.7]), beta=0.0).item() == 1.0


def test_dedupe_rows():
    """Later repeats of an item in a row are masked; the first stays; rows are independent; invalid
    entries stay invalid."""
    items = torch.tensor([[3, 1, 3, 2, 1, 3], [4, 4, 4, 0, 5, 6], [1, 2, 3, 4, 5, 6]])
    valid = torch.ones_like(items, dtype=torch.bool)
    got = dedupe_rows(items, valid)
    assert got.tolist() == [
        [True, True, False, True, False, False],
        [True, False, False, True, True, True],
        [True] * 6,
    ]
    valid[2, 4] = False
    assert dedupe_rows(items, valid)[2].tolist() == [True, True, True, True, False, True]


# ---------------------------------------------------------------- a tiny real setup

K, L, BETA = 4, 6, 3.0
N_ITEMS = 12
TRAIN = {0: {0, 1}, 1: {5}, 2: {10, 11}}
# Teacher scores (dim = n_items, item table = identity, so a user's vector is its score row)
TEACHER = [
    [100, 99, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2],  # top-4 non-train: 2 3 4 5
    [12, 11, 10, 9, 0, 50, 1, 2, 3, 4, 5, 6],  # top-4 non-train: 0 1 2 3
    [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 99, 98],  # top-4 non-train: 9 8 7 6
]
STUDENT = [
    [50, 49, 9, 8, 1, 2, 10, 11, 3, 4, 5, 6],  # top-4 non-train: 7 6 2 3 → Q1 = {2, 3}, Q2 = {4, 5}
    [1, 2, 3, 4, 12, 99, 11, 10, 9, 5, 6, 7],  # top-4 non-train: 4 6 7 8 → Q1 = {}, Q2 = {0, 1, 2, 3}
    [0, 1, 2, 3, 4, 5, 20, 21, 22, 23, 50, 60],  # top-4 non-train: 9 8 7 6 → Q1 = all, Q2 = {}
]
EXPECTED_QT = [[2, 3, 4, 5], [0, 1, 2, 3], [9, 8, 7, 6]]
EXPECTED_QS = [{7, 6, 2, 3}, {4, 6, 7, 8}, {9, 8, 7, 6}]
EXPECTED_Q2 = [{4, 5}, {0, 1, 2, 3}, set()]


def fixed_mf(scores) -> MF:
    """An MF whose score matrix is exactly `scores` (user vectors = rows, item table = identity)."""
    scores = torch.as_tensor(scores, dtype=torch.float32)
    model = MF(n_users=scores.shape[0], n_items=scores.shape[1], dim=scores.shape[1])
    with torch.no_grad():
        model.user_emb.weight.copy_(scores)
        model.item_emb.weight.copy_(torch.eye(scores.shape[1]))
    return model


def make_splits(train: dict[int, set[int]], n_users: int, n_items: int) -> Splits:
    pairs = np.array([[u, i] for u in sorted(train) for i in sorted(train[u])], dtype=np.int64).reshape(-1, 2)
    other = np.array([[0, n_items - 1]], dtype=np.int64)
    return Splits(n_users=n_users, n_items=n_items, train=pairs, valid=other, test=other, fingerprint="tiny0001", name="tiny")


def make_context(tmp_path, teacher_scores, train, *, topk: int = 6, chunk: int = 2) -> KDContext:
    n_users, n_items = len(teacher_scores), len(teacher_scores[0])
    splits = make_splits(train, n_users, n_items)
    write_cache(fixed_mf(teacher_scores), splits, tmp_path / "cache", topk=topk, checkpoint_sha256="0" * 64,
                chunk=chunk, device=torch.device("cpu"))
    cache = TeacherCache(tmp_path / "cache", splits=splits, device=torch.device("cpu"), chunk=chunk)
    return KDContext(
        teacher=cache,
        train=UserItems(splits.train, n_users, n_items),
        n_users=n_users,
        n_items=n_items,
        device=torch.device("cpu"),
        chunk=chunk,
    )


def reference_ce(teacher: np.ndarray, student: np.ndarray, tau: float = 1.0) -> float:
    """CE on one set: softmaxes with explicit exp / sum in float64."""
    t = np.asarray(teacher, np.float64) / tau
    s = np.asarray(student, np.float64) / tau
    p_t = np.exp(t - t.max()) / np.exp(t - t.max()).sum()
    log_p_s = s - s.max() - np.log(np.exp(s - s.max()).sum())
    return float(-(p_t * log_p_s).sum())


@pytest.fixture
def ctx(tmp_path) -> KDContext:
    return make_context(tmp_path, TEACHER, TRAIN)


def prepared(ctx, **kwargs) -> tuple[RCEKD, dict, MF]:
    method = RCEKD(ctx, k=K, l=L, beta=BETA, **kwargs)
    student = fixed_mf(STUDENT)
    stats = method.prepare_epoch(student, torch.Generator().manual_seed(0))
    return method, stats, student


def test_rcekd_sets_and_gamma(ctx):
    """Q^T, Q^S, the (Q^T)_1 / (Q^T)_2 split via set_mask, γ per user and the logged stats."""
    method, stats, _ = prepared(ctx)
    assert method.teacher_items.tolist() == EXPECTED_QT
    for u in range(3):
        assert set(method.student_items[u].tolist()) == EXPECTED_QS[u], u
        assert method.set_items[u, :K].tolist() == EXPECTED_QT[u]
        in_q2 = [item in EXPECTED_Q2[u] for item in EXPECTED_QT[u]]
        assert method.set_mask[u, :K].tolist() == in_q2, u
    q1_share = np.array([2 / 4, 0 / 4, 4 / 4])
    np.testing.assert_allclose(method.gamma.numpy(), np.exp(-BETA * q1_share), rtol=1e-6)
    assert stats["overlap"] == pytest.approx(q1_share.mean())
    assert stats["gamma"] == pytest.approx(np.exp(-BETA * q1_share).mean(), rel=1e-6)


def test_rcekd_sampled_items(ctx):
    """Sampled items (set_items[:, K:] where set_mask): never training items nor (Q^T)_2, no repeats;
    dedup only removes repeats; the stored teacher logits are the teacher's scores of those items."""
    method, _, _ = prepared(ctx)
    teacher = np.array(TEACHER, np.float32)
    for u in range(3):
        raw = method.set_items[u, K:].tolist()
        kept = [item for item, ok in zip(raw, method.set_mask[u, K:].tolist()) if ok]
        assert len(kept) >= 1
        assert len(kept) == len(set(kept)), (u, kept)
        assert set(kept) == set(raw), (u, raw, kept)  # paper sampling: masking only drops repeats
        assert not set(kept) & TRAIN[u], (u, kept)
        assert not set(kept) & EXPECTED_Q2[u], (u, kept)
        np.testing.assert_array_equal(method.set_teacher_logits[u].numpy(), teacher[u, method.set_items[u].numpy()])
        np.testing.assert_array_equal(method.student_teacher_logits[u].numpy(), teacher[u, method.student_items[u].numpy()])


def test_rcekd_sampling_deterministic(ctx):
    """The same generator seed gives the same epoch."""
    a, _, _ = prepared(ctx)
    b, _, _ = prepared(ctx)
    assert torch.equal(a.set_items, b.set_items) and torch.equal(a.set_mask, b.set_mask)


@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_rcekd_loss_matches_direct_computation(ctx, tau):
    """loss = (1 − γ)·CE(Q^S) + γ·CE(A^u), A^u = (Q^T)_2 ∪ sampled as a set, computed here in numpy."""
    method = RCEKD(ctx, k=K, l=L, beta=BETA, tau=tau)
    student = fixed_mf(STUDENT)
    method.prepare_epoch(student, torch.Generator().manual_seed(0))
    teacher, scores = np.array(TEACHER, np.float64), np.array(STUDENT, np.float64)

    users = torch.tensor([2, 0, 1])
    user_vecs, item_table = student.encode(users)
    out = method.loss(users, user_vecs, item_table)
    assert out["kd"].shape == (3,)

    expected, l1s, l2s = [], [], []
    for u in users.tolist():
        qs = sorted(EXPECTED_QS[u])
        sampled = {i for i, ok in zip(method.set_items[u, K:].tolist(), method.set_mask[u, K:].tolist()) if ok}
        a_u = sorted(EXPECTED_Q2[u] | sampled)
        l1 = reference_ce(teacher[u, qs], scores[u, qs], tau)
        l2 = reference_ce(teacher[u, a_u], scores[u, a_u], tau)
        gamma = math.exp(-BETA * len(set(EXPECTED_QT[u]) - EXPECTED_Q2[u]) / K)
        expected.append((1 - gamma) * l1 + gamma * l2)
        l1s.append(l1)
        l2s.append(l2)
    np.testing.assert_allclose(out["kd"].detach().numpy(), expected, rtol=1e-5, atol=1e-6)
    assert out["l1"].item() == pytest.approx(np.mean(l1s), rel=1e-5)
    assert out["l2"].item() == pytest.approx(np.mean(l2s), rel=1e-5)

    # gradients reach the student's parameters and are finite
    out["kd"].sum().backward()
    assert torch.isfinite(student.user_emb.weight.grad).all()
    assert student.item_emb.weight.grad.abs().sum() > 0


def test_rcekd_sampling_distribution_follows_z(tmp_path):
    """p_j ∝ exp(z_j / T_s): with 3,000 identical users and T_s = 1, the first draw of each user lands in
    each z-group with the predicted frequency, and higher-z groups are drawn more often overall.

    20 items, student score of item j = j; train {0, 12}; teacher top-4 = 16, 3, 7, 11, so Q^S = {16..19},
    (Q^T)_1 = {16}, (Q^T)_2 = {3, 7, 11}. z-groups among allowed items (not train, not (Q^T)_2):
    z=0: {1, 2}; z=1: {4, 5, 6}; z=2: {8, 9, 10}; z=3: {13..19}.
    """
    n_users, n_items = 3000, 20
    train = {u: {0, 12} for u in range(n_users)}
    teacher_row = [0.0] * n_items
    for item, score in {16: 10, 3: 9, 7: 8, 11: 7, 0: 100, 12: 90}.items():
        teacher_row[item] = float(score)
    for j in range(n_items):
        if teacher_row[j] == 0.0:
            teacher_row[j] = -j / 100  # distinct, below the top-4
    ctx = make_context(tmp_path, [teacher_row] * n_users, train, topk=4, chunk=1024)
    method = RCEKD(ctx, k=4, l=5, beta=BETA, sample_temperature=1.0)
    assert method.teacher_items[0].tolist() == [16, 3, 7, 11]
    method.prepare_epoch(fixed_mf([list(range(n_items))] * n_users), torch.Generator().manual_seed(0))

    groups = {0: [1, 2], 1: [4, 5, 6], 2: [8, 9, 10], 3: [13, 14, 15, 16, 17, 18, 19]}
    mass = {z: len(items) * math.exp(z) for z, items in groups.items()}
    total = sum(mass.values())
    allowed = {i for items in groups.values() for i in items}

    sampled = method.set_items[:, 4:]
    assert set(sampled.unique().tolist()) <= allowed
    first = sampled[:, 0].tolist()
    for z, items in groups.items():
        freq = sum(item in items for item in first) / n_users
        assert freq == pytest.approx(mass[z] / total, abs=0.03), (z, freq, mass[z] / total)

    counts = torch.bincount(sampled.reshape(-1), minlength=n_items).double()
    per_item = [counts[items].mean().item() for _, items in sorted(groups.items())]
    assert per_item == sorted(per_item) and per_item[0] * 5 < per_item[-1], per_item


def test_rcekd_code_sampling(ctx):
    """sampling="code": L distinct items from the student's top-M non-train items; the mask drops only
    the (Q^T)_2 items among them (they are already in A^u)."""
    m = 8
    method = RCEKD(ctx, k=K, l=5, beta=BETA, sampling="code", pool_top_m=m)
    method.prepare_epoch(fixed_mf(STUDENT), torch.Generator().manual_seed(0))
    scores = np.array(STUDENT, np.float64)
    for u in range(3):
        ranking = [i for i in np.argsort(-scores[u], kind="stable").tolist() if i not in TRAIN[u]]
        top_m = set(ranking[:m])
        sampled = method.set_items[u, K:].tolist()
        assert len(sampled) == 5 and len(set(sampled)) == 5, sampled
        assert set(sampled) <= top_m, (u, sampled, top_m)
        assert method.set_mask[u, K:].tolist() == [i not in EXPECTED_Q2[u] for i in sampled]
        # Q^T, Q^S and γ do not depend on the sampling variant
        assert set(method.student_items[u].tolist()) == EXPECTED_QS[u]
    np.testing.assert_allclose(method.gamma.numpy(), np.exp(-BETA * np.array([0.5, 0.0, 1.0])), rtol=1e-6)


def test_rcekd_code_sampling_pool_larger_than_non_train_items(ctx):
    """pool_top_m = n_items (accepted by the constructor) while user 0 has only 10 non-training items:
    the library must either refuse the setting or still keep training items out of A^u."""
    try:
        method = RCEKD(ctx, k=K, l=5, beta=BETA, sampling="code", pool_top_m=N_ITEMS)
    except ValueError:
        return  # refusing the setting is an acceptable answer
    for seed in range(10):
        method.prepare_epoch(fixed_mf(STUDENT), torch.Generator().manual_seed(seed))
        for u in range(3):
            kept = [i for i, ok in zip(method.set_items[u, K:].tolist(), method.set_mask[u, K:].tolist()) if ok]
            assert not set(kept) & TRAIN[u], (seed, u, kept)


def test_rcekd_code_sampling_pool_equals_l_takes_the_whole_pool(ctx):
    """With M = L the sample is exactly the student's top-M."""
    method = RCEKD(ctx, k=K, l=5, beta=BETA, sampling="code", pool_top_m=5)
    method.prepare_epoch(fixed_mf(STUDENT), torch.Generator().manual_seed(0))
    scores = np.array(STUDENT, np.float64)
    for u in range(3):
        ranking = [i for i in np.argsort(-scores[u], kind="stable").tolist() if i not in TRAIN[u]]
        assert set(method.set_items[u, K:].tolist()) == set(ranking[:5])


@pytest.mark.parametrize("sampling", ["paper", "code"])
def test_rcekd_gamma_from_sampled(ctx, sampling):
    """gamma_from="sampled": γ = exp(−β · |Q^T ∩ sampled| / K)."""
    kwargs = {"pool_top_m": 8} if sampling == "code" else {}
    method = RCEKD(ctx, k=K, l=L, beta=BETA, sampling=sampling, gamma_from="sampled", **kwargs)
    stats = method.prepare_epoch(fixed_mf(STUDENT), torch.Generator().manual_seed(1))
    expected = []
    for u in range(3):
        shared = set(EXPECTED_QT[u]) & set(method.set_items[u, K:].tolist())
        expected.append(math.exp(-BETA * len(shared) / K))
    np.testing.assert_allclose(method.gamma.numpy(), expected, rtol=1e-6)
    assert stats["overlap"] == pytest.approx(0.5)  # the logged overlap is still |(Q^T)_1| / K


def test_rcekd_keep_train_items(ctx):
    """keep_train_items=True: training items stay in the teacher's and the student's lists."""
    method, _, _ = prepared(ctx, keep_train_items=True)
    assert method.teacher_items[0].tolist() == [0, 1, 2, 3]
    assert set(method.student_items[0].tolist()) == {0, 1, 7, 6}
    assert set(method.student_items[2].tolist()) == {11, 10, 9, 8}


def test_rcekd_rejects_unknown_options(ctx):
    """Unknown sampling / gamma_from values and an impossible pool size are errors."""
    with pytest.raises(ValueError, match="sampling"):
        RCEKD(ctx, k=K, l=L, beta=BETA, sampling="uniform")
    with pytest.raises(ValueError, match="gamma_from"):
        RCEKD(ctx, k=K, l=L, beta=BETA, gamma_from="teacher")
    with pytest.raises(ValueError, match="pool_top_m"):
        RCEKD(ctx, k=K, l=L, beta=BETA, sampling="code", pool_top_m=L - 1)
