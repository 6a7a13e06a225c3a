"""LightGCN's graph and propagation, HSTU's causality, padding invariance and scores: against hand
or direct computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rcekd.backbones import HSTU, LightGCN, SASRec
from rcekd.backbones.sasrec import SASRecBlock, causal_padding_mask
from rcekd.backbones.sequence import Groups, SequenceBatch, last_items, length_groups
from rcekd.backbones.lightgcn import normalized_adjacency
from rcekd.evaluate import score_chunks

TINY = np.array([[0, 0], [0, 1], [1, 1], [1, 2]])  # 2 users, 3 items


def dense_adjacency(train, n_users, n_items) -> np.ndarray:
    indptr, indices, values = normalized_adjacency(train, n_users, n_items)
    size = n_users + n_items
    dense = np.zeros((size, size))
    for row in range(size):
        dense[row, indices[indptr[row] : indptr[row + 1]]] = values[indptr[row] : indptr[row + 1]]
    return dense


def test_normalized_adjacency_by_hand() -> None:
    """Degrees: u0 = u1 = 2, i0 = 1, i1 = 2, i2 = 1; Â[u, i] = 1 / sqrt(d_u d_i), nodes u0 u1 i0 i1 i2."""
    h, r = 1 / np.sqrt(2), 0.5
    expected = np.array(
        [
            [0, 0, h, r, 0],
            [0, 0, 0, r, h],
            [h, 0, 0, 0, 0],
            [r, r, 0, 0, 0],
            [0, h, 0, 0, 0],
        ]
    )
    np.testing.assert_allclose(dense_adjacency(TINY, 2, 3), expected, rtol=1e-6)
    # a repeated pair counts once; an item nobody trained on is an isolated node (zero row)
    np.testing.assert_allclose(dense_adjacency(np.vstack([TINY, TINY[:1]]), 2, 4)[:5, :5], expected, rtol=1e-6)
    assert not dense_adjacency(TINY, 2, 4)[5].any()


def test_propagation_is_the_mean_of_layers() -> None:
    torch.manual_seed(0)
    model = LightGCN(n_users=2, n_items=3, dim=4, layers=3).bind(TINY)
    adjacency = dense_adjacency(TINY, 2, 3)
    layer = np.concatenate([model.user_emb.weight.detach().numpy(), model.item_emb.weight.detach().numpy()]).astype(np.float64)
    layers = [layer]
    for _ in range(3):
        layers.append(adjacency @ layers[-1])
    expected = np.mean(layers, axis=0)
    users, items = model.encode(torch.tensor([1, 0]))
    np.testing.assert_allclose(users.detach().numpy(), expected[[1, 0]], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(items.detach().numpy(), expected[2:], rtol=1e-5, atol=1e-7)


def test_propagation_gradient_matches_dense() -> None:
    """The sparse backward (Â symmetric) gives the gradient of the dense computation."""
    torch.manual_seed(0)
    model = LightGCN(n_users=2, n_items=3, dim=4, layers=2).bind(TINY)
    weight = torch.randn(5, 4)
    (torch.cat(model.propagate()) * weight).sum().backward()
    adjacency = torch.tensor(dense_adjacency(TINY, 2, 3), dtype=torch.float32)
    ego = torch.cat([model.user_emb.weight, model.item_emb.weight]).detach().requires_grad_()
    ((ego + adjacency @ ego + adjacency @ adjacency @ ego) / 3 * weight).sum().backward()
    np.testing.assert_allclose(model.user_emb.weight.grad.numpy(), ego.grad[:2].numpy(), rtol=1e-5)
    np.testing.assert_allclose(model.item_emb.weight.grad.numpy(), ego.grad[2:].numpy(), rtol=1e-5)


class _PlainSpMM(torch.autograd.Function):
    """Â @ X with the backward Â @ G: the propagation as the plain autograd loop computed it before."""

    @staticmethod
    def forward(ctx, adjacency, x):
        ctx.adjacency = adjacency
        return adjacency @ x

    @staticmethod
    def backward(ctx, grad):
        return None, ctx.adjacency @ grad


@pytest.mark.parametrize("layers", [0, 1, 3])
def test_propagation_equals_the_plain_autograd_loop(layers) -> None:
    """The buffered propagation gives the plain loop's outputs and gradients bit for bit (a batch's users
    with a repeat, as DCD's lists may have; two propagations before one backward, as DCD's step does)."""
    gen = torch.Generator().manual_seed(1)
    n_users, n_items, dim = 30, 40, 8
    pairs = np.unique(torch.stack([torch.randint(n_users, (200,), generator=gen), torch.randint(n_items, (200,), generator=gen)], 1).numpy(), axis=0)
    torch.manual_seed(0)
    model = LightGCN(n_users=n_users, n_items=n_items, dim=dim, layers=layers).bind(pairs)
    users = torch.tensor([3, 7, 7, 0, 29])
    weight_u, weight_i = torch.randn(5, dim, generator=gen), torch.randn(n_items, dim, generator=gen)
    out_u, out_i = model.propagate(users)
    again_u, _ = model.propagate(users[:2])
    ((out_u * weight_u).sum() + (out_i * weight_i).sum() + again_u.sum()).backward()

    ego_u = model.user_emb.weight.detach().clone().requires_grad_()
    ego_i = model.item_emb.weight.detach().clone().requires_grad_()

    def plain(rows):
        layer = torch.cat([ego_u, ego_i])
        total = layer
        for _ in range(layers):
            layer = _PlainSpMM.apply(model.adjacency(), layer)
            total = total + layer
        final = total / (layers + 1)
        return final[rows], final[n_users:]

    ref_u, ref_i = plain(users)
    ref_again, _ = plain(users[:2])
    ((ref_u * weight_u).sum() + (ref_i * weight_i).sum() + ref_again.sum()).backward()
    assert torch.equal(out_u, ref_u) and torch.equal(out_i, ref_i)
    assert torch.equal(model.user_emb.weight.grad, ego_u.grad) and torch.equal(model.item_emb.weight.grad, ego_i.grad)


def test_one_propagation_per_training_step(monkeypatch) -> None:
    torch.manual_seed(0)
    model = LightGCN(n_users=2, n_items=3, dim=4).bind(TINY)
    calls = []
    original = model.propagate
    monkeypatch.setattr(model, "propagate", lambda *users: calls.append(1) or original(*users))
    batch = next(model.training_batches(4, torch.Generator().manual_seed(0)))
    step = model.batch_loss(batch, weight_decay=0.0)
    assert len(calls) == 1 and step.item_table.shape == (3, 4)
    model.eval()
    for _ in score_chunks(model, 2, exclude=[], chunk=1, device=torch.device("cpu")):
        pass
    assert len(calls) == 2  # two chunks of users, one propagation in eval mode


def test_last_items_left_padded_in_time_order() -> None:
    train = np.array([[1, 5], [0, 2], [1, 6], [0, 3], [1, 7], [0, 4], [0, 1]])  # each user's rows in time order
    np.testing.assert_array_equal(last_items(train, 3, 3, pad=9), [[3, 4, 1], [5, 6, 7], [9, 9, 9]])


def hstu(**kwargs) -> HSTU:
    torch.manual_seed(0)
    model = HSTU(n_users=3, n_items=20, **{"dim": 16, "blocks": 2, "heads": 2, "max_len": 8, **kwargs})
    with torch.no_grad():  # non-zero biases, so that a bug in the relative positions would show
        for block in model.blocks:
            block.rel_bias.normal_()
    return model.eval()


@pytest.mark.parametrize("make", [lambda: hstu(), lambda: sasrec()], ids=["hstu", "sasrec"])
def test_a_sequence_backbone_is_causal(make) -> None:
    model = make()
    seq = torch.tensor([[3, 7, 1, 12, 5, 9]])
    base = model(seq)
    for t in range(1, 6):
        changed = seq.clone()
        changed[0, t] = 19
        out = model(changed)
        torch.testing.assert_close(out[:, :t], base[:, :t], rtol=0, atol=1e-6)  # earlier positions never move
        assert not torch.allclose(out[:, t], base[:, t])


@pytest.mark.parametrize("make", [lambda: hstu(), lambda: sasrec()], ids=["hstu", "sasrec"])
def test_left_padding_does_not_change_a_sequence_backbones_output(make) -> None:
    model = make()
    seq = torch.tensor([[3, 7, 1, 12]])
    padded = torch.tensor([[20, 20, 20, 3, 7, 1, 12]])  # 20 = the padding id (n_items)
    torch.testing.assert_close(model(padded)[:, 3:], model(seq), rtol=0, atol=1e-5)


def test_hstu_scores_are_the_last_position_times_the_normalised_items() -> None:
    model = hstu(temperature=0.05)
    train = np.array([[0, 3], [0, 7], [1, 4], [0, 1], [2, 9], [1, 2]])
    model.bind(train)
    users = torch.arange(3)
    (_, _, scores), = list(score_chunks(model, 3, exclude=[], chunk=3, device=torch.device("cpu")))
    last = torch.stack([model(torch.tensor([s]))[0, -1] for s in ([3, 7, 1], [4, 2], [9])])
    items = F.normalize(model.item_emb.weight[:20], dim=-1)
    torch.testing.assert_close(scores, last @ items.T / 0.05, rtol=1e-5, atol=1e-5)
    model.use_raw_cosine()
    user_vecs, table = model.encode(users)
    cosine = user_vecs @ table.T
    torch.testing.assert_close(cosine, last @ items.T, rtol=1e-5, atol=1e-6)
    assert cosine.abs().max() <= 1 + 1e-6


def test_hstu_sampled_softmax_by_hand() -> None:
    """The base loss is −log softmax over [positive, negatives] of cosine / temperature, averaged
    over the positions that have a next item; users with one item contribute none."""
    model = hstu(negatives=4, dropout=0.0).bind(np.array([[0, 3], [0, 7], [0, 1], [1, 4]]))
    negatives = torch.tensor([5, 7, 11, 2])
    step = model.batch_loss((torch.tensor([1, 0]), negatives), weight_decay=0.0)
    out = model(torch.tensor([[3, 7, 1]]))[0]
    items = F.normalize(model.item_emb.weight[:20], dim=-1)
    losses = []
    for t, target in ((0, 7), (1, 1)):
        logits = torch.cat([out[t] @ items[[target]].T, out[t] @ items[negatives].T]) / 0.05
        if target == 7:
            logits[2] = float("-inf")  # a negative equal to the target is left out
        losses.append(-F.log_softmax(logits, 0)[0])
    torch.testing.assert_close(step.base, torch.stack(losses).mean(), rtol=1e-5, atol=1e-6)
    assert step.users.tolist() == [0, 1] and step.rows.tolist() == [2, 0]


def test_length_groups_by_hand() -> None:
    """Windows in powers of two from 4, each group's window its longest length; rows stably in group
    order within their own batch; `inverse` undoes `order`."""
    lengths = torch.tensor([3, 9, 1, 4, 17, 5, 100])
    first, second, third = length_groups(lengths, 3, 100)
    assert first.order.tolist() == [0, 2, 1] and first.sizes == ((2, 3), (1, 9))  # {3, 1} ≤ 4 < {9} ≤ 16
    assert second.order.tolist() == [0, 2, 1] and second.sizes == ((1, 4), (1, 5), (1, 17))
    assert third.order.tolist() == [0] and third.sizes == ((1, 100),)
    for groups in (first, second, third):
        assert torch.equal(groups.order[groups.inverse], torch.arange(len(groups.order)))
    assert length_groups(torch.tensor([0, 2]), 2, 8)[0].sizes == ((2, 2),)  # an empty window counts as 1


def assert_groups_give_the_padded_batch(model, batch: SequenceBatch):
    """A training step on `batch` in its length groups is the step on the padded batch (one group over
    the longest window) up to rounding: loss, user vectors, rows and every gradient; each step starts
    from the same global seed (dropout's draws). Returns the padded batch's step."""
    n = len(batch.users)
    assert len(batch.groups.sizes) >= 3
    longest = max(window for _, window in batch.groups.sizes)
    padded = SequenceBatch(batch.users, batch.negatives, Groups(torch.arange(n), torch.arange(n), ((n, longest),)))
    results = []
    for each in (batch, padded):
        torch.manual_seed(1)
        model.zero_grad()
        step = model.batch_loss(each, weight_decay=0.01)
        step.base.backward()
        results.append((step, {name: p.grad.clone() for name, p in model.named_parameters()}))
    (grouped, grouped_grads), (reference, reference_grads) = results
    torch.testing.assert_close(grouped.base, reference.base, rtol=1e-6, atol=0)
    torch.testing.assert_close(grouped.user_vecs, reference.user_vecs, rtol=1e-5, atol=1e-6)
    assert torch.equal(grouped.rows, reference.rows) and torch.equal(grouped.users, reference.users)
    for name, grad in reference_grads.items():
        torch.testing.assert_close(grouped_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    return reference


def test_hstu_length_groups_give_the_padded_batch() -> None:
    """A training step in length groups is the padded batch's step (one group over the longest window)
    up to rounding: loss, user vectors, rows and every gradient, with dropout on: the groups take
    their rows from the padded batch's dropout draws."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    train = np.array([[u, int(i)] for u in range(10) for i in rng.choice(40, rng.integers(1, 20), replace=False)])
    model = HSTU(n_users=10, n_items=40, dim=8, blocks=2, heads=2, max_len=16, negatives=8, dropout=0.3).bind(train)
    batch = next(model.training_batches(10, torch.Generator().manual_seed(0)))
    reference = assert_groups_give_the_padded_batch(model, batch)
    torch.manual_seed(2)  # other dropout draws give another loss: the draws above were shared
    assert abs(float(model.batch_loss(batch, weight_decay=0.01).base.detach()) - float(reference.base.detach())) > 1e-4


def test_binding_more_pairs_gives_the_test_input_its_validation_interactions() -> None:
    """evaluate.valid_in_test_input binds train + valid after the validation pass: LightGCN propagates over
    the larger graph (its cached eval tables are dropped), a sequence's window ends with the valid item."""
    train, valid = np.array([[0, 0], [0, 1], [1, 1], [1, 2], [2, 0]]), np.array([[0, 3], [1, 0], [2, 3]])
    torch.manual_seed(0)
    model = LightGCN(n_users=3, n_items=4, dim=4, layers=2).bind(train).eval()
    with torch.no_grad():
        before = model.encode(torch.arange(3))[0].clone()
        model.bind(np.concatenate([train, valid]))
        after = model.encode(torch.arange(3))[0]
        fresh = LightGCN(n_users=3, n_items=4, dim=4, layers=2)
        fresh.load_state_dict(model.state_dict())
        expected = fresh.bind(np.concatenate([train, valid])).eval().encode(torch.arange(3))[0]
    assert not torch.allclose(before, after) and torch.equal(after, expected)
    sasrec = SASRec(n_users=3, n_items=4, dim=4, blocks=1, heads=1, max_len=3).bind(np.concatenate([train, valid]))
    assert sasrec.sequences().tolist() == [[0, 1, 3], [1, 2, 0], [4, 0, 3]]  # 4 = padding


def test_backbones_need_their_training_pairs() -> None:
    with pytest.raises(RuntimeError, match="bind"):
        LightGCN(n_users=2, n_items=3, dim=4).propagate()
    with pytest.raises(ValueError, match="exceed"):
        HSTU(n_users=1, n_items=3).bind(TINY)


# ------------------------------------------------------------------------------------------- SASRec


def sasrec(**kwargs) -> SASRec:
    torch.manual_seed(0)
    return SASRec(n_users=3, n_items=20, **{"dim": 8, "blocks": 2, "heads": 2, "max_len": 8, "dropout": 0.0, **kwargs}).eval()


def test_sasrec_block_against_a_hand_computation() -> None:
    """One block on fixed weights, computed independently in float64 numpy with explicit loops: layer
    norm, per head softmax over the keys a query may see (causal, left padding hidden), the residual on
    the normalised input, a second layer norm and the ReLU feed-forward with its residual; padding rows 0."""
    dim, heads, length = 4, 2, 5
    block = SASRecBlock(dim, heads, dropout=0.0).eval()
    rng = np.random.default_rng(7)
    with torch.no_grad():
        for param in block.parameters():
            param.copy_(torch.from_numpy(rng.normal(0, 0.5, param.shape)))
    x = rng.normal(0, 1, (1, length, dim))
    x[0, :2] = 0  # two positions of left padding
    real = np.array([False, False, True, True, True])
    got = block(torch.from_numpy(x).float(), causal_padding_mask(torch.from_numpy(real)[None]),
                torch.from_numpy(real)[None, :, None].float())[0].detach().numpy()

    w = {name: p.detach().double().numpy() for name, p in block.named_parameters()}

    def norm(v, gain, bias):
        return (v - v.mean()) / np.sqrt(v.var() + 1e-8) * gain + bias

    h = dim // heads
    expected = np.zeros((length, dim))
    for i in range(length):
        if not real[i]:
            continue
        normed_i = norm(x[0, i], w["norm_attn.weight"], w["norm_attn.bias"])
        q = w["query.weight"] @ normed_i + w["query.bias"]
        keys = [j for j in range(i + 1) if real[j]]
        kv = [w["key_value.weight"] @ x[0, j] + w["key_value.bias"] for j in keys]
        mixed = np.zeros(dim)
        for head in range(heads):
            cols = slice(head * h, (head + 1) * h)
            scores = np.array([q[cols] @ kvj[:dim][cols] / np.sqrt(h) for kvj in kv])
            weights = np.exp(scores - scores.max()) / np.exp(scores - scores.max()).sum()
            mixed[cols] = sum(a * kvj[dim:][cols] for a, kvj in zip(weights, kv))
        y = norm(normed_i + w["out.weight"] @ mixed + w["out.bias"], w["norm_ffn.weight"], w["norm_ffn.bias"])
        hidden = np.maximum(w["ffn.0.weight"] @ y + w["ffn.0.bias"], 0)
        expected[i] = y + w["ffn.3.weight"] @ hidden + w["ffn.3.bias"]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_sasrec_padding_rows_are_zero() -> None:
    out = sasrec()(torch.tensor([[20, 20, 20, 3, 7, 1, 12]]))
    assert torch.equal(out[:, :3], torch.zeros_like(out[:, :3])) and out[:, 3:].abs().sum() > 0


def test_sasrec_scores_are_the_last_position_times_the_item_embeddings() -> None:
    model = sasrec().bind(np.array([[0, 3], [0, 7], [1, 4], [0, 1], [2, 9], [1, 2]]))
    (_, _, scores), = list(score_chunks(model, 3, exclude=[], chunk=3, device=torch.device("cpu")))
    last = torch.stack([model(torch.tensor([s]))[0, -1] for s in ([3, 7, 1], [4, 2], [9])])
    torch.testing.assert_close(scores, last @ model.item_emb.weight[:20].T, rtol=1e-5, atol=1e-5)


def test_sasrec_binary_cross_entropy_by_hand() -> None:
    """The base loss is −log σ(s⁺) − log σ(−s⁻) of each position's next item against that position's
    negative, averaged over the positions that have a next item, plus the L2 of the scored embeddings;
    users with one item contribute none."""
    model = sasrec().bind(np.array([[0, 3], [0, 7], [0, 1], [1, 4]]))
    negatives = torch.full((2, 8), 20)
    negatives[1, -2:] = torch.tensor([5, 11])  # user 0's window ends ... 3, 7, 1: targets 7, 1 at the last two slots
    step = model.batch_loss((torch.tensor([1, 0]), negatives), weight_decay=0.1)
    out = model(torch.tensor([[3, 7, 1]]))[0]
    table = model.item_emb.weight
    losses, l2 = [], []
    for t, target, negative in ((0, 7, 5), (1, 1, 11)):
        losses.append(-F.logsigmoid(out[t] @ table[target]) - F.logsigmoid(-(out[t] @ table[negative])))
        l2.append(table[target].square().sum() + table[negative].square().sum())
    expected = torch.stack(losses).mean() + 0.5 * 0.1 * torch.stack(l2).mean()
    torch.testing.assert_close(step.base, expected, rtol=1e-5, atol=1e-6)
    assert step.users.tolist() == [0, 1] and step.rows.tolist() == [2, 0]


def test_sasrec_negatives_avoid_training_items_and_groups_give_the_padded_batch() -> None:
    """Each position's negative is never one of the user's training items; a step in length groups is
    the padded batch's step (without dropout, whose draws differ by shape) up to rounding."""
    rng = np.random.default_rng(0)
    train = np.array([[u, int(i)] for u in range(10) for i in rng.choice(40, rng.integers(1, 20), replace=False)])
    model = SASRec(n_users=10, n_items=40, dim=8, blocks=2, heads=2, max_len=16, dropout=0.0).bind(train).train()
    batch = next(model.training_batches(10, torch.Generator().manual_seed(0)))
    known = {(int(u), int(i)) for u, i in train}
    assert not any((int(u), int(n)) in known for u, row in zip(batch.users, batch.negatives) for n in row)
    assert_groups_give_the_padded_batch(model, batch)
