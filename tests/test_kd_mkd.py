"""MKD's pieces against direct computations on tiny hand-made inputs (K-Mix, CPD1, CPD2, the projector
ensemble, the teacher-cosine neighbours, NKD), and where its gradients go: NKD trains the projectors and
the student, CPD the projectors only."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from test_rcekd_pieces import make_splits, reference_ce

from rcekd.backbones.mf import MF
from rcekd.cache import TeacherCache, write_cache
from rcekd.kd import KDContext
from rcekd.kd.mkd import MKD, Projector, cosine_neighbours, cpd1, k_mix, pca_neighbours
from rcekd.sparse import UserItems

N_USERS, N_ITEMS, D_T, D_S = 8, 12, 6, 3
RNG = np.random.default_rng(0)
TRAIN = {u: set(RNG.choice(N_ITEMS, 3, replace=False).tolist()) for u in range(N_USERS)}
CPU = torch.device("cpu")


@pytest.fixture
def ctx(tmp_path) -> KDContext:
    splits = make_splits(TRAIN, N_USERS, N_ITEMS)
    torch.manual_seed(0)
    teacher = MF(n_users=N_USERS, n_items=N_ITEMS, dim=D_T, init_std=1.0)
    write_cache(teacher, splits, tmp_path / "cache", topk=6, checkpoint_sha256="0" * 64, chunk=4, device=CPU)
    cache = TeacherCache(tmp_path / "cache", splits=splits, device=CPU, chunk=4)
    return KDContext(cache, UserItems(splits.train, N_USERS, N_ITEMS), N_USERS, N_ITEMS, CPU, 4, student_dim=D_S, seed=0)


def student() -> MF:
    torch.manual_seed(1)
    return MF(n_users=N_USERS, n_items=N_ITEMS, dim=D_S, init_std=1.0)


def batch(model: MF):
    """A hand-made batch: rows (u, i⁺, i⁻), its unique users and items, and the forward's vectors."""
    users_of_rows = torch.tensor([0, 0, 3, 5])
    pos, neg = torch.tensor([1, 2, 4, 1]), torch.tensor([7, 9, 7, 11])
    users, inverse = users_of_rows.unique(return_inverse=True)
    items = torch.cat([pos, neg]).unique()
    user_vecs, item_table, user_table = model.encode_all_users(users)
    return users, user_vecs, item_table, {"pairs": (inverse, pos, neg), "items": items, "user_table": user_table}


def test_k_mix_with_a_fixed_mask_takes_each_dimension_from_one_side() -> None:
    own, other = torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[10.0, 20.0, 30.0]])
    assert k_mix(own, other, torch.tensor([[1.0, 0.0, 1.0]])).tolist() == [[1.0, 20.0, 3.0]]
    assert k_mix(own, other, torch.tensor([[0.25, 0.5, 0.0]])).tolist() == [[7.75, 11.0, 30.0]]  # soft mask


def test_cpd1_is_the_product_of_margins_when_the_orders_disagree() -> None:
    f_u = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    g_pos, g_neg = torch.tensor([[0.0, 0.0], [2.0, 0.0]]), torch.tensor([[1.0, 0.0], [0.5, 0.0]])
    raw = torch.tensor([2.0, 3.0])  # the student prefers i⁺ in both rows
    # row 0: projected order 0 − 1 = −1 (flipped): −(−1)·2 = 2; row 1: 2 − 0.5 = 1.5 (kept): 0
    assert cpd1(f_u, g_pos, g_neg, raw).tolist() == [2.0, 0.0]


def test_the_projector_is_the_mean_of_its_experts() -> None:
    torch.manual_seed(0)
    projector = Projector(3, 6, experts=5)
    x = torch.randn(4, 3)
    by_hand = sum(e[2](torch.relu(e[0](x))) for e in projector.experts) / 5
    assert projector.experts[0][0].out_features == (3 + 6) // 2
    torch.testing.assert_close(projector(x), by_hand)


