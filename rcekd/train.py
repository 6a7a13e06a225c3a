"""The one training loop: teacher and every student, of every backbone, with or without a distillation
method.

Loss per step: L = L_base + λ · L_KD, with L_base the backbone's own loss (BPR over training pairs for
MF and LightGCN, sampled softmax over sequence positions for HSTU) and L_KD the method's loss over the
batch's unique users, computed from the same forward's user vectors and item table. Validation NDCG@20 after
every epoch selects the best epoch (strict improvement, patience counted in evaluations).
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

from rcekd.backbones.base import Backbone, bpr_loss, sample_negatives  # noqa: F401 (re-exported)
from rcekd.data import Splits
from rcekd.evaluate import full_ranking
from rcekd.io import atomic_path
from rcekd.sparse import UserItems


class KDMethod(Protocol):
    """What the loop needs from a distillation method (see rcekd/kd)."""

    def prepare_epoch(self, student: nn.Module, generator: torch.Generator) -> dict[str, float]: ...

    def loss(
        self, users: torch.Tensor, user_vecs: torch.Tensor, item_table: torch.Tensor
    ) -> dict[str, torch.Tensor]: ...


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
    eval_chunk: int = 1024,
    history_path: str | Path | None = None,
    on_epoch: Callable[[int, Backbone], None] | None = None,
    log: Callable[[str], None] = lambda msg: print(msg, file=sys.stderr, flush=True),
) -> FitResult:
    if kd_reduction not in ("users", "rows"):
        raise ValueError(f"kd_reduction = {kd_reduction!r}: expected 'users' or 'rows'")
    deterministic(device)
    torch.manual_seed(seed)
    generator = torch.Generator(device=device).manual_seed(seed)
    model.bind(splits.train).to(device).train()
    train_items = UserItems(splits.train, splits.n_users, splits.n_items, device)
    valid_items = UserItems(splits.valid, splits.n_users, splits.n_items, device)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, fused=device.type in ("cpu", "cuda"))

    best = FitResult(best_state=copy.deepcopy(model.state_dict()), best_epoch=0, best_valid={}, epochs_run=0)
    best_ndcg, since_best = -1.0, 0
    for epoch in range(1, max_epochs + 1):
        started = time.perf_counter()
        prep = kd.prepare_epoch(model, generator) if kd is not None else {}
        prep_seconds = time.perf_counter() - started

        sums: dict[str, float] = {}
        n_batches = 0
        for batch in model.training_batches(batch_size, generator):
            step = model.batch_loss(batch, weight_decay=weight_decay)
            parts = {"base": step.base}
            loss = step.base
            if kd is not None:
                kd_parts = kd.loss(step.users, step.user_vecs, step.item_table)
                per_user = kd_parts["kd"]  # [U_b]
                if kd_reduction == "rows":  # each user weighs by its rows in the batch (the authors' code)
                    per_user = per_user * step.rows * (len(step.users) / step.rows.sum().clamp(min=1))
                kd_parts["kd"] = per_user.mean()
                loss = loss + kd_weight * kd_parts["kd"]
                parts.update(kd_parts)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            parts["loss"] = loss
            for name, value in parts.items():  # summed on the device: no host sync per step
                sums[name] = sums.get(name, 0.0) + value.detach()
            n_batches += 1
        sums = {name: float(total) for name, total in sums.items()}
        if not all(math.isfinite(total) for total in sums.values()):
            raise FloatingPointError(f"epoch {epoch}: non-finite loss (epoch sums {sums})")
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
        improved = valid["ndcg@20"] > best_ndcg
        if improved:
            best_ndcg, since_best = valid["ndcg@20"], 0
            best.best_state = copy.deepcopy(model.state_dict())
            best.best_epoch, best.best_valid = epoch, valid
        else:
            since_best += 1
        best.epochs_run = epoch
        log(
            f"epoch {epoch:4d}  loss {row['loss']:.4f}"
            + "".join(f"  {k} {row[k]:.4f}" for k in [*sums, *prep] if k != "loss")
            + f"  valid ndcg@20 {valid['ndcg@20']:.4f}{' *' if improved else '  '}"
            + f"  best {best_ndcg:.4f}@{best.best_epoch}  {row['epoch_seconds']:.1f}s"
        )
        if history_path is not None and epoch % 10 == 0:
            write_history(history_path, best.history)
        if since_best >= patience:
            log(f"early stop: no validation NDCG@20 improvement for {patience} epochs")
            break
    if history_path is not None:
        write_history(history_path, best.history)
    return best


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
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def deterministic(device: torch.device) -> None:
    """Same seed, same numbers: CPU scatter-adds (embedding backward) are otherwise order-dependent."""
    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=device.type != "cpu")
    # ... without also filling every new tensor with NaN first (a debugging aid that costs ~20% of an
    # RCE-KD epoch here): no code path reads memory it has not written.
    torch.utils.deterministic.fill_uninitialized_memory = False
