"""The soft-label CE on a set (`soft_ce`, METHODS.md notation): −Σ_{i∈J} σ(t/τ, J)_i · log σ(s/τ, J)_i,
against a float64 numpy computation with explicit exp and sum; and the vanilla CE method built on it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rcekd.backbones import MF
from rcekd.cache import TeacherCache, write_cache
from rcekd.data import Splits
from rcekd.kd import KDContext, common
from rcekd.kd.ce import VanillaCE
from rcekd.kd.common import pair_scores, soft_ce
from rcekd.sparse import UserItems


def reference_ce(teacher: np.ndarray, student: np.ndarray, mask: np.ndarray | None, tau: float) -> np.ndarray:
    """Row by row: softmax of each side over the row's set only (explicit exp / sum), then the CE."""
    out = []
    for b in range(teacher.shape[0]):
        keep = np.ones(teacher.shape[1], bool) if mask is None else mask[b]
        if not keep.any():
            out.append(0.0)
            continue
        t = teacher[b, keep].astype(np.float64) / tau
        s = student[b, keep].astype(np.float64) / tau
        p_t = np.exp(t - t.max()) / np.exp(t - t.max()).sum()
        log_p_s = (s - s.max()) - np.log(np.exp(s - s.max()).sum())
        out.append(float(-(p_t * log_p_s).sum()))
    return np.array(out)


@pytest.fixture
def logits():
    gen = torch.Generator().manual_seed(0)
    teacher = torch.randn(4, 7, generator=gen) * 3
    student = torch.randn(4, 7, generator=gen) * 2
    return teacher, student


@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_soft_ce_unmasked(logits, tau):
    """Without a mask every item of the row is in the set."""
    teacher, student = logits
    got = soft_ce(teacher, student, tau=tau)
    assert got.shape == (4,)
    np.testing.assert_allclose(got.numpy(), reference_ce(teacher.numpy(), student.numpy(), None, tau), rtol=1e-5)


def test_soft_ce_tau_matters(logits):
    """τ = 2 gives a different value from τ = 1 (the temperature is really applied)."""
    teacher, student = logits
    assert not torch.allclose(soft_ce(teacher, student, tau=1.0), soft_ce(teacher, student, tau=2.0))


def test_soft_ce_small_hand_value():
    """Two items, equal teacher logits, student logits (0, log 3): CE = −½ log ¼ − ½ log ¾."""
    got = soft_ce(torch.tensor([[0.0, 0.0]]), torch.tensor([[0.0, float(np.log(3.0))]]))
    assert got.item() == pytest.approx(-0.5 * np.log(0.25) - 0.5 * np.log(0.75), rel=1e-6)


@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_soft_ce_masked(logits, tau):
    """Masked entries are excluded from both softmaxes; their logits, however large, change nothing."""
    teacher, student = logits
    mask = torch.tensor(
        [
            [1, 1, 1, 1, 1, 1, 1],
            [1, 0, 1, 0, 1, 0, 1],
            [0, 0, 0, 0, 0, 0, 1],  # a single item: p_t = 1, log p_s = 0
            [1, 1, 0, 0, 0, 0, 0],
        ],
        dtype=torch.bool,
    )
    got = soft_ce(teacher, student, mask=mask, tau=tau)
    expected = reference_ce(teacher.numpy(), student.numpy(), mask.numpy(), tau)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5, atol=1e-6)
    assert got[2].item() == pytest.approx(0.0, abs=1e-6)

    # huge logits on masked entries do not leak into the softmaxes
    noisy_t = teacher.masked_fill(~mask, 50.0)
    noisy_s = student.masked_fill(~mask, -50.0)
    np.testing.assert_allclose(soft_ce(noisy_t, noisy_s, mask=mask, tau=tau).numpy(), expected, rtol=1e-5, atol=1e-6)


def test_soft_ce_all_masked_row_is_zero_with_finite_gradients(logits):
    """A row with an empty set gives 0; backward gives no NaN/inf anywhere and zero gradient on that row."""
    teacher, student = logits
    student = student.clone().requires_grad_(True)
    mask = torch.ones(4, 7, dtype=torch.bool)
    mask[1] = False
    mask[3, :5] = False
    loss = soft_ce(teacher, student, mask=mask)
    assert loss[1].item() == 0.0
    assert torch.isfinite(loss).all()
    loss.sum().backward()
    assert student.grad is not None
    assert torch.isfinite(student.grad).all()
    assert torch.equal(student.grad[1], torch.zeros(7))
    assert torch.equal(student.grad[3, :5], torch.zeros(5))  # masked entries get no gradient
    assert student.grad[3, 5:].abs().sum() > 0


