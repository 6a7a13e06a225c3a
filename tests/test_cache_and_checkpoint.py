"""Teacher cache (write_cache / TeacherCache), checkpoints (save/load) and the BPR pieces of the training
loop (sample_negatives, bpr_loss): round trips against numpy, and refusals that name the problem."""

from __future__ import annotations

import dataclasses
import math
import os

import numpy as np
import pytest
import torch

from rcekd.backbones import MF
from rcekd.cache import STORES, TeacherCache, write_cache
from rcekd.checkpoint import load_checkpoint, save_checkpoint
from rcekd.data import Splits
from rcekd.io import atomic_path, read_json, write_json
from rcekd.sparse import UserItems
from rcekd.train import bpr_loss, sample_negatives

CPU = torch.device("cpu")
N_USERS, N_ITEMS, STORED_K = 7, 10, 4


def make_teacher() -> MF:
    torch.manual_seed(0)
    return MF(n_users=N_USERS, n_items=N_ITEMS, dim=3, init_std=1.0)


def numpy_scores(model: MF) -> np.ndarray:
    """The teacher's full score matrix, computed here as a float64 product of its factor tables."""
    return model.user_emb.weight.detach().double().numpy() @ model.item_emb.weight.detach().double().numpy().T


@pytest.fixture
def splits() -> Splits:
    """7 users × 10 items; user u has training items {u, u+1, u+2} mod 10, user 6 has none."""
    train = np.array([[u, (u + d) % N_ITEMS] for u in range(6) for d in range(3)], dtype=np.int64)
    other = np.array([[0, 9], [6, 0]], dtype=np.int64)
    return Splits(n_users=N_USERS, n_items=N_ITEMS, train=train, valid=other, test=other, fingerprint="abcd1234", name="toy")


@pytest.fixture
def cache_dir(tmp_path, splits):
    teacher = make_teacher()
    # make a training item the user's best-scored item, so that excluding it is visible
    with torch.no_grad():
        teacher.item_emb.weight[1] = teacher.user_emb.weight[0] * 10
    directory = tmp_path / "cache"
    calls = []
    meta = write_cache(teacher, splits, directory, topk=STORED_K, checkpoint_sha256="f" * 64, chunk=3, device=CPU,
                       progress=lambda done, total: calls.append((done, total)))
    assert calls[-1] == (N_USERS, N_USERS)
    assert meta["shape"] == [N_USERS, N_ITEMS] and meta["topk"] == STORED_K
    assert meta["split_fingerprint"] == "abcd1234" and meta["teacher_sha256"] == "f" * 64
    return directory, numpy_scores(teacher)


def reference_topk(scores: np.ndarray, k: int, train: dict[int, set[int]] | None) -> list[list[int]]:
    out = []
    for u in range(scores.shape[0]):
        candidates = [i for i in range(scores.shape[1]) if train is None or i not in train.get(u, set())]
        out.append(sorted(candidates, key=lambda i: -scores[u, i])[:k])
    return out


def train_sets(splits: Splits) -> dict[int, set[int]]:
    sets: dict[int, set[int]] = {}
    for u, i in splits.train.tolist():
        sets.setdefault(u, set()).add(i)
    return sets


# ---------------------------------------------------------------- teacher cache


