"""Stage 2: train a backbone without distillation, as a teacher or as the student alone, with early
stopping on validation NDCG@20; save the best checkpoint."""

from __future__ import annotations

from pathlib import Path

import torch
import typer

from rcekd.checkpoint import save_checkpoint
from rcekd.data import load_splits
from rcekd.sparse import UserItems
from rcekd.train import fit, resolve_device
from rcekd.trajectory import TrajectoryRecorder
from stages.common import (
    ROLES, SEED_OPTION_HELP, build_model, diverged, log, model_spec, peak_memory, resume_options, training_options,
    write_timing,
)
from stages.params import PARAMS_OPTION, ParamsError, fail, kwargs_for, load_params, section


def main(
    backbone: str = typer.Option(..., help="Backbone: a key of `backbones` in params.yaml (mf, lightgcn, hstu)."),
    role: str = typer.Option("teacher", help="teacher (the large instance) or student (the small one, trained alone)."),
    data: Path = typer.Option(..., help="Processed dataset directory (from preprocess)."),
    out: Path = typer.Option(..., help="Output checkpoint of the best validation epoch."),
    history: Path = typer.Option(..., help="Output per-epoch history CSV (DVC plots)."),
    timing: Path = typer.Option(None, help="Output CSV of seconds per epoch (DVC plots)."),
    trajectory: Path = typer.Option(None, help="Teachers: output Parquet of the top-K lists at every `trajectory.every`-th epoch before the best (HetComp)."),
    seed: int = typer.Option(None, help=SEED_OPTION_HELP),
    params: Path = PARAMS_OPTION,
) -> None:
    """Train a teacher, or a student alone (params: seed, device, train, backbones.<backbone>.<role>; trajectory with --trajectory)."""
    try:
        if role not in ROLES:
            raise ParamsError(f"--role {role!r}; expected one of {', '.join(ROLES)}")
        all_params = load_params(params)
        spec = model_spec(all_params, backbone, role, params)
        options = training_options(all_params, spec, params, seed=seed)
        device = resolve_device(section(all_params, "device", params))
        splits = load_splits(data)
        recorder, settings = None, None
        if trajectory is not None:
            settings = kwargs_for(TrajectoryRecorder.__init__, section(all_params, "trajectory", params), "trajectory", skip=("chunk", "device"))
            train_items = UserItems(splits.train, splits.n_users, splits.n_items, device)
            recorder = TrajectoryRecorder(train_items, chunk=options["eval_chunk"], device=device, **settings)
        resume = resume_options(out, {
            "stage": "train", "spec": vars(spec), **options, "split": splits.fingerprint, "device": str(device), "trajectory": settings,
        })
    except (ParamsError, ValueError, FileNotFoundError) as err:
        fail(err)
    model, kwargs = build_model(spec, splits, seed=options["seed"])
    log(f"{role} {backbone} {spec.model} on {splits.name} ({device}, {torch.get_num_threads()} threads): {splits.n_users} users, {splits.n_items} items")
    try:
        result = fit(model, splits, device=device, history_path=history, on_epoch=recorder, **resume, **options)
    except FloatingPointError as err:
        diverged(f"{role} {backbone}", err)
    if recorder is not None:
        recorder.write(trajectory, result.best_epoch)
    write_timing(timing, result.history)
    save_checkpoint(
        out,
        backbone=backbone,
        kwargs=kwargs,
        state=result.best_state,
        meta={
            "role": role,
            "method": None if role == "teacher" else "none",
            "split_fingerprint": splits.fingerprint,
            "seed": options["seed"],
            "best_epoch": result.best_epoch,
            "epochs_run": result.epochs_run,
            "best_valid": result.best_valid,
            **peak_memory(device),
        },
    )
    Path(resume["resume_path"]).unlink(missing_ok=True)
    log(f"{role} {backbone}: best validation NDCG@20 {result.best_valid.get('ndcg@20', float('nan')):.4f} at epoch {result.best_epoch}")
