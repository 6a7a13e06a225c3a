"""The one training loop: teacher and every student, of every backbone, with or without a distillation
method.

Loss per step: L = L_base + λ · L_KD, with L_base the backbone's own loss (BPR over training pairs for
MF and LightGCN, sampled softmax over sequence positions for HSTU) and L_KD the method's loss over the
batch's unique users, computed from the same forward's user vectors and item table. Validation NDCG@20 after
every epoch selects the best epoch (strict improvement, patience counted in evaluations).

With `resume_path`, the loop's whole state (weights, optimiser, random generators, best epoch, history and
each method's state across epochs, named by its `resume_attrs`) is saved there between epochs, and a run
started again with the same `resume_key` continues from it to the same result as an uninterrupted run.
"""

from __future__ import annotations

import copy
import math
import os
import csv
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

import torch
from torch import nn

from rcekd.backbones.base import Backbone, PairwiseBPR, bpr_loss, sample_negatives  # noqa: F401 (re-exported)
from rcekd.data import Splits
from rcekd.evaluate import EVAL_CHUNK, full_ranking
from rcekd.io import atomic_path
from rcekd.sparse import UserItems


class KDMethod(Protocol):
    """What the loop needs from a distillation method (see rcekd/kd).

    A method that also reads the batch's training rows and unique items, or every user's vector from
    the same forward, names them in `wants` ("pairs", "user_table"); `loss` then gets them as keyword
    arguments (pairwise backbones only). A method that is an `nn.Module` (projectors) has its
    parameters trained by the same Adam, as their own group with weight decay `param_weight_decay`,
    and saved in the resume state."""

    def prepare_epoch(self, student: nn.Module, generator: torch.Generator) -> dict[str, float]: ...

    def loss(
        self, users: torch.Tensor, user_vecs: torch.Tensor, item_table: torch.Tensor
    ) -> dict[str, torch.Tensor]: ...


WANTS = ("pairs", "user_table")


@dataclass
class FitResult:
    best_state: dict
    best_epoch: int
    best_valid: dict[str, float]
    epochs_run: int
    history: list[dict] = field(default_factory=list)


