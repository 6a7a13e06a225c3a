"""What several stages share: progress lines, the backbone section of params, run metadata."""

from __future__ import annotations

import hashlib
import json
import os
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import rcekd
from rcekd.backbones import BACKBONES
from rcekd.data import Splits
from rcekd.train import fit, write_history
from stages.params import ParamsError, fail, kwargs_for, section


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


ROLES = ("teacher", "student")


@dataclass(frozen=True)
class ModelSpec:
    """One `backbones.<name>.<role>` section of params.yaml, checked."""

    backbone: str
    role: str
    model: dict  # constructor kwargs without the dataset sizes
    weight_decay: float
    batch_size: int | None  # overrides train.batch_size (HSTU counts sequences, not pairs)
    lr: float | None = None  # overrides train.lr for this role's runs (a student alone tuned apart)
    patience: int | None = None  # overrides train.patience (a teacher whose validation dips early on)


def model_spec(all_params: dict, backbone: str, role: str, params: Path) -> ModelSpec:
    """The checked `backbones.<backbone>.<role>` section."""
    if backbone not in BACKBONES:
        raise ParamsError(f"backbone {backbone!r}; expected one of {sorted(BACKBONES)}")
    where = f"backbones.{backbone}.{role}"
    values = dict(section(all_params, where, params) or {})
    unknown = sorted(set(values) - {"model", "weight_decay", "batch_size", "lr", "patience"})
    if unknown:
        raise ParamsError(f"{params}: unknown parameter(s) {', '.join(f'{where}.{k}' for k in unknown)} (valid: model, weight_decay, batch_size, lr, patience)")
    model = kwargs_for(BACKBONES[backbone].__init__, values.get("model"), f"{where}.model", skip=("n_users", "n_items"))
    decay = values.get("weight_decay", 0.0)
    if not isinstance(decay, (int, float)) or isinstance(decay, bool) or decay < 0:
        raise ParamsError(f"{params}: {where}.weight_decay = {decay!r}; expected a number >= 0")
    batch, patience = values.get("batch_size"), values.get("patience")
    for key, value in (("batch_size", batch), ("patience", patience)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ParamsError(f"{params}: {where}.{key} = {value!r}; expected an integer >= 1 (or leave it out: train.{key})")
    lr = values.get("lr")
    if lr is not None and (not isinstance(lr, (int, float)) or isinstance(lr, bool) or lr <= 0):
        raise ParamsError(f"{params}: {where}.lr = {lr!r}; expected a number > 0 (or leave it out: train.lr)")
    return ModelSpec(backbone, role, model, float(decay), batch, None if lr is None else float(lr), patience)


def build_model(spec: ModelSpec, splits: Splits, *, seed: int) -> tuple[torch.nn.Module, dict]:
    """The backbone with its initial weights drawn from the run's seed; also the full kwargs to save."""
    torch.manual_seed(seed)
    full = {"n_users": splits.n_users, "n_items": splits.n_items, **spec.model}
    return BACKBONES[spec.backbone](**full).bind(splits.train), full


def diverged(run: str, err: FloatingPointError) -> None:
    """A training run whose loss went non-finite: one `error:` line naming the run, the epoch and the
    loss parts (their epoch sums, the non-finite among them), then exit 2; nothing is saved."""
    fail(FloatingPointError(f"{run}: {err}; stopped, no checkpoint written (try a lower train.lr or kd weight)"))


def peak_memory(device: torch.device) -> dict[str, float]:
    """The process's peak resident memory so far (and the GPU's peak allocation on CUDA), in MiB."""
    peaks = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}  # Linux: KiB
    if device.type == "cuda":
        peaks["peak_gpu_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return peaks


SEED_OPTION_HELP = "The run's seed, overriding params `seed` (dvc.yaml passes each of `grid.seeds`)."


def write_timing(path: Path | None, history: list[dict]) -> None:
    """Seconds per epoch (total, per-epoch preparation, training steps) as a CSV for `dvc plots`."""
    if path is not None:
        columns = ("epoch", "epoch_seconds", "prep_seconds", "train_seconds")
        write_history(path, [{key: row[key] for key in columns} for row in history])


RESUME_DIR = "RCEKD_RESUME_DIR"


def resume_options(out: Path, run: dict, code: Path = Path(rcekd.__file__).parent) -> dict:
    """`fit`'s resume keywords: the training state lives beside the checkpoint (`<out>.resume`), or, where
    the environment names a folder (RCEKD_RESUME_DIR, which `rcekd run-queue` sets for the queue's
    experiments, each run in a fresh copy of the repository), in that folder as `<key>.resume`; it is
    removed once the checkpoint is written. The key hashes everything the run read and rcekd's own code,
    so a state saved by a run with other settings, data or code is never continued."""
    run = {key: value for key, value in run.items() if key != "resume_every"}  # how often: not what
    sources = hashlib.sha256()
    for source in sorted(code.rglob("*.py")):
        sources.update(source.read_bytes())
    run["code"] = sources.hexdigest()
    key = hashlib.sha256(json.dumps(run, sort_keys=True, default=str).encode()).hexdigest()
    folder = os.environ.get(RESUME_DIR, "").strip()
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
    return {"resume_path": Path(folder) / f"{key}.resume" if folder else resume_file(out), "resume_key": key}


def resume_file(out: Path) -> Path:
    return out.with_name(out.name + ".resume")


def training_options(all_params: dict, spec: ModelSpec, params: Path, *, seed: int | None = None) -> dict:
    """Keyword arguments of `fit` from the shared `train` section plus the backbone role's own; `seed`
    (a grid seed) overrides params `seed`."""
    skip = ("weight_decay", "seed", "device", "kd", "kd_weight", "kd_reduction", "history_path", "on_epoch", "resume_path", "resume_key", "log")
    train = kwargs_for(fit, section(all_params, "train", params), "train", skip=skip)
    # train.batch_size, max_epochs, patience: integers >= 1, checked by load_params (stages.params.validate)
    if spec.batch_size is not None:
        train["batch_size"] = spec.batch_size
    if spec.lr is not None:
        train["lr"] = spec.lr
    if spec.patience is not None:
        train["patience"] = spec.patience
    if seed is None:
        seed = section(all_params, "seed", params)
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ParamsError(f"{params}: seed = {seed!r}; expected an integer >= 0")
    return {**train, "weight_decay": spec.weight_decay, "seed": seed}
