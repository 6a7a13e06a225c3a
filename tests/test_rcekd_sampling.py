"""RCE-KD's sampled items (paper §5) at T_s ≠ 1, through the public behaviour only: after
`RCEKD.prepare_epoch`, the raw draws `set_items[:, K:]` of many identical users are compared with
p_j ∝ exp(z_j / T_s), z_j = #{i ∈ (Q^T)_2 : s_i < s_j}, computed here from the student's scores, by a
chi-square test that accepts the true temperature (p > 1e-3) and rejects 2·T_s (p < 1e-6), per z-value
and per item. Training items and (Q^T)_2 are never drawn; the mask keeps each distinct draw once.

Two groups of 1,000 users (one chunk never mixes them): an "untrained" student whose (Q^T)_2 items lie
low in its ranking (most items score above some of them), and a "trained" one whose (Q^T)_2 items sit
just below its top-K (few items score above any of them, most have z = 0).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from rcekd.cache import TeacherCache, write_cache
from rcekd.data import Splits
from rcekd.kd import KDContext
from rcekd.kd.rcekd import RCEKD
from rcekd.sparse import UserItems
from test_rcekd_pieces import fixed_mf  # an MF whose score matrix is given

N_ITEMS, K, L = 60, 6, 50
GROUP = 1000  # users per group; 1000 × L = 50,000 draws each
CHUNK = 500
CPU = torch.device("cpu")


def untrained_group() -> tuple[np.ndarray, np.ndarray, set[int]]:
    """Student score j = j; teacher top-6 spread over the student's ranking: (Q^T)_2 = {3, 17, 30, 44}."""
    student = np.arange(N_ITEMS, dtype=np.float64)
    teacher = -np.arange(N_ITEMS, dtype=np.float64) / 100  # distinct, below the chosen ones
    for rank, item in enumerate([59, 3, 17, 30, 58, 44, 0]):  # 0 is a training item: skipped by Q^T
        teacher[item] = 10.0 - rank if item else 20.0
    return student, teacher, {0, 12}


def trained_group() -> tuple[np.ndarray, np.ndarray, set[int]]:
    """A seeded permutation of scores; the teacher's top-6 are the student's non-training ranks
    2, 7, 8, 9, 11 and 14 (1-based), so (Q^T)_2 = ranks 7..14 and about 1/5 of the items score above its lowest."""
    rng = np.random.default_rng(11)
    student = rng.permutation(N_ITEMS).astype(np.float64)
    by_rank = np.argsort(-student, kind="stable")
    train = {int(by_rank[0]), int(by_rank[40])}  # the student's best-scored item is a training item
    ranking = [int(j) for j in by_rank if int(j) not in train]
    teacher = rng.permutation(N_ITEMS).astype(np.float64) / 100
    for rank, position in enumerate([2, 7, 8, 9, 11, 14]):
        teacher[ranking[position - 1]] = 10.0 - rank
    teacher[by_rank[0]] = 50.0  # the teacher's best is a training item: never in Q^T
    return student, teacher, train


GROUPS = {"untrained": untrained_group(), "trained": trained_group()}


def expected(student: np.ndarray, teacher: np.ndarray, train: set[int], temperature: float):
    """Q^T (teacher order), (Q^T)_2, z per item (−1 where not drawable) and p_j ∝ exp(z_j / T_s)."""
    allowed_by_train = [j for j in range(N_ITEMS) if j not in train]
    qt = sorted(allowed_by_train, key=lambda j: -teacher[j])[:K]
    qs = sorted(allowed_by_train, key=lambda j: -student[j])[:K]
    q2 = [j for j in qt if j not in qs]
    z = np.full(N_ITEMS, -1)
    for j in allowed_by_train:
        if j not in q2:
            z[j] = sum(student[i] < student[j] for i in q2)
    weights = np.where(z >= 0, np.exp(np.maximum(z, 0) / temperature), 0.0)
    return qt, q2, z, weights / weights.sum()


def pooled_pvalue(observed: np.ndarray, share: np.ndarray, min_expected: float = 5.0) -> float:
    """Chi-square p-value of counts against shares, cells pooled (smallest expected first) until each
    pooled cell expects at least `min_expected`."""
    n = observed.sum()
    order = np.argsort(share * n, kind="stable")
    obs_cells, exp_cells, obs_acc, exp_acc = [], [], 0.0, 0.0
    for cell in order:
        obs_acc, exp_acc = obs_acc + observed[cell], exp_acc + share[cell] * n
        if exp_acc >= min_expected:
            obs_cells.append(obs_acc)
            exp_cells.append(exp_acc)
            obs_acc = exp_acc = 0.0
    if exp_acc > 0:
        obs_cells[-1] += obs_acc
        exp_cells[-1] += exp_acc
    assert len(obs_cells) >= 3
    return float(chisquare(obs_cells, exp_cells).pvalue)


