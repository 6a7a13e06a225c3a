"""No training step waits for the device: for every backbone × every distillation method (and none),
the backbone's `batch_loss`, the method's `loss`, the loop's reduction (`rcekd.train.step_loss`) and
their backward run under a guard that fails on each call that brings a tensor's value to the host
(`.item()`, `bool(t)`, `int(t)`, ...) or whose output size depends on the data (`unique`, `nonzero`,
boolean-mask indexing, ...). On a GPU each of them is a host synchronisation; on the CPU the guard
finds them all the same. The method's per-epoch preparation and the epoch's batching may sync: they
run outside the guard. HTD's entity level reads its group sizes on the host where the host is the device
(rcekd/kd/htd.py, GROUP_BY_GROUP): the guard checks the path every other device takes."""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml

from rcekd.backbones import BACKBONES
from rcekd.backbones.base import PairwiseBPR
from rcekd.cache import TeacherCache, write_cache
from rcekd.data import Splits
from rcekd.kd import METHODS, KDContext, htd
from rcekd.sparse import UserItems
from rcekd.train import step_loss

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")

# ---------------------------------------------------------------------------------------------- guard


def _sync(name: str):
    def fail(*args, **kwargs):
        raise AssertionError(f"host sync in a training step: {name}")

    return fail


ALWAYS = [  # every call is a host sync (or an output whose size only the host learns)
    *((torch.Tensor, name) for name in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "__complex__")),
    *((owner, name) for owner in (torch, torch.Tensor) for name in (
        "unique", "unique_consecutive", "nonzero", "argwhere", "bincount", "masked_select", "equal", "allclose", "is_nonzero",
    )),
    (torch.Tensor, "numpy"),  # and transfers: on the CPU the host is the device, so `.to(cpu)` counts too
    (torch.Tensor, "cpu"),
]


def _syncing_index(index) -> bool:
    """A boolean mask (its result's size is its count of True), or a slice with a tensor bound (read on the host)."""
    if isinstance(index, tuple):
        return any(_syncing_index(part) for part in index)
    if isinstance(index, slice):
        return any(isinstance(bound, torch.Tensor) for bound in (index.start, index.stop, index.step))
    return isinstance(index, torch.Tensor) and index.dtype in (torch.bool, torch.uint8)


def _to_host(args, kwargs) -> bool:
    targets = [*args, kwargs.get("device")]
    return any(isinstance(t, (str, torch.device)) and torch.device(t).type == "cpu" for t in targets)


@contextlib.contextmanager
def no_host_sync(monkeypatch: pytest.MonkeyPatch):
    """Within the block, every host-syncing call listed above raises AssertionError naming it."""
    with monkeypatch.context() as patch:
        for owner, name in ALWAYS:
            where = "torch" if owner is torch else "Tensor"
            patch.setattr(owner, name, _sync(f"{where}.{name}"))

        def guarded(name: str, original, check):
            @functools.wraps(original)
            def call(*args, **kwargs):
                if check(*args, **kwargs):
                    raise AssertionError(f"host sync in a training step: {name}")
                return original(*args, **kwargs)

            return call

        def tensor_repeats(first, repeats=None, dim=None, *, output_size=None) -> bool:
            repeats = first if repeats is None else repeats  # torch.repeat_interleave(repeats) alone: counts
            return output_size is None and isinstance(repeats, torch.Tensor)

        patch.setattr(torch, "repeat_interleave", guarded(
            "torch.repeat_interleave with tensor repeats and no output_size", torch.repeat_interleave, tensor_repeats
        ))
        patch.setattr(torch.Tensor, "repeat_interleave", guarded(
            "Tensor.repeat_interleave with tensor repeats and no output_size", torch.Tensor.repeat_interleave,
            lambda self, repeats, dim=None, *, output_size=None: output_size is None and isinstance(repeats, torch.Tensor),
        ))
        patch.setattr(torch, "where", guarded(
            "torch.where(condition) (a nonzero)", torch.where, lambda *args, **kwargs: len(args) + len(kwargs) == 1
        ))
        patch.setattr(torch.Tensor, "__getitem__", guarded(
            "Tensor[bool mask or tensor-bounded slice]", torch.Tensor.__getitem__, lambda self, index: _syncing_index(index)
        ))
        patch.setattr(torch.Tensor, "__setitem__", guarded(
            "Tensor[bool mask or tensor-bounded slice] = ...", torch.Tensor.__setitem__, lambda self, index, value: _syncing_index(index)
        ))
        patch.setattr(torch.Tensor, "to", guarded(
            "Tensor.to(cpu)", torch.Tensor.to, lambda self, *args, **kwargs: _to_host(args, kwargs)
        ))
        yield


