"""Stage 4 (one per method): train the student with a distillation method through the one loop."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
import typer

from rcekd.backbones import BACKBONES
from rcekd.backbones.base import PairwiseBPR
from rcekd.cache import TeacherCache, fits_on_device
from rcekd.checkpoint import save_checkpoint
from rcekd.data import load_splits
from rcekd.diagnostics import RankingDiagnostics
from rcekd.io import file_sha256
from rcekd.kd import METHODS, KDContext
from rcekd.sparse import UserItems
from rcekd.train import FitResult, fit, resolve_device
from rcekd.trajectory import read_trajectory
from stages.common import (
    SEED_OPTION_HELP, build_model, diverged, log, model_spec, peak_memory, resume_options, training_options,
    write_timing,
)
from stages.params import PARAMS_OPTION, ParamsError, fail, kwargs_for, load_params, section

LOOP_KEYS = ("weight", "reduction")  # kd.<method> keys read by the loop, not by the method
# kd.<method> keys for this method's student runs alone (tuned per method, as the authors' configs do):
# its Adam learning rate and its L2 weight decay, instead of train.lr and backbones.<S>.student.weight_decay
STUDENT_KEYS = {"lr": "lr", "student_weight_decay": "weight_decay"}


def main(
    method: str = typer.Option(..., help=f"A section of `kd` in params.yaml: a method ({', '.join(METHODS)}) or a variant naming one with `method:`."),
    student: str = typer.Option(..., help="Student backbone: a key of `backbones` in params.yaml (mf, lightgcn, hstu)."),
    data: Path = typer.Option(..., help="Processed dataset directory (from preprocess)."),
    cache: Path = typer.Option(..., help="Teacher cache directory (from cache_teacher)."),
    teacher: Path = typer.Option(None, help="Teacher checkpoint: when given, the cache must have been made from it."),
    trajectory: Path = typer.Option(None, help="The teacher's trajectory Parquet (from train --trajectory), for methods that read it (hetcomp)."),
    out: Path = typer.Option(..., help="Output student checkpoint of the best validation epoch."),
    history: Path = typer.Option(..., help="Output per-epoch history CSV (DVC plots)."),
    timing: Path = typer.Option(None, help="Output CSV of seconds per epoch (DVC plots)."),
    diagnostics: Path = typer.Option(None, help="Output directory of ranking diagnostics on a user sample: train NDCG@10, s_u, ranks of the teacher's top items (params: diagnostics)."),
    seed: int = typer.Option(None, help=SEED_OPTION_HELP),
    params: Path = PARAMS_OPTION,
) -> None:
    """Train a student with a distillation method (params: seed, device, train, backbones.<student>.student, kd.<method>, diagnostics)."""
    try:
        all_params = load_params(params)
        spec = model_spec(all_params, student, "student", params)
        options = training_options(all_params, spec, params, seed=seed)
        registered, kd_params, loop, student_options = method_settings(all_params, method, params)
        options |= student_options
        kd_class = METHODS[registered]
        device = resolve_device(section(all_params, "device", params))
        splits = load_splits(data)
        for key in ("k", "l"):
            if kd_params.get(key, 0) > splits.n_items:
                raise ParamsError(f"{params}: kd.{method}.{key} = {kd_params[key]} exceeds the {splits.n_items} items")
        expected = file_sha256(teacher) if teacher is not None else None
        resident = fits_on_device(splits.n_users, splits.n_items, device)  # on a GPU, scores stay on it when they fit
        scores = TeacherCache(cache, splits=splits, device=device, chunk=options["eval_chunk"], teacher_sha256=expected, resident=resident)
        train_items = UserItems(splits.train, splits.n_users, splits.n_items, device)
        lists = read_trajectory(trajectory, splits.n_users).to(device) if trajectory is not None else None
        weight, reduction = float(loop.get("weight", 0.0)), loop.get("reduction", "users")

        def build_student(overrides: dict) -> torch.nn.Module:
            sized = kwargs_for(BACKBONES[student].__init__, {**spec.model, **overrides}, f"kd.{method}.assistant", skip=("n_users", "n_items"))
            return build_model(dataclasses.replace(spec, model=sized), splits, seed=options["seed"])[0]

        def fit_student(model: torch.nn.Module, method_: object, label: str) -> FitResult:
            log(f"distill {method}: training the {label} ({type(model).__name__}) through the one loop")
            return fit(model, splits, kd=method_, kd_weight=weight, kd_reduction=reduction, device=device, **options)

        context = KDContext(
            scores, train_items, splits.n_users, splits.n_items, device, options["eval_chunk"], lists, build_student, fit_student,
            student_dim=spec.model.get("dim"), seed=options["seed"],
        )
        recorder, settings = None, None
        if diagnostics is not None:
            settings = kwargs_for(RankingDiagnostics.__init__, section(all_params, "diagnostics", params), "diagnostics", skip=("seed", "device"))
            recorder = RankingDiagnostics(scores, train_items, seed=options["seed"], device=device, **settings)
        kd = kd_class(context, **kd_params)
        if getattr(kd, "wants", ()) and not issubclass(BACKBONES[student], PairwiseBPR):
            raise ParamsError(f"{params}: kd.{method} ({registered}) reads the batch's training pairs: the student "
                              f"must be a pairwise backbone (mf, lightgcn), not {student}")
        teacher_sha256 = scores.meta["teacher_sha256"]
        resume = resume_options(out, {
            "stage": "distill", "method": method, "kd": section(all_params, f"kd.{method}", params), "spec": vars(spec), **options,
            "split": splits.fingerprint, "teacher": teacher_sha256, "device": str(device), "diagnostics": settings,
        })
    except (ParamsError, ValueError, FileNotFoundError) as err:
        fail(err)
    model, kwargs = build_model(spec, splits, seed=options["seed"])
    log(f"distill {method}: student {student} {spec.model} on {splits.name} ({device}, {torch.get_num_threads()} threads) {kd_params} {loop}")
    try:
        result = fit(
            model, splits, kd=kd, kd_weight=weight, kd_reduction=reduction, device=device, history_path=history,
            on_epoch=recorder, **resume, **options,
        )
    except FloatingPointError as err:
        diverged(f"distill {method} (student {student})", err)
    write_timing(timing, result.history)
    if recorder is not None:
        recorder.write(diagnostics, result.best_epoch)
    save_checkpoint(
        out,
        backbone=student,
        kwargs=kwargs,
        state=result.best_state,
        meta={
            "role": "student",
            "method": method,
            "split_fingerprint": splits.fingerprint,
            "teacher_sha256": teacher_sha256,
            "seed": options["seed"],
            "best_epoch": result.best_epoch,
            "epochs_run": result.epochs_run,
            "best_valid": result.best_valid,
            **peak_memory(device),
        },
    )
    Path(resume["resume_path"]).unlink(missing_ok=True)
    log(f"distill {method}: best validation NDCG@20 {result.best_valid.get('ndcg@20', float('nan')):.4f} at epoch {result.best_epoch}")


def method_settings(all_params: dict, method: str, params: Path) -> tuple[str, dict, dict, dict]:
    """kd.<method> checked and split: (the registered method, its constructor's arguments, the loop's keys,
    the student's training options), or a ParamsError naming the bad key."""
    kd_params = dict(section(all_params, f"kd.{method}", params) or {})
    loop = {key: kd_params.pop(key) for key in LOOP_KEYS if key in kd_params}
    options = {}
    for key, option in STUDENT_KEYS.items():
        if key in kd_params:
            value = kd_params.pop(key)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0 or (key == "lr" and value == 0):
                raise ParamsError(f"{params}: kd.{method}.{key} = {value!r}; expected a number {'> 0' if key == 'lr' else '>= 0'}")
            options[option] = float(value)
    registered = kd_params.pop("method", method)
    if registered not in METHODS:
        raise ParamsError(f"{params}: kd.{method} names no method: add `method: <one of {', '.join(METHODS)}>` to the section")
    kwargs_for(METHODS[registered].__init__, kd_params, f"kd.{method}")
    if not isinstance(loop.get("weight"), (int, float)) or loop["weight"] < 0:
        raise ParamsError(f"{params}: kd.{method}.weight = {loop.get('weight')!r}; expected a number >= 0")
    if loop.get("reduction", "users") not in ("users", "rows"):
        raise ParamsError(f"{params}: kd.{method}.reduction = {loop['reduction']!r}; expected 'users' or 'rows'")
    for key in ("k", "l"):
        if key in kd_params and not 0 < kd_params[key]:
            raise ParamsError(f"{params}: kd.{method}.{key} = {kd_params[key]!r}; expected > 0")
    return registered, kd_params, loop, options