def test_cache_scores_equal_the_teacher(cache_dir, splits):
    """rows() returns the teacher's scores; gather() picks the right (user, item) entries."""
    directory, scores = cache_dir
    cache = TeacherCache(directory, splits=splits, device=CPU, chunk=3)
    np.testing.assert_allclose(cache.rows(0, N_USERS).numpy(), scores, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(cache.rows(2, 5).numpy(), scores[2:5], rtol=1e-5, atol=1e-5)
    assert (directory / "scores.f32").stat().st_size == N_USERS * N_ITEMS * 4

    items = torch.tensor([[(u * 3 + n) % N_ITEMS for n in range(5)] for u in range(N_USERS)])
    got = cache.gather(items).numpy()
    expected = np.array([[scores[u, i] for i in row] for u, row in enumerate(items.tolist())])
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("k", [1, 3, STORED_K, STORED_K + 3])  # stored lists, then a memmap scan
def test_cache_topk_excludes_training_items(cache_dir, splits, k):
    """topk(k, exclude=train): no training item, best first, equal to a plain-Python top-k."""
    directory, scores = cache_dir
    cache = TeacherCache(directory, splits=splits, device=CPU, chunk=3)
    train_u = UserItems(splits.train, N_USERS, N_ITEMS)
    items, values = cache.topk(k, exclude=train_u)
    assert items.shape == (N_USERS, k) and values.shape == (N_USERS, k)
    assert items.dtype == torch.int64
    train = train_sets(splits)
    assert items.tolist() == reference_topk(scores, k, train)
    for u in range(N_USERS):
        assert not set(items[u].tolist()) & train.get(u, set())
        row = values[u].numpy()
        assert (np.diff(row) <= 0).all(), row
        np.testing.assert_allclose(row, scores[u, items[u].numpy()], rtol=1e-5, atol=1e-5)


def test_cache_topk_without_exclusion_includes_training_items(cache_dir, splits):
    """topk(k, exclude=None) ranks every item: user 0's best item is its training item 1."""
    directory, scores = cache_dir
    cache = TeacherCache(directory, splits=splits, device=CPU, chunk=3)
    items, values = cache.topk(3, exclude=None)
    assert items.tolist() == reference_topk(scores, 3, None)
    assert items[0, 0].item() == 1 and 1 in train_sets(splits)[0]
    excluded, _ = cache.topk(3, exclude=UserItems(splits.train, N_USERS, N_ITEMS))
    assert 1 not in excluded[0].tolist()


def test_cache_topk_out_of_range(cache_dir, splits):
    directory, _ = cache_dir
    cache = TeacherCache(directory, splits=splits, device=CPU)
    for k in (0, N_ITEMS + 1):
        with pytest.raises(ValueError, match="top-k"):
            cache.topk(k, exclude=None)
    with pytest.raises(ValueError, match="cache.topk"):
        write_cache(make_teacher(), splits, directory.parent / "bad", topk=N_ITEMS + 1, checkpoint_sha256="0",
                    chunk=3, device=CPU)


def test_cache_refuses_another_split(cache_dir, splits):
    """A cache written for one split fingerprint is refused for another, naming both."""
    directory, _ = cache_dir
    other = dataclasses.replace(splits, fingerprint="ffff0000")
    with pytest.raises(ValueError, match=r"split fingerprint abcd1234.*ffff0000"):
        TeacherCache(directory, splits=other, device=CPU)


def test_cache_refuses_another_teacher(cache_dir, splits):
    """A cache made from one teacher checkpoint is refused when another checkpoint's hash is expected."""
    directory, _ = cache_dir
    assert TeacherCache(directory, splits=splits, device=CPU, teacher_sha256="f" * 64).meta["teacher_sha256"] == "f" * 64
    with pytest.raises(ValueError, match=r"teacher checkpoint sha256 ffffffffffff.*0123456789ab"):
        TeacherCache(directory, splits=splits, device=CPU, teacher_sha256="0123456789ab" + "0" * 52)


def test_cache_refuses_another_shape(cache_dir, splits):
    directory, _ = cache_dir
    bigger = dataclasses.replace(splits, n_items=N_ITEMS + 1)
    with pytest.raises(ValueError, match="shape"):
        TeacherCache(directory, splits=bigger, device=CPU)


def test_cache_refuses_truncated_scores(cache_dir, splits):
    """A scores.f32 shorter than |U|·|I|·4 bytes is refused, with the sizes in the message."""
    directory, _ = cache_dir
    path = directory / "scores.f32"
    os.truncate(path, path.stat().st_size - 4)
    with pytest.raises(ValueError, match=rf"scores.f32 has {N_USERS * N_ITEMS * 4 - 4} bytes.*truncated"):
        TeacherCache(directory, splits=splits, device=CPU)
    path.unlink()
    with pytest.raises(ValueError, match="scores.f32 missing"):
        TeacherCache(directory, splits=splits, device=CPU)


@pytest.mark.parametrize("store, tolerance", [("float16", 2e-3), ("factors", 1e-5)])
def test_cache_stores_read_like_float32(cache_dir, splits, tmp_path, store, tolerance):
    """The float16 and factors stores give the float32 store's scores through every read (float16 at
    half precision), the same top-K lists, and files of the sizes announced."""
    directory, scores = cache_dir
    teacher = make_teacher()
    with torch.no_grad():
        teacher.item_emb.weight[1] = teacher.user_emb.weight[0] * 10  # as the fixture
    other = tmp_path / store
    meta = write_cache(teacher, splits, other, topk=STORED_K, checkpoint_sha256="f" * 64, chunk=3, device=CPU, store=store)
    assert meta["store"] == store
    full = TeacherCache(directory, splits=splits, device=CPU, chunk=3)
    cache = TeacherCache(other, splits=splits, device=CPU, chunk=3)
    close = dict(rtol=tolerance, atol=tolerance)
    np.testing.assert_allclose(cache.rows(0, N_USERS).numpy(), scores, **close)
    np.testing.assert_allclose(cache.rows(2, 5).numpy(), scores[2:5], **close)
    users = torch.tensor([5, 0, 5, 3])
    np.testing.assert_allclose(cache.rows_of(users).numpy(), scores[users.numpy()], **close)
    np.testing.assert_allclose(full.rows_of(users).numpy(), scores[users.numpy()], rtol=1e-5, atol=1e-5)
    items = torch.tensor([[(u * 3 + n) % N_ITEMS for n in range(5)] for u in range(N_USERS)])
    np.testing.assert_allclose(cache.gather(items).numpy(), full.gather(items).numpy(), **close)
    np.testing.assert_allclose(cache.take(1, 4, items[1:4]).numpy(), full.take(1, 4, items[1:4]).numpy(), **close)
    train = UserItems(splits.train, N_USERS, N_ITEMS)
    assert torch.equal(cache.topk(STORED_K, exclude=train)[0], full.topk(STORED_K, exclude=train)[0])
    assert cache.topk(STORED_K + 2, exclude=train)[0].tolist() == reference_topk(scores, STORED_K + 2, train_sets(splits))
    sizes = {"float16": {"scores.f16": N_USERS * N_ITEMS * 2}, "factors": {"users.f32": N_USERS * 3 * 4, "items.f32": N_ITEMS * 3 * 4}}
    for name, size in sizes[store].items():
        assert (other / name).stat().st_size == size
        os.truncate(other / name, size - 2)
        with pytest.raises(ValueError, match=rf"{name} has {size - 2} bytes.*truncated"):
            TeacherCache(other, splits=splits, device=CPU)
        os.truncate(other / name, size)
    with pytest.raises(ValueError, match="cache.store = 'float8'.*float32, float16, factors"):
        write_cache(teacher, splits, tmp_path / "bad", topk=2, checkpoint_sha256="0", chunk=3, device=CPU, store="float8")


def test_cache_refuses_an_old_format(cache_dir, splits):
    directory, _ = cache_dir
    meta = read_json(directory / "meta.json")
    write_json(directory / "meta.json", {**meta, "format_version": 1})
    with pytest.raises(ValueError, match="format_version 1 .expected 3: rerun the cache_teacher stage"):
        TeacherCache(directory, splits=splits, device=CPU)


def test_every_store_holds_the_teachers_factors(tmp_path, splits):
    """Feature-level methods (MKD) read the teacher's vectors whatever store holds its scores."""
    torch.manual_seed(0)
    teacher = MF(n_users=splits.n_users, n_items=splits.n_items, dim=4, init_std=1.0).bind(splits.train)
    users, items = teacher.user_emb.weight.detach(), teacher.item_emb.weight.detach()
    for store in STORES:
        write_cache(teacher, splits, tmp_path / store, topk=2, checkpoint_sha256="0", chunk=3, device=CPU, store=store)
        cache = TeacherCache(tmp_path / store, splits=splits, device=CPU)
        assert torch.equal(cache.factors()[0], users) and torch.equal(cache.factors()[1], items), store
        os.truncate(tmp_path / store / "items.f32", 4)
        with pytest.raises(ValueError, match="items.f32 has 4 bytes"):
            TeacherCache(tmp_path / store, splits=splits, device=CPU)


def test_cache_refuses_missing_meta(cache_dir, splits):
    directory, _ = cache_dir
    (directory / "meta.json").unlink()
    with pytest.raises(FileNotFoundError, match="meta.json"):
        TeacherCache(directory, splits=splits, device=CPU)


# ---------------------------------------------------------------- checkpoints


def test_checkpoint_round_trip(tmp_path):
    """The rebuilt model has the same class, shapes and weights; meta comes back unchanged."""
    model = make_teacher()
    kwargs = {"n_users": N_USERS, "n_items": N_ITEMS, "dim": 3}
    meta = {"split_fingerprint": "abcd1234", "epoch": 12, "valid": {"ndcg@20": 0.25}}
    path = tmp_path / "ckpt" / "teacher.pt"
    save_checkpoint(path, backbone="mf", kwargs=kwargs, state=model.state_dict(), meta=meta)
    loaded, loaded_meta = load_checkpoint(path, split_fingerprint="abcd1234")
    assert isinstance(loaded, MF)
    assert loaded_meta == meta
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    users = torch.arange(N_USERS)
    assert torch.equal(loaded.encode(users)[0], model.encode(users)[0])
    # no fingerprint given: no check
    load_checkpoint(path)


def test_checkpoint_refuses_another_split(tmp_path):
    model = make_teacher()
    path = tmp_path / "teacher.pt"
    save_checkpoint(path, backbone="mf", kwargs={"n_users": N_USERS, "n_items": N_ITEMS, "dim": 3},
                    state=model.state_dict(), meta={"split_fingerprint": "abcd1234"})
    with pytest.raises(ValueError, match=r"abcd1234.*ffff0000"):
        load_checkpoint(path, split_fingerprint="ffff0000")


def test_checkpoint_refuses_garbage_and_foreign_files(tmp_path):
    """Random bytes, a torch file that is not an rcekd checkpoint, an unknown backbone, a missing file."""
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"this is not a checkpoint" * 10)
    with pytest.raises(ValueError, match="not a readable rcekd checkpoint"):
        load_checkpoint(garbage)

    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(2)}, foreign)
    with pytest.raises(ValueError, match="format version"):
        load_checkpoint(foreign)

    unknown = tmp_path / "unknown.pt"
    save_checkpoint(unknown, backbone="transformer9000", kwargs={}, state={}, meta={})
    with pytest.raises(ValueError, match="unknown backbone"):
        load_checkpoint(unknown)

    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "absent.pt")