def test_cosine_neighbours_are_the_most_similar_others() -> None:
    torch.manual_seed(0)
    vectors = torch.randn(10, 4)
    got = cosine_neighbours(vectors, 3, chunk=4)
    normed = vectors / vectors.norm(dim=1, keepdim=True)
    sims = (normed @ normed.T).fill_diagonal_(-2.0).numpy()
    assert got.tolist() == np.argsort(-sims, axis=1, kind="stable")[:, :3].tolist()


def test_nkd_without_mix_is_the_distance_of_projected_to_teacher_vectors(ctx) -> None:
    mkd = MKD(ctx, parts=["nkd"], mix=False, top_n=4)
    model = student()
    users, user_vecs, item_table, extra = batch(model)
    teacher_users, teacher_items = ctx.teacher.factors()
    items = extra["items"]
    by_hand = ((mkd.f(user_vecs) - teacher_users[users]).norm(dim=1).sum()
               + (mkd.g(item_table[items]) - teacher_items[items]).norm(dim=1).sum()) / 4  # 4 rows
    parts = mkd.loss(users, user_vecs, item_table, **extra)
    torch.testing.assert_close(parts["nkd"], by_hand)
    torch.testing.assert_close(parts["kd"], by_hand.expand(len(users)))  # λ_NKD 1, on every user's entry


def test_pca_neighbours_are_the_nearest_others_in_the_leading_components() -> None:
    """A2's option against numpy: the covariance's leading eigenvectors, then brute-force distances."""
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(12, 5)) * np.array([5.0, 3.0, 1.0, 0.2, 0.1])  # two dominant axes
    centred = vectors - vectors.mean(0)
    _, axes = np.linalg.eigh(centred.T @ centred)  # ascending eigenvalues
    points = centred @ axes[:, ::-1][:, :2]
    distances = np.linalg.norm(points[:, None] - points[None], axis=-1)
    np.fill_diagonal(distances, np.inf)
    got = pca_neighbours(torch.tensor(vectors, dtype=torch.float32), 3, components=2, chunk=5)
    assert got.tolist() == np.argsort(distances, axis=1, kind="stable")[:, :3].tolist()
    full = pca_neighbours(torch.tensor(vectors, dtype=torch.float32), 3, components=50, chunk=5)  # all axes: raw distances
    raw = np.linalg.norm(vectors[:, None] - vectors[None], axis=-1)
    np.fill_diagonal(raw, np.inf)
    assert full.tolist() == np.argsort(raw, axis=1, kind="stable")[:, :3].tolist() != got.tolist()


def test_the_pca_option_picks_the_pca_neighbours(ctx) -> None:
    teacher_users, teacher_items = ctx.teacher.factors()
    mkd = MKD(ctx, parts=["nkd"], top_n=4, neighbour_space="pca", pca_dim=2, neighbours=3)
    assert torch.equal(mkd.user_neighbours, pca_neighbours(teacher_users, 3, 2))
    assert torch.equal(mkd.item_neighbours, pca_neighbours(teacher_items, 3, 2))
    assert not torch.equal(mkd.item_neighbours, cosine_neighbours(teacher_items, 3))


def test_the_codes_nkd_is_one_minus_cosine_with_items_at_half_weight(ctx) -> None:
    mkd = MKD(ctx, parts=["nkd"], mix=False, top_n=4, distance="cosine", item_weight=0.5)
    model = student()
    users, user_vecs, item_table, extra = batch(model)
    teacher_users, teacher_items = ctx.teacher.factors()
    items = extra["items"]
    cos = lambda a, b: (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))  # noqa: E731
    by_hand = ((1 - cos(mkd.f(user_vecs), teacher_users[users])).sum()
               + 0.5 * (1 - cos(mkd.g(item_table[items]), teacher_items[items])).sum()) / 4
    torch.testing.assert_close(mkd.loss(users, user_vecs, item_table, **extra)["nkd"], by_hand)