t = torch.tensor([1.0, -2.0, 3.0])  # what the cases below index and reduce
CAUGHT = {  # each is a host sync inside a step: the guard must catch it
    "x[x > 0]": lambda: t[t > 0],
    "x[mask] = 0": lambda: t.clone().__setitem__(t < 0, 0.0),
    "x[:, mask]": lambda: t[None][:, t > 0],
    "int(t)": lambda: int(t[0]),
    "float(t)": lambda: float(t.sum()),
    "if t:": lambda: 1 if t.sum() else 0,
    "t.item()": lambda: t.sum().item(),
    "t.tolist()": lambda: t.tolist(),
    "range(t)": lambda: range(t.long()[0]),
    "x[:t]": lambda: t[: t.long()[2]],
    "torch.unique": lambda: torch.unique(t),
    "t.unique()": lambda: t.unique(return_inverse=True),
    "unique_consecutive": lambda: t.unique_consecutive(),
    "nonzero": lambda: t.nonzero(),
    "torch.nonzero": lambda: torch.nonzero(t, as_tuple=True),
    "torch.where(cond)": lambda: torch.where(t > 0),
    "bincount": lambda: torch.bincount(t.long().clamp(min=0)),
    "masked_select": lambda: t.masked_select(t > 0),
    "repeat_interleave(x, counts)": lambda: torch.repeat_interleave(t, torch.tensor([1, 2, 0])),
    "x.repeat_interleave(counts)": lambda: t.repeat_interleave(torch.tensor([1, 2, 0])),
    "repeat_interleave(counts)": lambda: torch.repeat_interleave(torch.tensor([1, 2, 0])),
    "t.cpu()": lambda: t.cpu(),
    "t.to('cpu')": lambda: t.to("cpu"),
    "t.numpy()": lambda: t.numpy(),
    "torch.equal": lambda: torch.equal(t, t),
}
ALLOWED = {  # no sync: the guard must let them through
    "x[long index]": lambda: t[torch.tensor([2, 0])],
    "x[1:], x[None, :2]": lambda: (t[1:], t[None, :2]),
    "x[long] = v": lambda: t.clone().__setitem__(torch.tensor([1]), 0.0),
    "masked_fill, where(c, a, b)": lambda: (t.masked_fill(t > 0, 0.0), torch.where(t > 0, t, 0.0)),
    "repeat_interleave(x, int)": lambda: torch.repeat_interleave(t, 2),
    "repeat_interleave with output_size": lambda: t.repeat_interleave(torch.tensor([1, 2, 0]), output_size=3),
    "nonzero_static": lambda: torch.nonzero_static(t > 0, size=3),
    "t.to(dtype)": lambda: t.to(torch.float64),
    "len(t), t.shape": lambda: (len(t), t.shape[0]),
}


@pytest.mark.parametrize("name", sorted(CAUGHT))
def test_the_guard_catches_each_host_sync(monkeypatch, name: str) -> None:
    with no_host_sync(monkeypatch), pytest.raises(AssertionError, match="host sync in a training step"):
        CAUGHT[name]()
    CAUGHT[name]()  # and only inside the guard


def test_the_guard_lets_sync_free_code_through(monkeypatch) -> None:
    with no_host_sync(monkeypatch):
        for run in ALLOWED.values():
            run()