# ---------------------------------------------------------------- training-loop pieces


@pytest.fixture
def known() -> UserItems:
    """User 0 knows 18 of 20 items (only 7 and 13 are free), user 1 knows {0}, user 2 knows nothing."""
    pairs = [[0, i] for i in range(20) if i not in (7, 13)] + [[1, 0]]
    return UserItems(np.array(pairs, dtype=np.int64), 3, 20)


def test_sample_negatives_never_known(known):
    """Over 6,000 draws no negative is a known item of its user; user 0 gets both free items, about
    evenly; every item is in range."""
    users = torch.tensor([0, 1, 2] * 2000)
    negatives = sample_negatives(users, known, torch.Generator().manual_seed(0))
    assert negatives.shape == users.shape
    assert negatives.min() >= 0 and negatives.max() < 20
    known_sets = {0: set(range(20)) - {7, 13}, 1: {0}, 2: set()}
    for u, n in zip(users.tolist(), negatives.tolist()):
        assert n not in known_sets[u], (u, n)
    user0 = negatives[users == 0]
    assert set(user0.tolist()) == {7, 13}
    assert 0.4 < (user0 == 7).float().mean().item() < 0.6
    assert set(negatives[users == 2].tolist()) == set(range(20))  # uniform over everything


def test_sample_negatives_deterministic(known):
    users = torch.tensor([0, 1, 2] * 300)
    a = sample_negatives(users, known, torch.Generator().manual_seed(5))
    b = sample_negatives(users, known, torch.Generator().manual_seed(5))
    c = sample_negatives(users, known, torch.Generator().manual_seed(6))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_bpr_loss_hand_value():
    """Row 1: u=(1,0), i+=(2,0), i−=(0,1): −log σ(2) + wd/2·(1+4+1); row 2: u=(0,1), i+=(0,0), i−=(1,1):
    −log σ(−1) + wd/2·(1+0+2); the loss is their mean."""
    user = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    pos = torch.tensor([[2.0, 0.0], [0.0, 0.0]])
    neg = torch.tensor([[0.0, 1.0], [1.0, 1.0]])
    wd = 0.1
    row1 = math.log(1 + math.exp(-2.0)) + wd / 2 * 6
    row2 = math.log(1 + math.exp(1.0)) + wd / 2 * 3
    assert bpr_loss(user, pos, neg, weight_decay=wd).item() == pytest.approx((row1 + row2) / 2, rel=1e-6)
    assert bpr_loss(user, pos, neg, weight_decay=0.0).item() == pytest.approx(
        (math.log(1 + math.exp(-2.0)) + math.log(1 + math.exp(1.0))) / 2, rel=1e-6
    )