def test_the_codes_cpd_compares_to_cosines_of_the_projected_vectors(ctx) -> None:
    mkd = MKD(ctx, parts=["cpd"], top_n=2, distance="cosine")
    assert len(mkd.top_items) < N_ITEMS  # g runs on some of the items only
    model = student()
    users, user_vecs, item_table, extra = batch(model)
    top, _ = ctx.teacher.topk(2, exclude=ctx.train)
    with torch.no_grad():
        f_u, g_i = mkd.f(user_vecs), mkd.g(item_table)
        f_u, g_i = f_u / f_u.norm(dim=1, keepdim=True), g_i / g_i.norm(dim=1, keepdim=True)
        ce = [reference_ce((user_vecs[b] @ item_table[top[u]].T).numpy(), (f_u[b] @ g_i[top[u]].T).numpy())
              for b, u in enumerate(users.tolist())]
        inverse, pos, neg = extra["pairs"]
        raw = (user_vecs[inverse] * (item_table[pos] - item_table[neg])).sum(-1)
        cpd1_by_hand = cpd1(f_u[inverse], g_i[pos], g_i[neg], raw).sum() / 4  # CPD1 on the cosines too
        flip = float((torch.sign(raw) != torch.sign((f_u[inverse] * (g_i[pos] - g_i[neg])).sum(-1))).float().mean())
    got = mkd.loss(users, user_vecs, item_table, **extra)
    np.testing.assert_allclose(float(got["cpd2"].detach()), sum(ce) / 4, rtol=1e-5)
    torch.testing.assert_close(got["cpd1"].detach(), cpd1_by_hand)
    assert float(got["flip"]) == flip  # and the flip share, on the cosines


def test_flip_is_the_share_of_rows_whose_order_the_projectors_reverse(ctx) -> None:
    mkd, model = MKD(ctx, parts=["cpd"], top_n=4), student()
    users, user_vecs, item_table, extra = batch(model)
    inverse, pos, neg = extra["pairs"]
    with torch.no_grad():
        raw = (user_vecs[inverse] * (item_table[pos] - item_table[neg])).sum(-1)
        projected = (mkd.f(user_vecs)[inverse] * (mkd.g(item_table[pos]) - mkd.g(item_table[neg]))).sum(-1)
    share = float((torch.sign(raw) != torch.sign(projected)).float().mean())
    parts = mkd.loss(users, user_vecs, item_table, **extra)
    assert float(parts["flip"]) == share and 0 < share < 1  # some rows of 4 flip, not all
    assert "flip" not in MKD(ctx, parts=["nkd"], top_n=4).loss(users, user_vecs, item_table, **extra)


