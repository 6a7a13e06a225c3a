"""TaReC against direct computations: the Sinkhorn distance, the triples and their BPR-loss values,
the assistant as the source, and the damping by validation recall."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_kd_baselines import N_USERS, STUDENT_SCORES, TEACHER_SCORES, TRAIN, USERS, ctx, student_vectors  # noqa: F401
from test_rcekd_pieces import fixed_mf

from rcekd.kd.tarec import TaReC, TripleOT, sinkhorn


def sinkhorn_direct(x: np.ndarray, y: np.ndarray, epsilon: float, iterations: int = 5000) -> float:
    """Textbook Sinkhorn scaling u = a / (K v), v = b / (Kᵀ u) with K = exp(−C / (ε mean C)), float64."""
    cost = (x[:, None] - y[None, :]) ** 2
    kernel = np.exp(-cost / (epsilon * cost.mean()))
    a, b = np.full(len(x), 1 / len(x)), np.full(len(y), 1 / len(y))
    u, v = np.ones(len(x)), np.ones(len(y))
    for _ in range(iterations):
        u = a / (kernel @ v)
        v = b / (kernel.T @ u)
    return float((u[:, None] * kernel * v[None, :] * cost).sum())


def test_sinkhorn_matches_the_textbook_iteration_and_the_exact_transport() -> None:
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(3, 5)), rng.normal(size=(3, 7))
    got = sinkhorn(torch.tensor(x), torch.tensor(y), epsilon=0.3, iterations=500)
    np.testing.assert_allclose(got.numpy(), [sinkhorn_direct(a, b, 0.3) for a, b in zip(x, y)], rtol=1e-6)
    # small ε: the exact 1-D optimal transport between equal-size uniform sets pairs them in sorted order
    x, y = rng.normal(size=(2, 6)), rng.normal(size=(2, 6))
    got = sinkhorn(torch.tensor(x), torch.tensor(y), epsilon=5e-3, iterations=3000)
    exact = ((np.sort(x, 1) - np.sort(y, 1)) ** 2).mean(1)
    np.testing.assert_allclose(got.numpy(), exact, rtol=1e-2)
    assert float(sinkhorn(torch.tensor(x[:1]), torch.tensor(x[:1]), epsilon=5e-3, iterations=3000)) < 1e-2


def test_sinkhorn_at_the_default_settings_is_near_converged_for_spread_values() -> None:
    """The params' 50 iterations at ε = 0.1 (relative) against 5000, for loss values spread as a
    trained teacher's (up to several nats) against a student's."""
    rng = np.random.default_rng(1)
    for spread in (0.3, 1.0, 3.0):
        teacher = torch.tensor(rng.exponential(spread, size=(500, 8)))
        student = torch.tensor(0.7 * spread * rng.random((500, 8)))
        converged = sinkhorn(teacher, student, epsilon=0.1, iterations=5000)
        default = sinkhorn(teacher, student, epsilon=0.1, iterations=50)
        error = ((default - converged).abs() / converged).numpy()
        assert error.mean() < 0.01 and error.max() < 0.1


def test_triples_and_their_loss_values(ctx) -> None:  # noqa: F811
    term = TripleOT(ctx, ctx.teacher.gather, triples=4, epsilon=0.1, iterations=3000)  # converged
    student, user_vecs, table = student_vectors()
    term.prepare_epoch(student, torch.Generator().manual_seed(0))
    got = term.loss(USERS, user_vecs, table)["kd"].detach().numpy()
    for u in range(N_USERS):
        pos, neg = term.pos[u].tolist(), term.neg[u].tolist()
        assert set(pos) <= TRAIN[u] and not set(neg) & TRAIN[u]
        teacher = np.logaddexp(0, -(TEACHER_SCORES[u, pos] - TEACHER_SCORES[u, neg]))  # −log σ(t_ui − t_uj)
        mine = np.logaddexp(0, -(STUDENT_SCORES[u, pos] - STUDENT_SCORES[u, neg]))
        np.testing.assert_allclose(term.source_losses[u].numpy(), teacher, rtol=1e-5)
        np.testing.assert_allclose(got[u], sinkhorn_direct(teacher, mine, 0.1), rtol=1e-4, atol=1e-6)


def test_the_assistant_is_the_source_and_damping_follows_validation_recall(ctx) -> None:  # noqa: F811
    assistant_scores = 0.5 * STUDENT_SCORES[::-1].copy()
    built: list[dict] = []

    def build_student(overrides: dict):
        built.append(overrides)
        return fixed_mf(assistant_scores)

    def fit_student(model, method, label):
        assert isinstance(method, TripleOT) and label == "assistant"
        history = [{"valid_recall@20": 0.2}, {"valid_recall@20": 0.3}, {"valid_recall@20": 0.25}]  # best: 0.3
        return SimpleNamespace(best_state=model.state_dict(), history=history)

    method = TaReC(dataclasses.replace(ctx, build_student=build_student, fit_student=fit_student), assistant={"dim": 7}, triples=3)
    assert built == [{"dim": 7}]
    student, user_vecs, table = student_vectors()
    stats = method.prepare_epoch(student, torch.Generator().manual_seed(1))
    assert stats["damped"] == 0.0
    term = method.term
    pos, neg = term.pos.numpy(), term.neg.numpy()
    rows = np.arange(N_USERS)[:, None]
    expected = F.softplus(-torch.tensor(assistant_scores[rows, pos] - assistant_scores[rows, neg])).numpy()
    np.testing.assert_allclose(term.source_losses.numpy(), expected, rtol=1e-5)
    undamped = method.loss(USERS, user_vecs, table)["kd"].detach()

    method.observe({"recall@20": 0.3})  # level with the assistant's best: not yet
    assert method.prepare_epoch(student, torch.Generator().manual_seed(1))["damped"] == 0.0
    method.observe({"recall@20": 0.31})  # the student now beats the assistant: damp
    assert method.prepare_epoch(student, torch.Generator().manual_seed(1))["damped"] == 1.0
    np.testing.assert_allclose(method.loss(USERS, user_vecs, table)["kd"].detach().numpy(), 0.6 * undamped.numpy(), rtol=1e-6)


def test_tarec_refuses_bad_settings(ctx) -> None:  # noqa: F811
    with pytest.raises(ValueError, match="teaching assistant"):
        TaReC(ctx)
    ready = dataclasses.replace(ctx, build_student=lambda o: None, fit_student=lambda m, k, label: None)
    with pytest.raises(ValueError, match="epsilon"):
        TaReC(ready, epsilon=0.0)