def test_soft_ce_gradient_matches_closed_form(logits):
    """∂CE/∂s = (σ(s/τ) − σ(t/τ)) / τ on the set, 0 elsewhere (checks the gradient, not just the value)."""
    teacher, student = logits
    tau = 2.0
    mask = torch.tensor([[1, 1, 1, 0, 0, 1, 1]] * 4, dtype=torch.bool)
    student = student.clone().requires_grad_(True)
    soft_ce(teacher, student, mask=mask, tau=tau).sum().backward()
    for b in range(4):
        keep = mask[b].numpy()
        t = teacher[b].numpy()[keep].astype(np.float64) / tau
        s = student[b].detach().numpy()[keep].astype(np.float64) / tau
        expected = np.zeros(7)
        expected[keep] = (np.exp(s) / np.exp(s).sum() - np.exp(t) / np.exp(t).sum()) / tau
        np.testing.assert_allclose(student.grad[b].numpy(), expected, atol=1e-6)


@pytest.mark.parametrize("masked", [False, True])
def test_soft_ce_extreme_logits(masked):
    """Logits of ±1e4 give finite values and gradients (log-softmax, not log of a softmax)."""
    teacher = torch.tensor([[1e4, -1e4, 0.0, 1e4], [-1e4, -1e4, -1e4, 1e4]])
    student = torch.tensor([[-1e4, 1e4, 0.0, -1e4], [1e4, -1e4, 1e4, -1e4]], requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 1]], dtype=torch.bool) if masked else None
    loss = soft_ce(teacher, student, mask=mask)
    assert torch.isfinite(loss).all(), loss
    loss.sum().backward()
    assert torch.isfinite(student.grad).all(), student.grad
    expected = reference_ce(teacher.numpy(), student.detach().numpy(), None if mask is None else mask.numpy(), 1.0)
    np.testing.assert_allclose(loss.detach().numpy(), expected, rtol=1e-5)
    assert (loss > 1e3).all()  # the student puts ~all mass where the teacher puts ~none


def test_pair_scores_is_a_per_row_dot_product():
    """pair_scores(u, E, items)[b, n] = u_b · E[items[b, n]]."""
    gen = torch.Generator().manual_seed(1)
    user_vecs, table = torch.randn(3, 4, generator=gen), torch.randn(6, 4, generator=gen)
    items = torch.tensor([[0, 5], [2, 2], [4, 1]])
    got = pair_scores(user_vecs, table, items)
    for b in range(3):
        for n in range(2):
            assert got[b, n].item() == pytest.approx(float(user_vecs[b] @ table[items[b, n]]), rel=1e-5)



@pytest.mark.parametrize(("dim", "listed", "block_elements", "blocks", "exact"), [
    (6, 40, None, 1, True), (6, 40, 6 * 40 * 2, 4, True), (6, 40, 1, 4, True),  # 9 users: one block; 2, 2, 2, 3 users
    (20, 50, 20 * 50 * 3, 3, True),  # score-level methods' width (20) in blocks of 3 users
    (550, 50, None, 1, True), (550, 50, 550 * 50 * 2, 4, False), (550, 50, 550 * 50 * 3, 3, False),  # MKD's width
])
def test_pair_scores_backward_matches_autograd(monkeypatch, dim, listed, block_elements, blocks, exact):
    """The hand-written backward gives exactly autograd's gradients of einsum over item_table[items],
    with repeated items (accumulated in the same order) and a non-leaf item table (LightGCN's), under
    deterministic algorithms as training runs, in one block of users, or in several at a narrow width.
    At MKD's width in several blocks the users' gradient (one batched product per block) may differ in
    its last bit where the CPU's BLAS picks another kernel for the block's batch size (an AMD EPYC did,
    in 3-user blocks: 9.5e-7 on values near 10; the AVX-512 machine of earlier sessions did not): there
    it agrees to float32's rounding, and the scores and the table's gradient stay exact."""
    if block_elements is not None:
        monkeypatch.setattr(common, "CHUNK_ELEMENTS", block_elements)
    assert len(common.user_blocks(torch.zeros(9, listed), dim)) == blocks
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        gen = torch.Generator().manual_seed(11)
        base = torch.randn(30, dim, generator=gen, requires_grad=True)
        users = torch.randn(9, dim, generator=gen, requires_grad=True)
        items = torch.randint(30, (9, listed), generator=gen)  # many repeats
        weights = torch.randn(9, listed, generator=gen)
        grads = []
        for fast in (False, True):
            table = base * 1.5  # non-leaf
            scores = pair_scores(users, table, items) if fast else torch.einsum("bd,bnd->bn", users, table[items])
            (scores * weights).sum().backward()
            grads.append((scores.detach(), base.grad.clone(), users.grad.clone()))
            base.grad = users.grad = None
    finally:
        torch.use_deterministic_algorithms(deterministic)
    (scores_slow, table_slow, users_slow), (scores_fast, table_fast, users_fast) = grads
    assert torch.equal(scores_slow, scores_fast) and torch.equal(table_slow, table_fast)
    if exact:
        assert torch.equal(users_slow, users_fast)
    else:
        torch.testing.assert_close(users_fast, users_slow, rtol=1e-6, atol=1e-6)