def fit(
    model: Backbone,
    splits: Splits,
    *,
    kd: KDMethod | None = None,
    kd_weight: float = 0.0,
    kd_reduction: str = "users",
    lr: float,
    weight_decay: float,
    batch_size: int,
    max_epochs: int,
    patience: int,
    seed: int,
    device: torch.device,
    eval_chunk: int = EVAL_CHUNK,
    history_path: str | Path | None = None,
    on_epoch: Callable[[int, Backbone], None] | None = None,
    resume_path: str | Path | None = None,
    resume_key: str = "",
    resume_every: float = 60.0,
    select: str = "ndcg@20",
    log: Callable[[str], None] = lambda msg: print(msg, file=sys.stderr, flush=True),
) -> FitResult:
    if kd_reduction not in ("users", "rows"):
        raise ValueError(f"kd_reduction = {kd_reduction!r}: expected 'users' or 'rows'")
    if select not in ("ndcg@20", "recall@20"):
        raise ValueError(f"select = {select!r}: expected 'ndcg@20' or 'recall@20'")
    deterministic(device)
    torch.manual_seed(seed)
    generator = torch.Generator(device=device).manual_seed(seed)
    model.bind(splits.train).to(device).train()
    wants = set(getattr(kd, "wants", ()))
    if wants - set(WANTS) or (wants and not isinstance(model, PairwiseBPR)):
        raise ValueError(f"{type(kd).__name__} wants {sorted(wants)}: the loop gives {', '.join(WANTS)}, "
                         f"to pairwise backbones (MF, LightGCN) only, not {type(model).__name__}")
    model.full_user_table = "user_table" in wants
    train_items = UserItems(splits.train, splits.n_users, splits.n_items, device)
    valid_items = UserItems(splits.valid, splits.n_users, splits.n_items, device)
    groups = [{"params": list(model.parameters())}]
    if isinstance(kd, nn.Module):  # the method's own parameters (projectors), with their own weight decay
        kd.to(device).train()
        groups.append({"params": list(kd.parameters()), "weight_decay": float(getattr(kd, "param_weight_decay", 0.0))})
    optimizer = torch.optim.Adam(groups, lr=lr, fused=device.type in ("cpu", "cuda"))

    best = FitResult(best_state=copy.deepcopy(model.state_dict()), best_epoch=0, best_valid={}, epochs_run=0)
    best_ndcg, since_best, first = -1.0, 0, 1
    stateful = {"kd": kd, "on_epoch": on_epoch}  # objects whose `resume_attrs` carry over between epochs
    state = load_resume(resume_path, resume_key, log) if resume_path is not None else None
    if state is not None:
        model.load_state_dict(state["model"])
        if isinstance(kd, nn.Module):
            kd.load_state_dict(state["kd_module"])
        optimizer.load_state_dict(state["optimizer"])
        set_rng_states(generator, state["rng"])
        best = FitResult(**state["best"])
        best_ndcg, since_best = state["best_ndcg"], state["since_best"]
        for name, attrs in state["carried"].items():
            for attr, value in attrs.items():
                setattr(stateful[name], attr, value)
        first = state["epoch"] + 1 if since_best < patience else max_epochs + 1  # a finished run: nothing left
        log(f"resumed from {resume_path} after epoch {state['epoch']} (best {best_ndcg:.4f}@{best.best_epoch})")
    saved_at = time.monotonic()
    for epoch in range(first, max_epochs + 1):
        started = time.perf_counter()
        prep = kd.prepare_epoch(model, generator) if kd is not None else {}
        prep_seconds = time.perf_counter() - started

        sums: dict[str, float] = {}
        n_batches = 0
        for batch in model.training_batches(batch_size, generator):
            loss, parts = step_loss(
                model, batch, kd=kd, kd_weight=kd_weight, kd_reduction=kd_reduction, weight_decay=weight_decay
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            parts["loss"] = loss
            for name, value in parts.items():  # summed on the device: no host sync per step
                sums[name] = sums.get(name, 0.0) + value.detach()
            n_batches += 1
        sums = {name: float(total) for name, total in sums.items()}
        check_finite(epoch, sums, prep, model)
        if isinstance(kd, nn.Module):
            check_finite(epoch, {}, {}, kd)
        train_seconds = time.perf_counter() - started

        valid = full_ranking(model, valid_items, exclude=[train_items], chunk=eval_chunk, device=device)
        if hasattr(kd, "observe"):  # a method that reacts to the student's validation (TaReC's damping)
            kd.observe(valid)
        if on_epoch is not None:  # e.g. record the teacher's top-K lists (rcekd/trajectory.py)
            on_epoch(epoch, model)
        row = {
            "epoch": epoch,
            **{name: total / n_batches for name, total in sums.items()},
            **{k: float(v) for k, v in prep.items()},
            "valid_recall@20": valid["recall@20"],
            "valid_ndcg@20": valid["ndcg@20"],
            "prep_seconds": prep_seconds,
            "train_seconds": train_seconds,
            "epoch_seconds": time.perf_counter() - started,
        }
        best.history.append(row)
        improved = valid[select] > best_ndcg  # the selection metric (validation NDCG@20 unless train.select)
        if improved:
            best_ndcg, since_best = valid[select], 0
            best.best_state = copy.deepcopy(model.state_dict())
            best.best_epoch, best.best_valid = epoch, valid
        else:
            since_best += 1
        best.epochs_run = epoch
        log(
            f"epoch {epoch:4d}  loss {row['loss']:.4f}"
            + "".join(f"  {k} {row[k]:.4f}" for k in [*sums, *prep] if k != "loss")
            + f"  valid {select} {valid[select]:.4f}{' *' if improved else '  '}"
            + f"  best {best_ndcg:.4f}@{best.best_epoch}  {row['epoch_seconds']:.1f}s"
        )
        if history_path is not None and epoch % 10 == 0:
            write_history(history_path, best.history)
        last = since_best >= patience or epoch == max_epochs
        if resume_path is not None and (last or time.monotonic() - saved_at >= resume_every):
            carried = {name: carried_state(obj) for name, obj in stateful.items()}
            save_resume(resume_path, {
                "key": resume_key, "epoch": epoch, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                **({"kd_module": kd.state_dict()} if isinstance(kd, nn.Module) else {}),
                "rng": rng_states(generator), "best": vars(best), "best_ndcg": best_ndcg, "since_best": since_best,
                "carried": carried,
            })
            saved_at = time.monotonic()
        if since_best >= patience:
            log(f"early stop: no validation {select} improvement for {patience} epochs")
            break
    if history_path is not None:
        write_history(history_path, best.history)
    return best


def step_loss(
    model: Backbone, batch: tuple, *, kd: KDMethod | None, kd_weight: float, kd_reduction: str, weight_decay: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One training step's loss L = L_base + λ · L_KD and its parts, all on the device.

    Nothing here, in the backbone's `batch_loss`, in the method's `loss` or in their backward waits for
    the device (no `.item()`, no data-dependent output size): tests/test_sync_guard.py checks it for
    every backbone and method."""
    step = model.batch_loss(batch, weight_decay=weight_decay)
    parts = {"base": step.base}
    loss = step.base
    if kd is not None:
        extra = {}
        for want in getattr(kd, "wants", ()):
            extra |= {"pairs": {"pairs": step.pairs, "items": step.items}, "user_table": {"user_table": step.user_table}}[want]
        kd_parts = kd.loss(step.users, step.user_vecs, step.item_table, **extra)
        per_user = kd_parts["kd"]  # [U_b]
        if kd_reduction == "rows":  # each user weighs by its rows in the batch (the authors' code)
            per_user = per_user * step.rows * (len(step.users) / step.rows.sum().clamp(min=1))
        kd_parts["kd"] = per_user.mean()
        loss = loss + kd_weight * kd_parts["kd"]
        parts.update(kd_parts)
    return loss, parts


def check_finite(epoch: int, sums: dict[str, float], prep: dict[str, float], model: nn.Module) -> None:
    """Stop a diverging run at the end of the epoch, naming what went non-finite: a loss part (its sum
    over the epoch's steps), a statistic of the method's preparation, or the model's weights."""
    bad = [f"loss part {name!r}" for name, total in sums.items() if not math.isfinite(total)]
    bad += [f"preparation value {name!r}" for name, value in prep.items() if not math.isfinite(float(value))]
    bad += [f"weights {name!r}" for name, weights in model.named_parameters() if not bool(torch.isfinite(weights).all())]
    if bad:
        raise FloatingPointError(f"epoch {epoch}: non-finite {', '.join(bad)} (epoch sums {sums})")


def carried_state(obj: object) -> dict:
    """The attributes a method or recorder carries from one epoch to the next (its `resume_attrs`)."""
    return {name: getattr(obj, name) for name in getattr(obj, "resume_attrs", ()) if hasattr(obj, name)}


def rng_states(generator: torch.Generator) -> dict[str, object]:
    states = {"generator": generator.get_state(), "cpu": torch.get_rng_state()}
    if torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(generator: torch.Generator, states: dict) -> None:
    generator.set_state(states["generator"])
    torch.set_rng_state(states["cpu"])
    if "cuda" in states:
        torch.cuda.set_rng_state_all(states["cuda"])


def save_resume(path: str | Path, state: dict) -> None:
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_resume(path: str | Path, key: str, log: Callable[[str], None]) -> dict | None:
    """The saved state of this run (same `key`), or None: no file, or one of another run (ignored, said)."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        state = torch.load(path, weights_only=True)
    except Exception as err:  # not written by this code: atomic writes leave no partial file
        log(f"ignoring {path}: not a readable training state ({type(err).__name__}); starting from epoch 1")
        return None
    if not isinstance(state, dict) or state.get("key") != key:
        log(f"ignoring {path}: saved by a run with other settings or data; starting from epoch 1")
        return None
    return state


def write_history(path: str | Path, rows: list[dict]) -> None:
    """Per-epoch history as CSV (one column per loss part and metric) for `dvc plots`."""
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})


def resolve_device(name: str) -> torch.device:
    """The device `name` names ("auto": CUDA when there is one), with deterministic kernels switched on
    for it (`deterministic`). Every stage gets its device here before it builds a model or puts a
    tensor on the device: cuBLAS reads its workspace setting once, when CUDA first uses it."""
    if name == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # counts devices: no cuBLAS yet
    else:
        device = torch.device(name)
    deterministic(device)
    return device


def deterministic(device: torch.device) -> None:
    """Same seed, same numbers: CPU scatter-adds (embedding backward) are otherwise order-dependent.

    Called by `resolve_device` before any CUDA work, and again by `fit` (for callers that pass a device
    of their own); calling it twice changes nothing."""
    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=device.type != "cpu")
    # ... without also filling every new tensor with NaN first (a debugging aid that costs ~20% of an
    # RCE-KD epoch here): no code path reads memory it has not written.
    torch.utils.deterministic.fill_uninitialized_memory = False
