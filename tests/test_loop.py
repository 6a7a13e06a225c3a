"""The one training loop (`rcekd.train.fit`) pinned against hand computations on a tiny MF: the step's
loss L = L_BPR + λ·L_KD (its gradient and the Adam update it makes), the `rows` reduction of the KD
term, the logged per-epoch parts, strict-improvement epoch selection with patience, and the best
epoch's weights as the returned state."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import rcekd.train
from rcekd.backbones import MF
from rcekd.data import Splits
from rcekd.train import fit

N_USERS, N_ITEMS, DIM = 4, 24, 3  # at least 20 items: validation takes a top-20
TRAIN = {0: [0, 1, 2], 1: [3], 2: [4, 5], 3: [0, 2, 4, 6]}  # rows per user: 3, 1, 2, 4
VALID = {0: [3], 1: [0], 2: [6], 3: [1]}
N_PAIRS = sum(len(items) for items in TRAIN.values())
ANCHOR = torch.tensor([5, 6, 0, 3])  # the item each user's fake KD term pulls towards
CPU = torch.device("cpu")


def pairs(table: dict[int, list[int]]) -> np.ndarray:
    return np.array([[u, i] for u in sorted(table) for i in table[u]], dtype=np.int64)


def tiny_splits() -> Splits:
    return Splits(n_users=N_USERS, n_items=N_ITEMS, train=pairs(TRAIN), valid=pairs(VALID), test=pairs(VALID),
                  fingerprint="loop0001", name="tiny")


def tiny_mf(seed: int = 0) -> MF:
    """An MF with seeded weights of std 0.5 (gradients well away from Adam's eps)."""
    model = MF(n_users=N_USERS, n_items=N_ITEMS, dim=DIM)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.user_emb.weight.copy_(0.5 * torch.randn(N_USERS, DIM, generator=gen))
        model.item_emb.weight.copy_(0.5 * torch.randn(N_ITEMS, DIM, generator=gen))
    return model


def anchor_kd(users: torch.Tensor, user_vecs: torch.Tensor, item_table: torch.Tensor) -> torch.Tensor:
    """The fake method's per-user term: (e_u · e_anchor(u) − 1)²."""
    return ((user_vecs * item_table[ANCHOR[users]]).sum(-1) - 1.0).square()


class FakeKD:
    """A method with a known per-user loss; it records what the loop gives it and returns per step."""

    def __init__(self, per_user=anchor_kd):
        self.per_user = per_user
        self.epochs: list[list[dict[str, float]]] = []

    def prepare_epoch(self, student: torch.nn.Module, generator: torch.Generator) -> dict[str, float]:
        self.epochs.append([])
        return {"prep_stat": 0.25}

    def loss(self, users: torch.Tensor, user_vecs: torch.Tensor, item_table: torch.Tensor) -> dict[str, torch.Tensor]:
        kd = self.per_user(users, user_vecs, item_table)
        aux = kd.detach().max()
        self.epochs[-1].append({"kd_users_mean": float(kd.detach().mean()), "aux": float(aux)})
        return {"kd": kd, "aux": aux}


def capture_batches(model: MF, store: list[tuple[torch.Tensor, ...]]) -> None:
    """Record every batch the loop draws, unchanged; its first three fields are (users, positives, negatives)."""
    original = model.training_batches

    def wrapped(batch_size: int, generator: torch.Generator):
        for batch in original(batch_size, generator):
            store.append(tuple(t.clone() for t in batch))
            yield batch

    model.training_batches = wrapped


def run_fit(model: MF, **kwargs) -> rcekd.train.FitResult:
    options = dict(lr=0.01, weight_decay=0.01, batch_size=N_PAIRS, max_epochs=1, patience=1, seed=0, device=CPU,
                   log=lambda message: None)
    options.update(kwargs)
    return fit(model, tiny_splits(), **options)


def hand_loss(
    weights: dict[str, torch.Tensor], batch: tuple[torch.Tensor, ...], *,
    kd_weight: float, reduction: str, weight_decay: float,
) -> torch.Tensor:
    """L = mean_r[−log σ(e_u·(e_p − e_n)) + wd/2 (‖e_u‖² + ‖e_p‖² + ‖e_n‖²)] + λ · L_KD, with L_KD
    the mean of the per-user term over the batch's users, or its mean weighted by each user's rows."""
    users, pos, neg = batch[:3]
    e_user, e_item = weights["user_emb.weight"], weights["item_emb.weight"]
    u, p, n = e_user[users], e_item[pos], e_item[neg]
    ranking = -F.logsigmoid((u * (p - n)).sum(-1))
    l2 = u.square().sum(-1) + p.square().sum(-1) + n.square().sum(-1)
    base = (ranking + 0.5 * weight_decay * l2).mean()
    batch_users = sorted(set(users.tolist()))
    terms = [((e_user[b] * e_item[ANCHOR[b]]).sum() - 1.0).square() for b in batch_users]
    rows = [float((users == b).sum()) for b in batch_users]
    if reduction == "users":
        kd = sum(terms) / len(terms)
    else:
        kd = sum(t * r for t, r in zip(terms, rows)) / sum(rows)
    return base + kd_weight * kd


@pytest.mark.parametrize("reduction", ["users", "rows"])
@pytest.mark.parametrize("kd_weight", [0.0, 0.7, 3.0])
def test_one_step_gradient_and_adam_update(kd_weight: float, reduction: str) -> None:
    """One epoch, one step (batch = all pairs): the gradient the loop back-propagates equals autograd of
    L_BPR + λ·L_KD written out here (float64, from the initial weights and the batch the loop drew), and
    the weights after fit equal one hand-written Adam step on that gradient: p − lr·g / (|g| + eps)."""
    model = tiny_mf()
    initial = {name: t.detach().clone() for name, t in model.state_dict().items()}
    batches: list[tuple[torch.Tensor, ...]] = []
    capture_batches(model, batches)
    grads: dict[str, torch.Tensor] = {}
    for name, param in model.named_parameters():
        param.register_hook(lambda g, name=name: grads.__setitem__(name, g.detach().clone()))
    lr, wd = 0.01, 0.01
    result = run_fit(model, kd=FakeKD(), kd_weight=kd_weight, kd_reduction=reduction, lr=lr, weight_decay=wd)

    assert len(batches) == 1 and len(batches[0][0]) == N_PAIRS
    users, pos, neg = batches[0][:3]
    train = {(u, i) for u, items in TRAIN.items() for i in items}
    assert sorted(zip(users.tolist(), pos.tolist())) == sorted(train)
    assert not {(u, i) for u, i in zip(users.tolist(), neg.tolist())} & train  # negatives are never training items

    leaves = {name: t.double().requires_grad_() for name, t in initial.items()}
    loss = hand_loss(leaves, batches[0], kd_weight=kd_weight, reduction=reduction, weight_decay=wd)
    loss.backward()
    assert result.history[0]["loss"] == pytest.approx(loss.item(), rel=1e-5)
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    after = model.state_dict()
    for name, leaf in leaves.items():
        g = leaf.grad
        torch.testing.assert_close(grads[name].double(), g, rtol=1e-5, atol=1e-7, msg=name)
        m, v = (1 - beta1) * g, (1 - beta2) * g.square()
        step = lr * (m / (1 - beta1)) / ((v / (1 - beta2)).sqrt() + eps)
        torch.testing.assert_close(after[name].double(), initial[name].double() - step, rtol=0, atol=1e-6, msg=name)


def test_kd_weight_scales_the_kd_gradient() -> None:
    """The gradient is linear in λ: g(λ=3) − g(0) = 3·(g(1) − g(0)), and the KD part is not zero."""
    grads = {}
    for weight in (0.0, 1.0, 3.0):
        model = tiny_mf()
        seen: dict[str, torch.Tensor] = {}
        model.user_emb.weight.register_hook(lambda g, seen=seen: seen.__setitem__("user", g.detach().clone()))
        run_fit(model, kd=FakeKD(), kd_weight=weight)
        grads[weight] = seen["user"].double()
    kd_part = grads[1.0] - grads[0.0]
    assert kd_part.abs().max() > 1e-2
    torch.testing.assert_close(grads[3.0] - grads[0.0], 3.0 * kd_part, rtol=1e-4, atol=1e-6)


def test_kd_weight_zero_trains_like_no_method() -> None:
    """λ = 0 with a method (that draws nothing from the generator) gives the very weights of a run
    without one, over several epochs and steps; λ > 0 does not."""
    opts = dict(batch_size=3, max_epochs=3, patience=3)
    plain = run_fit(tiny_mf(), **opts)
    zero = run_fit(tiny_mf(), kd=FakeKD(), kd_weight=0.0, **opts)
    weighted = run_fit(tiny_mf(), kd=FakeKD(), kd_weight=0.5, **opts)
    for name, tensor in plain.best_state.items():
        assert torch.equal(tensor, zero.best_state[name]), name
    assert not torch.equal(plain.best_state["user_emb.weight"], weighted.best_state["user_emb.weight"])


def test_history_parts_are_means_over_steps_and_loss_is_base_plus_weighted_kd() -> None:
    """Per epoch (5 steps of up to 3 pairs): `kd` and every other part of the method are their mean over the
    epoch's steps (each step's `kd` = the mean of the per-user term over the batch's users), the
    preparation's stats are logged as given, and loss = base + λ·kd to float tolerance."""
    method, weight = FakeKD(), 0.7
    result = run_fit(tiny_mf(), kd=method, kd_weight=weight, batch_size=3, max_epochs=3, patience=3)
    assert len(result.history) == 3 and len(method.epochs) == 3
    for row, steps in zip(result.history, method.epochs):
        assert len(steps) == math.ceil(N_PAIRS / 3)
        assert row["kd"] == pytest.approx(np.mean([s["kd_users_mean"] for s in steps]), rel=1e-5)
        assert row["aux"] == pytest.approx(np.mean([s["aux"] for s in steps]), rel=1e-5)
        assert row["prep_stat"] == 0.25
        assert row["loss"] == pytest.approx(row["base"] + weight * row["kd"], rel=1e-5)
        assert row["kd"] > 0.01 and row["base"] > 0.01


@pytest.mark.parametrize(("reduction", "expected"), [
    ("users", (1.0 + 2.0 + 3.0 + 4.0) / 4),  # plain mean over the 4 users
    ("rows", (1.0 * 3 + 2.0 * 1 + 3.0 * 2 + 4.0 * 4) / 10),  # weighted by rows 3, 1, 2, 4 → 2.7
])
def test_kd_reduction_on_known_per_user_values(reduction: str, expected: float) -> None:
    """A method returning 1, 2, 3, 4 for users 0..3, one step over all pairs: `rows` gives
    per_user · rows · (n_users / Σ rows), then the mean, i.e. the rows-weighted mean."""
    values = torch.tensor([1.0, 2.0, 3.0, 4.0])
    method = FakeKD(per_user=lambda users, user_vecs, item_table: values[users])
    result = run_fit(tiny_mf(), kd=method, kd_weight=0.5, kd_reduction=reduction)
    row = result.history[0]
    assert row["kd"] == pytest.approx(expected, rel=1e-6)
    assert row["loss"] == pytest.approx(row["base"] + 0.5 * expected, rel=1e-6)


def test_unknown_reduction_is_refused() -> None:
    with pytest.raises(ValueError, match="kd_reduction"):
        run_fit(tiny_mf(), kd=FakeKD(), kd_weight=1.0, kd_reduction="items")


# ---------------------------------------------------------------- epoch selection


def scripted_validation(monkeypatch: pytest.MonkeyPatch, ndcgs: list[float]) -> list[dict]:
    """Replace the loop's validation by a script: call t returns the t-th dict (ndcg@20 = ndcgs[t])."""
    script = [{"recall@10": v / 3, "ndcg@10": v / 2, "recall@20": v / 4, "ndcg@20": v, "call": t}
              for t, v in enumerate(ndcgs)]
    calls = iter(script)
    monkeypatch.setattr(rcekd.train, "full_ranking", lambda *args, **kwargs: dict(next(calls)))
    return script


@pytest.mark.parametrize(("ndcgs", "patience", "best_epoch", "epochs_run"), [
    ([0.1, 0.3, 0.3, 0.2, 0.3, 0.1, 0.9], 3, 2, 5),  # ties do not improve: the first 0.3 stays best
    ([0.1, 0.2, 0.2, 0.25, 0.25, 0.25, 0.9], 2, 4, 6),  # a strict improvement resets the count
    ([0.5, 0.4, 0.5, 0.5, 0.9], 1, 1, 2),  # patience 1: the first non-improving epoch stops
    ([0.1, 0.2, 0.3, 0.4, 0.9], 10, 4, 4),  # never stalls: max_epochs ends it
])
def test_best_epoch_and_patience(monkeypatch: pytest.MonkeyPatch, ndcgs: list[float], patience: int,
                                 best_epoch: int, epochs_run: int) -> None:
    """best_epoch is the first epoch reaching the maximum so far (strict improvement), the run stops after
    exactly `patience` non-improving epochs, and best_valid is that epoch's validation dict."""
    script = scripted_validation(monkeypatch, ndcgs)
    seen: list[int] = []
    result = run_fit(tiny_mf(), max_epochs=4 if patience == 10 else 20, patience=patience,
                     on_epoch=lambda epoch, model: seen.append(epoch))
    assert (result.best_epoch, result.epochs_run) == (best_epoch, epochs_run)
    assert result.best_valid == script[best_epoch - 1]
    assert seen == list(range(1, epochs_run + 1))
    assert [row["valid_ndcg@20"] for row in result.history] == ndcgs[:epochs_run]
    assert [row["epoch"] for row in result.history] == seen


def test_best_state_holds_the_best_epochs_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    """The returned state is the weights at the best epoch (as seen by on_epoch after that epoch's
    validation), not the last epoch's, and not a view of the live model."""
    scripted_validation(monkeypatch, [0.1, 0.4, 0.2, 0.3, 0.35])
    recorded: dict[int, dict[str, torch.Tensor]] = {}
    model = tiny_mf()
    result = run_fit(model, max_epochs=5, patience=5, batch_size=3,
                     on_epoch=lambda epoch, m: recorded.__setitem__(epoch, copy.deepcopy(m.state_dict())))
    assert (result.best_epoch, result.epochs_run, sorted(recorded)) == (2, 5, [1, 2, 3, 4, 5])
    assert result.best_state.keys() == recorded[2].keys()
    for name, tensor in result.best_state.items():
        assert torch.equal(tensor, recorded[2][name]), name
        assert not torch.equal(tensor, recorded[5][name]), name
        assert torch.equal(model.state_dict()[name], recorded[5][name]), name  # the model itself ends at the last epoch
