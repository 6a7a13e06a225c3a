"""MKD's feature- and rank-level baselines against direct computations on tiny inputs: RD's estimated
ranks and weights, DE's expert selection and loss, HTD's topology."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_kd_mkd import ctx, batch, student  # noqa: F401 (the fixture)

from rcekd.kd.de import DE, Experts
from rcekd.kd import htd
from rcekd.kd.htd import HTD, topology
from rcekd.kd.rd import RD, estimated_ranks, rd_weights


def test_estimated_ranks_scale_the_share_of_samples_scored_above() -> None:
    listed = torch.tensor([[0.5, 0.1]])
    sampled = torch.tensor([[0.9, 0.3, 0.2, 0.0]])
    # 0.5: 1 of 4 above → ⌊8 · 1/4⌋ + 1 = 3; 0.1: 3 of 4 above → ⌊8 · 3/4⌋ + 1 = 7 (9 items)
    assert estimated_ranks(listed, sampled, 9).tolist() == [[3, 7]]


def test_rd_weights_are_static_times_dynamic_and_l1_normalised() -> None:
    static = torch.tensor([math.exp(-1), math.exp(-2), math.exp(-3)])
    ranks = torch.tensor([[3, 7, 1]])  # the third item is ranked above its list position: weight 0
    raw = [math.exp(-1) * math.tanh(0.1 * 3), math.exp(-2) * math.tanh(0.1 * 6), 0.0]
    np.testing.assert_allclose(rd_weights(static, ranks, 0.1)[0].numpy(), np.array(raw) / sum(raw), rtol=1e-6)
    np.testing.assert_allclose(rd_weights(static, None, 0.1)[0].numpy(), static.numpy() / static.sum().item(), rtol=1e-6)


def test_rd_loss_is_the_weighted_log_likelihood_of_the_teachers_top(ctx) -> None:  # noqa: F811
    rd, model = RD(ctx, k=3, n=5, dynamic_from=1), student()
    rd.prepare_epoch(model, torch.Generator().manual_seed(0))
    users, user_vecs, item_table, _ = batch(model)
    top, _ = ctx.teacher.topk(3, exclude=ctx.train)
    by_hand = [-(rd.weights[u] * F.logsigmoid(user_vecs[b] @ item_table[top[u]].T)).sum() for b, u in enumerate(users.tolist())]
    torch.testing.assert_close(rd.loss(users, user_vecs, item_table)["kd"], torch.stack(by_hand))
    sums = rd.weights.sum(1)  # 1 per user, or 0 where the student already ranks every listed item high
    assert bool((((sums - 1).abs() < 1e-5) | (sums == 0)).all()) and bool((sums > 0).any())


def test_de_selects_an_expert_by_the_teachers_vector() -> None:
    torch.manual_seed(0)
    side = Experts(3, 6, experts=4)
    student_vecs, teacher = torch.randn(5, 3), torch.randn(5, 6)
    choice = side.select(teacher, 1e-6, gumbel=False)  # the annealed end: a hard choice
    chosen = side.selector(teacher).argmax(-1)
    assert torch.equal(choice, F.one_hot(chosen, 4).float())
    by_hand = torch.stack([side.experts[m](student_vecs[n]) for n, m in enumerate(chosen.tolist())])
    torch.testing.assert_close(side(student_vecs, choice), by_hand)


def test_de_loss_is_the_squared_error_of_the_selected_mixture(ctx, monkeypatch) -> None:  # noqa: F811
    """Users weigh 1, each unique item ½ as a positive plus ½ as a negative; Gumbel noise from fixed uniforms."""
    de, model = DE(ctx, experts=4), student()
    de.prepare_epoch(model, torch.Generator())
    de.tau = 0.5  # a temperature at which the choice is soft (the first epoch's is about 1)
    uniforms = lambda like: torch.linspace(0.05, 0.95, like.numel()).reshape(like.shape)  # noqa: E731
    monkeypatch.setattr(torch, "rand_like", uniforms)
    users, user_vecs, item_table, extra = batch(model)
    inverse, pos, neg = extra["pairs"]
    pos, neg = pos.clone(), neg.clone()
    neg[0] = pos[1]  # item 2 is a positive and a negative: weight 1
    extra["pairs"], extra["items"] = (inverse, pos, neg), torch.cat([pos, neg]).unique()
    teacher_users, teacher_items = ctx.teacher.factors()
    items = extra["items"]
    weights = torch.tensor([0.5 * (i in pos.tolist()) + 0.5 * (i in neg.tolist()) for i in items.tolist()])
    total = 0.0
    for side, s, t, w in ((de.user_experts, user_vecs, teacher_users[users], torch.ones(len(users))),
                          (de.item_experts, item_table[items], teacher_items[items], weights)):
        logits = F.log_softmax(side.selector(t), -1)
        z = F.softmax((logits - torch.log(-torch.log(uniforms(logits)))) / 0.5, -1)
        mixture = sum(z[:, [m]] * side.experts[m](s) for m in range(4))
        total = total + ((t - mixture).square().sum(1) * w).sum()
    parts = de.loss(users, user_vecs, item_table, pairs=extra["pairs"], items=items)
    torch.testing.assert_close(parts["de"], total / 4)  # 4 rows
    assert weights.tolist().count(1.0) == 1
    parts["kd"].mean().backward()
    assert all(p.grad is not None for p in de.parameters()) and model.user_emb.weight.grad.abs().sum() > 0


def test_topology_by_hand() -> None:
    s = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
    t = torch.tensor([[1.0, 0.0, 0.0], [1.0, 2.0, 0.0], [0.0, 0.0, 1.0]])
    groups = torch.tensor([0, 0, 1])
    cos = lambda a, b: float(a @ b / (a.norm() * b.norm()))
    entity = 2 * (cos(s[0], s[1]) - cos(t[0], t[1])) ** 2  # the one same-group pair, both ways; cos_t > 0
    protos_s, protos_t = [s[:2].mean(0), s[2]], [t[:2].mean(0), t[2]]
    second = sum((cos(protos_s[g], s[e]) - cos(protos_t[g], t[e])) ** 2 for g in range(2) for e in range(3))
    first = sum((cos(protos_s[g], protos_s[h]) - cos(protos_t[g], protos_t[h])) ** 2 for g in range(2) for h in range(2))
    np.testing.assert_allclose(float(topology(s, t, groups, 3, "second")), entity + second, rtol=1e-5)  # group 2 empty
    np.testing.assert_allclose(float(topology(s, t, groups, 3, "first")), entity + first, rtol=1e-5)


@pytest.mark.parametrize("by_group", [True, False], ids=["group by group (CPU)", "all pairs masked (GPU)"])
def test_topology_forms_equal_the_masked_all_pairs_loss(monkeypatch, by_group: bool) -> None:
    """Both forms of the entity level (group by group where the host is the device, every pair's cosines
    masked elsewhere) give the loss and gradient computed here over every pair, masked."""
    monkeypatch.setattr(htd, "GROUP_BY_GROUP", {"cpu"} if by_group else set())
    generator = torch.Generator().manual_seed(0)
    s = torch.randn(40, 4, generator=generator, requires_grad=True)
    t, groups = torch.randn(40, 6, generator=generator), torch.randint(0, 5, (40,), generator=generator)
    groups[groups == 3] = 4  # one group empty
    unit = lambda x: F.normalize(x, dim=1)  # noqa: E731 (an empty group's prototype is 0)
    cos_s, cos_t = unit(s) @ unit(s).T, unit(t) @ unit(t).T
    keep = (groups[:, None] == groups[None, :]) & (cos_t > 0) & ~torch.eye(40, dtype=torch.bool)
    entity = ((cos_s - cos_t) ** 2 * keep).sum()
    both = topology(s, t, groups, 5, "second")
    members = F.one_hot(groups, 5).float()
    proto_s = (members.T @ s.detach()) / members.sum(0).clamp(min=1)[:, None]
    proto_t = (members.T @ t) / members.sum(0).clamp(min=1)[:, None]
    group = ((unit(proto_s) @ unit(s).T - unit(proto_t) @ unit(t).T) ** 2 * (members.sum(0) > 0)[:, None]).sum()
    torch.testing.assert_close(both, entity + group)
    torch.testing.assert_close(torch.autograd.grad(both, s)[0], torch.autograd.grad(entity + group, s)[0])


def test_htd_mixes_topology_and_alignment(ctx) -> None:  # noqa: F811
    """L_TD on users and items together, grouped by each side's selector (item groups after the users'),
    L_GA as DE's with every unique item weighing 1, each over the batch's rows."""
    htd, model = HTD(ctx, groups=3, alpha=0.9), student()
    htd.prepare_epoch(model, torch.Generator())
    assert htd.tau == 10 ** (-10 / 1000)
    users, user_vecs, item_table, extra = batch(model)
    items = extra["items"]
    teacher_users, teacher_items = ctx.teacher.factors()
    with torch.no_grad():
        groups = torch.cat([htd.user_experts.selector(teacher_users[users]).argmax(-1),
                            htd.item_experts.selector(teacher_items[items]).argmax(-1) + 3])
        td = topology(torch.cat([user_vecs, item_table[items]]), torch.cat([teacher_users[users], teacher_items[items]]),
                      groups, 6, "second") / 4
    parts = htd.loss(users, user_vecs, item_table, pairs=extra["pairs"], items=items)
    torch.testing.assert_close(parts["td"].detach(), td)
    torch.testing.assert_close(parts["kd"][0], 0.9 * parts["td"] + 0.1 * parts["ga"])
    assert parts["td"] > 0 and parts["ga"] > 0