@pytest.fixture(scope="module")
def ctx(tmp_path_factory) -> KDContext:
    tmp = tmp_path_factory.mktemp("sampling")
    n_users = GROUP * len(GROUPS)
    teacher = np.concatenate([np.tile(t, (GROUP, 1)) for _, t, _ in GROUPS.values()])
    pairs = np.array([[g * GROUP + u, i] for g, (_, _, train) in enumerate(GROUPS.values())
                      for u in range(GROUP) for i in sorted(train)], dtype=np.int64)
    other = np.array([[0, 1]], dtype=np.int64)
    splits = Splits(n_users=n_users, n_items=N_ITEMS, train=pairs, valid=other, test=other,
                    fingerprint="sample01", name="sampling")
    write_cache(fixed_mf(teacher), splits, tmp / "cache", topk=K, checkpoint_sha256="0" * 64, chunk=CHUNK, device=CPU)
    cache = TeacherCache(tmp / "cache", splits=splits, device=CPU, chunk=CHUNK)
    return KDContext(teacher=cache, train=UserItems(pairs, n_users, N_ITEMS), n_users=n_users, n_items=N_ITEMS,
                     device=CPU, chunk=CHUNK)


def test_groups_cover_both_regimes() -> None:
    """The untrained group has most items above its lowest (Q^T)_2 item, the trained group few, and
    both have several z-values among drawable items."""
    for name, (student, teacher, train) in GROUPS.items():
        _, q2, z, _ = expected(student, teacher, train, 1.0)
        above = sum(student[j] > min(student[i] for i in q2) for j in range(N_ITEMS) if j not in train) / N_ITEMS
        assert (above > 0.5) if name == "untrained" else (above < 0.25), (name, above)
        assert len(set(z[z >= 0].tolist())) >= 4, (name, z)


@pytest.mark.parametrize("temperature", [2.0, 0.5])
def test_sampling_follows_exp_z_over_temperature(ctx: KDContext, temperature: float) -> None:
    """Per group: the L raw draws of every user, pooled (50,000), match p_j ∝ exp(z_j / T_s) per z-value
    and per item (p > 1e-3) and not at 2·T_s (p < 1e-6); no training or (Q^T)_2 item is ever drawn;
    A^u's first K columns are Q^T with set_mask = (Q^T)_2; the mask keeps each distinct draw exactly once."""
    method = RCEKD(ctx, k=K, l=L, beta=3.0, sample_temperature=temperature)
    method.prepare_epoch(fixed_mf(np.concatenate([np.tile(s, (GROUP, 1)) for s, _, _ in GROUPS.values()])),
                         torch.Generator().manual_seed(0))
    for g, (name, (student, teacher, train)) in enumerate(GROUPS.items()):
        users = slice(g * GROUP, (g + 1) * GROUP)
        qt, q2, z, share = expected(student, teacher, train, temperature)
        _, _, _, wrong = expected(student, teacher, train, 2 * temperature)
        assert (method.teacher_items[users] == torch.tensor(qt)).all(), name
        assert (method.set_items[users, :K] == torch.tensor(qt)).all(), name
        assert (method.set_mask[users, :K] == torch.tensor([j in q2 for j in qt])).all(), name

        raw = method.set_items[users, K:].numpy()
        assert raw.shape == (GROUP, L)
        counts = np.bincount(raw.ravel(), minlength=N_ITEMS)
        never = sorted(train | set(q2))
        assert counts[never].sum() == 0, (name, {j: int(counts[j]) for j in never if counts[j]})
        drawable = z >= 0

        buckets = sorted(set(z[drawable].tolist()))
        by_z = np.array([counts[z == b].sum() for b in buckets])
        share_z = np.array([share[z == b].sum() for b in buckets])
        wrong_z = np.array([wrong[z == b].sum() for b in buckets])
        assert pooled_pvalue(by_z, share_z) > 1e-3, (name, by_z, share_z * by_z.sum())
        assert pooled_pvalue(by_z, wrong_z) < 1e-6, (name, by_z, wrong_z * by_z.sum())
        assert pooled_pvalue(counts[drawable], share[drawable]) > 1e-3, name
        assert pooled_pvalue(counts[drawable], wrong[drawable]) < 1e-6, name

        mask = method.set_mask[users, K:].numpy()
        for row, keep in zip(raw, mask):
            kept = row[keep]
            assert len(kept) == len(set(kept.tolist())) == len(set(row.tolist())), (name, row, keep)