@pytest.mark.parametrize("store", ["float32", "float16"])
def test_resident_cache_reads_like_the_file(cache_dir, splits, tmp_path, store):
    """A resident cache (the scores held in one tensor, as on a GPU) gives the streamed cache's numbers
    through every read, and a caller writing into what `rows` returned leaves it intact."""
    directory, _ = cache_dir
    if store != "float32":
        teacher = make_teacher()
        with torch.no_grad():
            teacher.item_emb.weight[1] = teacher.user_emb.weight[0] * 10  # as the fixture
        directory = tmp_path / store
        write_cache(teacher, splits, directory, topk=STORED_K, checkpoint_sha256="f" * 64, chunk=3, device=CPU, store=store)
    streamed = TeacherCache(directory, splits=splits, device=CPU, chunk=3)
    resident = TeacherCache(directory, splits=splits, device=CPU, chunk=3, resident=True)
    assert resident.resident is not None and streamed.resident is None
    users = torch.tensor([5, 0, 5, 3])
    items = torch.tensor([[(u * 3 + n) % N_ITEMS for n in range(5)] for u in range(N_USERS)])
    assert torch.equal(resident.rows(0, N_USERS), streamed.rows(0, N_USERS))
    assert torch.equal(resident.rows_of(users), streamed.rows_of(users))
    assert torch.equal(resident.take(1, 4, items[1:4]), streamed.take(1, 4, items[1:4]))
    assert torch.equal(resident.gather(items), streamed.gather(items))
    train = UserItems(splits.train, N_USERS, N_ITEMS)
    for k in (STORED_K, STORED_K + 2):  # from the Parquet lists, then by scanning the rows
        assert torch.equal(resident.topk(k, exclude=train)[0], streamed.topk(k, exclude=train)[0])
    resident.rows(0, 2).fill_(float("nan"))
    assert torch.equal(resident.rows(0, N_USERS), streamed.rows(0, N_USERS))


def test_a_stop_while_a_file_is_replaced_keeps_the_old_file(tmp_path, monkeypatch):
    """A stop (SIGTERM raises SystemExit) at the rename keeps the file it was replacing: a resume state of
    hundreds of MB is not lost to a kill that lands as its new version is moved into place."""
    final = tmp_path / "state.resume"
    final.write_bytes(b"old")

    def stopped(*args):
        raise SystemExit("terminated")

    monkeypatch.setattr(os, "replace", stopped)
    with pytest.raises(SystemExit):
        with atomic_path(final) as tmp:
            tmp.write_bytes(b"new")
    assert final.read_bytes() == b"old"
    assert list(tmp_path.iterdir()) == [final]  # and no partial file beside it
    monkeypatch.undo()
    with atomic_path(final) as tmp:
        tmp.write_bytes(b"new")
    assert final.read_bytes() == b"new"