def test_the_guard_catches_a_sync_in_a_loss_and_in_its_backward(monkeypatch) -> None:
    class SyncInBackward(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x * 2

        @staticmethod
        def backward(ctx, grad):
            return grad * float(grad.sum())  # a sync in the backward

    x = torch.ones(3, requires_grad=True)
    with no_host_sync(monkeypatch), pytest.raises(AssertionError, match="Tensor.__float__"):
        SyncInBackward.apply(x).sum().backward()
    with no_host_sync(monkeypatch), pytest.raises(AssertionError, match=r"Tensor\[bool mask"):
        (x[x > 0] ** 2).sum()


# ------------------------------------------------------------------------------- tiny data and models

N_USERS, N_ITEMS = 24, 60
SMALL = {  # tiny model kwargs and batch size (pairs; HSTU: sequences) per backbone
    "mf": ({"dim": 8}, 48),
    "lightgcn": ({"dim": 8, "layers": 2}, 48),
    "hstu": ({"dim": 8, "blocks": 1, "heads": 2, "max_len": 8, "negatives": 16, "dropout": 0.1}, 8),
    "sasrec": ({"dim": 8, "blocks": 1, "heads": 2, "max_len": 8, "dropout": 0.1}, 8),
}
TEACHERS = {"mf": {"dim": 8, "init_std": 1.0}, "sasrec": {"dim": 8, "blocks": 2, "heads": 2, "max_len": 8, "dropout": 0.0}}
# every student under an MF teacher; a sequence teacher (SASRec) for a pairwise and a sequence student
PAIRS = [("mf", backbone) for backbone in sorted(BACKBONES)] + [("sasrec", "mf"), ("sasrec", "sasrec")]
TINY = {  # sizes that fit the tiny data, over each method's own parameters
    "ce": {"k": 10},
    "rcekd": {"k": 6, "l": 6, "pool_top_m": 20},
    "full_ce": {},
    "cd": {"pool": 20},
    "rrd": {"k": 5, "l": 10, "m": 20},
    "dcd": {"m": 5, "n_under": 2, "n_over": 2, "rank_cap": 20, "item_batch": 8, "rrd": {"k": 5, "l": 10, "m": 20}},
    "hetcomp": {"k": 10, "negatives": 10, "top": 5},
    "sld": {"q": 10, "pool": 20},
    "unkd": {"groups": 2, "pairs_per_group": 2, "pool": 10},
    "tarec": {"assistant": {"dim": 4}, "triples": 3, "iterations": 5},
    "mkd": {"neighbours": 2, "top_n": 5, "sld": {"q": 10, "pool": 20}},
    "rd": {"k": 5, "n": 10, "dynamic_from": 1},
    "de": {"experts": 3},
    "de_rrd": {"experts": 3, "rrd": {"k": 5, "l": 10, "m": 20}},
    "htd": {"groups": 3},
}
LOOP_KEYS = ("weight", "reduction", "method", "lr", "student_weight_decay")  # read by the stage, not the method

# every `kd` section of params.yaml (each method and each RCE-KD ablation, with its own reduction),
# every registered method even without a section, and the paths a section alone does not take
SECTIONS = {name: dict(section) for name, section in yaml.safe_load((ROOT / "params.yaml").read_text())["kd"].items()}
for _name in METHODS:
    SECTIONS.setdefault(_name, {})
SECTIONS["full_ce[factors, not resident]"] = {**SECTIONS["full_ce"], "method": "full_ce", "resident_gb": 0.0}
SECTIONS["hetcomp[list-wise phase]"] = {**SECTIONS["hetcomp"], "method": "hetcomp"}
SECTIONS["dcd[no item side]"] = {**SECTIONS["dcd"], "method": "dcd", "item_side": False}
SECTIONS["mkd[the code's options]"] = {**SECTIONS["mkd"], "method": "mkd", "distance": "cosine", "item_weight": 0.5,
                                      "neighbour_space": "pca", "pca_dim": 4}
CASES = [None, *sorted(SECTIONS)]


@pytest.fixture(scope="module")
def worlds(tmp_path_factory):
    """teacher backbone → its world (built once): tiny splits (each user's items in time order), the
    teacher's caches (float32 and factors) and trajectory."""
    built: dict[str, SimpleNamespace] = {}

    def world(teacher: str) -> SimpleNamespace:
        if teacher not in built:
            built[teacher] = make_world(tmp_path_factory.mktemp(f"sync-{teacher}"), teacher)
        return built[teacher]

    return world


def make_world(tmp: Path, teacher_backbone: str) -> SimpleNamespace:
    rng = np.random.default_rng(0)
    train = np.array([[u, i] for u in range(N_USERS) for i in rng.choice(N_ITEMS, rng.integers(3, 12), replace=False)])
    other = np.array([[u, int(rng.integers(N_ITEMS))] for u in range(N_USERS)])
    splits = Splits(n_users=N_USERS, n_items=N_ITEMS, train=train, valid=other, test=other, fingerprint="sync0001", name="tiny")
    torch.manual_seed(0)
    teacher = BACKBONES[teacher_backbone](n_users=N_USERS, n_items=N_ITEMS, **TEACHERS[teacher_backbone]).bind(train)
    caches = {}
    for store in ("float32", "factors"):
        write_cache(teacher, splits, tmp / store, topk=30, checkpoint_sha256="0" * 64, chunk=8, device=CPU, store=store)
        caches[store] = TeacherCache(tmp / store, splits=splits, device=CPU, chunk=8)
    top, _ = caches["float32"].topk(30, exclude=UserItems(train, N_USERS, N_ITEMS))
    generator = torch.Generator().manual_seed(1)
    trajectory = torch.stack([top[:, torch.randperm(30, generator=generator)[:10]] for _ in range(2)])  # [2, U, 10]
    return SimpleNamespace(splits=splits, caches=caches, trajectory=trajectory)


def build(backbone: str, splits: Splits, **overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    kwargs = {**SMALL[backbone][0], **overrides}
    return BACKBONES[backbone](n_users=splits.n_users, n_items=splits.n_items, **kwargs).bind(splits.train)


def method_for(case: str, backbone: str, world: SimpleNamespace):
    """The method of a `kd` section at tiny sizes, its loop options, and a context as stages/distill.py builds."""
    section = dict(SECTIONS[case])
    loop = {key: section.pop(key) for key in LOOP_KEYS if key in section}
    name = loop.get("method", case)
    kwargs = {**section, **TINY.get(name, {})}
    store = "factors" if "factors" in case else "float32"
    trajectory = world.trajectory[:0] if "list-wise" in case else world.trajectory

    def fit_student(model, method, label):  # the assistant, untrained: its loop is not what this tests
        return SimpleNamespace(best_state=model.state_dict(), history=[{"valid_recall@20": 0.1}])

    splits = world.splits
    ctx = KDContext(
        world.caches[store], UserItems(splits.train, N_USERS, N_ITEMS), N_USERS, N_ITEMS, CPU, 8, trajectory,
        lambda overrides: build(backbone, splits, **overrides), fit_student, student_dim=SMALL[backbone][0]["dim"],
    )
    return METHODS[name](ctx, **kwargs), float(loop.get("weight", 1.0)), loop.get("reduction", "users")


@pytest.mark.parametrize("case", CASES, ids=lambda case: case or "no method")
@pytest.mark.parametrize(("teacher", "backbone"), PAIRS, ids=[f"{t}->{s}" for t, s in PAIRS])
def test_a_training_step_has_no_host_sync(monkeypatch, worlds, teacher: str, backbone: str, case: str | None) -> None:
    world = worlds(teacher)
    model = build(backbone, world.splits).train()
    generator = torch.Generator().manual_seed(0)
    kd, weight, reduction = method_for(case, backbone, world) if case is not None else (None, 0.0, "users")
    if getattr(kd, "wants", ()) and not issubclass(BACKBONES[backbone], PairwiseBPR):
        pytest.skip("a method reading the batch's training rows runs on pairwise backbones only (the loop refuses sequence ones)")
    model.full_user_table = "user_table" in getattr(kd, "wants", ())  # as the loop sets it
    if kd is not None:
        kd.prepare_epoch(model, generator)  # per epoch: may sync
        if isinstance(kd, METHODS["hetcomp"]):
            assert kd.final == ("list-wise" in case)  # the phase the case names
    batch = next(iter(model.training_batches(SMALL[backbone][1], generator)))  # the epoch's batching: may sync
    optimizer = torch.optim.Adam([*model.parameters(), *(kd.parameters() if isinstance(kd, torch.nn.Module) else ())], lr=1e-3, fused=True)
    monkeypatch.setattr(htd, "GROUP_BY_GROUP", set())  # the path a GPU takes
    with no_host_sync(monkeypatch):
        loss, parts = step_loss(model, batch, kd=kd, kd_weight=weight, kd_reduction=reduction, weight_decay=1e-4)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    assert torch.isfinite(loss) and set(parts) >= {"base"} | ({"kd"} if kd is not None else set())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