def test_nkd_mixes_with_a_teacher_neighbour(ctx, monkeypatch) -> None:
    """Fixed draws: neighbour picks 0, 1, 2, 0, ... and uniforms alternating 0.2 / 0.8 (kept where < α = 0.5).
    The same neighbour v mixes the student side and the teacher side, and v's student vector learns too."""
    mkd = MKD(ctx, parts=["nkd"], neighbours=3, top_n=4)
    picks = lambda high, size, device=None: (torch.arange(size[0]) % high).reshape(size)  # noqa: E731
    uniforms = lambda like: torch.tensor([0.2, 0.8]).repeat(like.numel() // 2 + 1)[: like.numel()].reshape(like.shape)  # noqa: E731
    model = student()
    users, user_vecs, item_table, extra = batch(model)
    teacher_users, teacher_items = ctx.teacher.factors()

    def mixed(ids, student_table, teacher_table, neighbours):
        v = neighbours[ids, torch.arange(len(ids)) % 3]
        keep_s, keep_t = ((uniforms(torch.empty(len(ids), d)) < 0.5).float() for d in (D_S, D_T))
        return (keep_s * student_table[ids] + (1 - keep_s) * student_table[v],
                keep_t * teacher_table[ids] + (1 - keep_t) * teacher_table[v]), v

    (user_s, user_t), v = mixed(users, extra["user_table"], teacher_users, mkd.user_neighbours)
    (item_s, item_t), _ = mixed(extra["items"], item_table, teacher_items, mkd.item_neighbours)
    by_hand = ((mkd.f(user_s) - user_t).norm(dim=1).sum() + (mkd.g(item_s) - item_t).norm(dim=1).sum()) / 4
    monkeypatch.setattr(torch, "randint", picks)
    monkeypatch.setattr(torch, "rand_like", uniforms)
    nkd = mkd.loss(users, user_vecs, item_table, **extra)["nkd"]
    monkeypatch.undo()
    torch.testing.assert_close(nkd, by_hand)
    nkd.backward()
    outside = sorted(set(v.tolist()) - set(users.tolist()))  # neighbours that are not batch users
    assert outside and bool((model.user_emb.weight.grad[outside].abs().sum(1) > 0).all())


@pytest.mark.parametrize("top_n", [4, 2])
def test_cpd2_is_the_ce_over_the_teachers_top_items(ctx, top_n) -> None:
    mkd = MKD(ctx, parts=["cpd"], top_n=top_n, cpd_weight=1.0, cpd2_weight=1.0)
    assert len(mkd.top_items) < N_ITEMS or top_n == 4  # top-2: g's hidden units run on some of the items only
    model = student()
    users, user_vecs, item_table, extra = batch(model)
    top, _ = ctx.teacher.topk(top_n, exclude=ctx.train)
    with torch.no_grad():
        f_u, g_i = mkd.f(user_vecs), mkd.g(item_table)
        ce = [reference_ce((user_vecs[b] @ item_table[top[u]].T).numpy(), (f_u[b] @ g_i[top[u]].T).numpy())
              for b, u in enumerate(users.tolist())]
    parts = mkd.loss(users, user_vecs, item_table, **extra)
    np.testing.assert_allclose(float(parts["cpd2"].detach()), sum(ce) / 4, rtol=1e-5)
    assert all(i not in TRAIN[u] for u in range(N_USERS) for i in mkd.top[u].tolist())  # non-training items


@pytest.mark.parametrize("options", [{}, {"distance": "cosine", "item_weight": 0.5, "neighbour_space": "pca", "pca_dim": 2}],
                         ids=["paper", "code"])
def test_nkd_trains_projectors_and_student_but_cpd_only_the_projectors(ctx, options) -> None:
    for parts, student_learns in ((["nkd"], True), (["cpd"], False)):
        mkd, model = MKD(ctx, parts=parts, top_n=4, **options), student()
        users, user_vecs, item_table, extra = batch(model)
        loss = mkd.loss(users, user_vecs, item_table, **extra)
        (loss["kd"].mean()).backward()
        for projector in (mkd.f, mkd.g):
            assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in projector.parameters()), parts
        student_grads = [p.grad for p in model.parameters()]
        assert any(g is not None and g.abs().sum() > 0 for g in student_grads) == student_learns, parts


def test_the_projectors_follow_the_seed_and_leave_the_global_generator_alone(ctx) -> None:
    torch.manual_seed(123)
    before = torch.get_rng_state()
    build = lambda context: MKD(context, parts=["nkd"], top_n=4)
    first = build(ctx).f.experts[0][0].weight.clone()
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(build(ctx).f.experts[0][0].weight, first)
    assert not torch.equal(build(dataclasses.replace(ctx, seed=1)).f.experts[0][0].weight, first)


@pytest.mark.parametrize("bad", [{"parts": []}, {"parts": ["nkd", "fd"]}, {"mask": "soft-ish"}, {"alpha": 1.5},
                                 {"neighbours": N_USERS}, {"top_n": 0}, {"neighbour_space": "lda"},
                                 {"distance": "dot"}, {"pca_dim": 0}, {"item_weight": -1.0}])
