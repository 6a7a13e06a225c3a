"""Stage 5: full-ranking valid and test metrics of one checkpoint, as a small DVC metrics JSON."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import typer

from rcekd.checkpoint import load_checkpoint
from rcekd.data import load_splits
from rcekd.evaluate import full_ranking
from rcekd.io import write_json
from rcekd.sparse import UserItems
from rcekd.train import resolve_device
from stages.common import log
from stages.params import PARAMS_OPTION, ParamsError, fail, load_params, section


def main(
    data: Path = typer.Option(..., help="Processed dataset directory (from preprocess)."),
    checkpoint: Path = typer.Option(..., help="Checkpoint to evaluate (teacher or student)."),
    out: Path = typer.Option(..., help="Output metrics JSON: {valid: {...}, test: {...}, ...}."),
    history: Path = typer.Option(None, help="The run's history CSV, to report its mean seconds per epoch."),
    params: Path = PARAMS_OPTION,
) -> None:
    """Precision/Recall/NDCG at evaluate.ks (10, 20) on valid and test at the checkpoint's best validation epoch (params: evaluate)."""
    try:
        all_params = load_params(params)
        exclude_valid = section(all_params, "evaluate.exclude_valid_in_test", params)  # a bool: checked by load_params
        valid_input = section(all_params, "evaluate", params).get("valid_in_test_input", False)  # likewise; optional
        ks = tuple(section(all_params, "evaluate", params).get("ks", (10, 20)))  # checked by load_params
        device = resolve_device(section(all_params, "device", params))
        splits = load_splits(data)
        model, meta = load_checkpoint(checkpoint, splits=splits, device=device)
    except (ParamsError, ValueError, FileNotFoundError) as err:
        fail(err)
    known = {name: UserItems(splits.pairs(name), splits.n_users, splits.n_items, device) for name in ("train", "valid", "test")}
    valid = full_ranking(model, known["valid"], exclude=[known["train"]], ks=ks, device=device)
    test_exclude = [known["train"], known["valid"]] if exclude_valid else [known["train"]]
    if valid_input:  # the validation interactions join the model's input at test: a sequence's window, LightGCN's graph
        model.bind(np.concatenate([splits.train, splits.valid]))  # each user's rows stay in time order (train, then valid)
    test = full_ranking(model, known["test"], exclude=test_exclude, ks=ks, device=device)
    result = {"test": test, "valid": valid, "best_epoch": meta["best_epoch"], "epochs_run": meta["epochs_run"]}
    result.update({key: meta[key] for key in ("peak_rss_mb", "peak_gpu_mb") if key in meta})  # the training run's
    if history is not None and history.exists():
        with open(history) as handle:
            seconds = [float(row["epoch_seconds"]) for row in csv.DictReader(handle)]
        result["seconds_per_epoch"] = sum(seconds) / len(seconds)
    write_json(out, result)
    log(f"evaluate {checkpoint}: test recall@20 {test['recall@20']:.4f} ndcg@20 {test['ndcg@20']:.4f} (best epoch {meta['best_epoch']})")