def test_user_blocks_never_leave_a_user_alone(monkeypatch):
    monkeypatch.setattr(common, "CHUNK_ELEMENTS", 10)  # 2 users of 5 values each
    blocks = lambda users: [(b.start, b.stop) for b in common.user_blocks(torch.zeros(users, 5, dtype=torch.long), 1)]  # noqa: E731
    assert blocks(0) == [] and blocks(1) == [(0, 1)] and blocks(4) == [(0, 2), (2, 4)]
    assert blocks(5) == [(0, 2), (2, 5)]  # the last user joins the block before it
    monkeypatch.setattr(common, "CHUNK_ELEMENTS", 1)  # narrower than one user: still two at a time
    assert blocks(3) == [(0, 3)]


def test_vanilla_ce_method(tmp_path):
    """VanillaCE: CE between teacher and student on the teacher's top-K non-training items (a real cache).

    Scores are set by hand (item table = identity, user vectors = score rows). Teacher top-3 non-train:
    user 0 (train {0}): 1 2 3; user 1 (train {}): 5 4 3.
    """
    def fixed_mf(scores):
        scores = torch.tensor(scores, dtype=torch.float32)
        model = MF(n_users=scores.shape[0], n_items=scores.shape[1], dim=scores.shape[1])
        with torch.no_grad():
            model.user_emb.weight.copy_(scores)
            model.item_emb.weight.copy_(torch.eye(scores.shape[1]))
        return model

    teacher_scores = [[9.0, 5.0, 4.0, 3.0, 1.0, 0.0], [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]]
    student_scores = [[0.0, 1.0, -1.0, 2.0, 7.0, 8.0], [3.0, 0.0, 0.0, 1.0, 0.5, -2.0]]
    splits = Splits(n_users=2, n_items=6, train=np.array([[0, 0]]), valid=np.array([[1, 0]]),
                    test=np.array([[1, 1]]), fingerprint="ce000001", name="tiny")
    cpu = torch.device("cpu")
    write_cache(fixed_mf(teacher_scores), splits, tmp_path / "cache", topk=4, checkpoint_sha256="0", chunk=1, device=cpu)
    cache = TeacherCache(tmp_path / "cache", splits=splits, device=cpu, chunk=1)
    ctx = KDContext(teacher=cache, train=UserItems(splits.train, 2, 6), n_users=2, n_items=6, device=cpu, chunk=1)

    method = VanillaCE(ctx, k=3, tau=2.0)
    assert method.items.tolist() == [[1, 2, 3], [5, 4, 3]]
    student = fixed_mf(student_scores)
    assert method.prepare_epoch(student, torch.Generator().manual_seed(0)) == {}
    users = torch.tensor([1, 0])
    got = method.loss(users, *student.encode(users))["kd"]
    t, s = np.array(teacher_scores), np.array(student_scores)
    expected = [
        reference_ce(t[[u]][:, items], s[[u]][:, items], None, 2.0)[0]
        for u, items in ((1, [5, 4, 3]), (0, [1, 2, 3]))
    ]
    np.testing.assert_allclose(got.detach().numpy(), expected, rtol=1e-5)
