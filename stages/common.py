"""What several stages share: progress lines, the backbone section of params, run metadata."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from rcekd.backbones import BACKBONES
from rcekd.data import Splits
from rcekd.train import fit
from stages.params import ParamsError, kwargs_for, section


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def progress(label: str):
    """A callback printing `label: done/total (pct)` at most every 2 seconds and at the end."""
    last = [0.0]

    def report(done: int, total: int) -> None:
        now = time.monotonic()
        if done == total or now - last[0] >= 2.0:
            last[0] = now
            log(f"{label}: {done}/{total} users ({100 * done / total:.0f}%)")

    return report


def model_spec(role: dict, where: str) -> tuple[str, dict]:
    """(backbone name, constructor kwargs without the dataset sizes) from a teacher/student section."""
    name = role.get("backbone")
    if name not in BACKBONES:
        raise ParamsError(f"params.yaml: {where}.backbone = {name!r}; expected one of {sorted(BACKBONES)}")
    kwargs = kwargs_for(BACKBONES[name].__init__, role.get("model"), f"{where}.model", skip=("n_users", "n_items"))
    return name, kwargs


def build_model(name: str, kwargs: dict, splits: Splits, *, seed: int) -> tuple[torch.nn.Module, dict]:
    """The backbone with its initial weights drawn from the run's seed; also the full kwargs to save."""
    torch.manual_seed(seed)
    full = {"n_users": splits.n_users, "n_items": splits.n_items, **kwargs}
    return BACKBONES[name](**full), full


def training_options(all_params: dict, role: dict, where: str, params: Path) -> dict:
    """Keyword arguments of `fit` from the shared `train` section plus the role's weight_decay."""
    train = kwargs_for(fit, section(all_params, "train", params), "train", skip=("weight_decay", "seed", "device", "kd", "kd_weight", "kd_reduction", "history_path", "log"))
    if not isinstance(role.get("weight_decay"), (int, float)) or role["weight_decay"] < 0:
        raise ParamsError(f"{params}: {where}.weight_decay = {role.get('weight_decay')!r}; expected a number >= 0")
    for key in ("batch_size", "max_epochs", "patience"):
        if not isinstance(train[key], int) or train[key] < 1:
            raise ParamsError(f"{params}: train.{key} = {train[key]!r}; expected an integer >= 1")
    return {**train, "weight_decay": float(role["weight_decay"]), "seed": int(section(all_params, "seed", params))}