def test_bad_options_are_refused_with_the_option_named(ctx, bad) -> None:
    with pytest.raises(ValueError, match="kd.mkd"):
        MKD(ctx, **{"parts": ["nkd", "cpd"], "top_n": 4, **bad})


def test_cpd1_in_the_loss_is_the_definition_on_projected_vectors(ctx) -> None:
    mkd, model = MKD(ctx, parts=["cpd"], top_n=4, cpd_weight=1.0), student()
    users, user_vecs, item_table, extra = batch(model)
    inverse, pos, neg = extra["pairs"]
    with torch.no_grad():
        raw = (user_vecs[inverse] * (item_table[pos] - item_table[neg])).sum(-1)
        by_hand = cpd1(mkd.f(user_vecs)[inverse], mkd.g(item_table[pos]), mkd.g(item_table[neg]), raw).sum() / 4
    got = mkd.loss(users, user_vecs, item_table, **extra)["cpd1"]
    torch.testing.assert_close(got.detach(), by_hand)
    assert by_hand > 0  # some projected orders disagree at initialisation: the comparison is not 0 = 0


@pytest.mark.parametrize("backbone", ["mf", "lightgcn"])
def test_mkd_trains_through_the_loop(tmp_path, backbone) -> None:
    """The one loop trains the student and MKD's projectors together, on both pairwise backbones."""
    from rcekd.backbones import BACKBONES
    from rcekd.train import fit

    n_users, n_items = 30, 50
    rng = np.random.default_rng(1)
    splits = make_splits({u: set(rng.choice(n_items, 6, replace=False).tolist()) for u in range(n_users)}, n_users, n_items)
    torch.manual_seed(0)
    teacher = MF(n_users=n_users, n_items=n_items, dim=D_T, init_std=1.0)
    write_cache(teacher, splits, tmp_path / "cache", topk=10, checkpoint_sha256="0" * 64, chunk=8, device=CPU)
    cache = TeacherCache(tmp_path / "cache", splits=splits, device=CPU, chunk=8)
    ctx = KDContext(cache, UserItems(splits.train, n_users, n_items), n_users, n_items, CPU, 8, student_dim=D_S)
    mkd = MKD(ctx, top_n=4, sld={"q": 5, "pool": 8})
    before = [p.detach().clone() for p in mkd.parameters()]
    model = BACKBONES[backbone](n_users=n_users, n_items=n_items, dim=D_S)
    result = fit(model, splits, kd=mkd, kd_weight=1.0, lr=0.01, weight_decay=1e-4, batch_size=32, max_epochs=2,
                 patience=2, seed=0, device=CPU, log=lambda message: None)
    assert all({"nkd", "cpd1", "cpd2", "sld"} <= set(row) for row in result.history)
    assert all(not torch.equal(a, b) for a, b in zip(before, mkd.parameters()))  # every projector weight moved


def test_the_loops_batches_carry_their_unique_items_and_rows() -> None:
    """Step.items is each batch's unique(i⁺ ∪ i⁻), sorted, Step.pairs its rows, Step.user_table every user's
    vector from the same forward, for every batch of an epoch including a short last one."""
    splits = make_splits(TRAIN, N_USERS, N_ITEMS)
    model = student().bind(splits.train)
    model.full_user_table = True
    batches = list(model.training_batches(5, torch.Generator().manual_seed(0)))
    assert len(splits.train) % 5 and len(batches) == -(-len(splits.train) // 5)
    for batch in batches:
        step = model.batch_loss(batch, weight_decay=0.0)
        inverse, pos, neg = step.pairs
        assert torch.equal(step.items, torch.cat([batch.pos, batch.neg]).unique())
        assert torch.equal(pos, batch.pos) and torch.equal(neg, batch.neg) and torch.equal(step.users[inverse], batch.users)
        assert torch.equal(step.user_table, model.user_emb.weight) and torch.equal(step.user_table[step.users], step.user_vecs)
