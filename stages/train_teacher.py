"""Stage 2: train the teacher with early stopping on validation NDCG@20; save the best checkpoint."""

from __future__ import annotations

from pathlib import Path

import typer

from rcekd.checkpoint import save_checkpoint
from rcekd.data import load_splits
from rcekd.train import fit, resolve_device
from stages.common import build_model, log, model_spec, training_options
from stages.params import PARAMS_OPTION, ParamsError, fail, load_params, section


def main(
    data: Path = typer.Option(..., help="Processed dataset directory (from preprocess)."),
    out: Path = typer.Option(..., help="Output checkpoint of the best validation epoch."),
    history: Path = typer.Option(..., help="Output per-epoch history CSV (DVC plots)."),
    params: Path = PARAMS_OPTION,
) -> None:
    """Train the teacher (params: seed, device, train, teacher)."""
    try:
        all_params = load_params(params)
        role = section(all_params, "teacher", params)
        backbone, model_kwargs = model_spec(role, "teacher")
        options = training_options(all_params, role, "teacher", params)
        device = resolve_device(section(all_params, "device", params))
        splits = load_splits(data)
    except (ParamsError, ValueError, FileNotFoundError) as err:
        fail(err)
    model, kwargs = build_model(backbone, model_kwargs, splits, seed=options["seed"])
    log(f"teacher {backbone} {model_kwargs} on {splits.name} ({device}): {splits.n_users} users, {splits.n_items} items")
    result = fit(model, splits, device=device, history_path=history, **options)
    save_checkpoint(
        out,
        backbone=backbone,
        kwargs=kwargs,
        state=result.best_state,
        meta={
            "role": "teacher",
            "split_fingerprint": splits.fingerprint,
            "seed": options["seed"],
            "best_epoch": result.best_epoch,
            "epochs_run": result.epochs_run,
            "best_valid": result.best_valid,
        },
    )
    log(f"teacher: best validation NDCG@20 {result.best_valid.get('ndcg@20', float('nan')):.4f} at epoch {result.best_epoch}")
