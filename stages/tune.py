"""`rcekd tune`: a validation-only search for one method (or the student alone), as DVC experiments.

The space is `tuning.spaces.<method>` in params.yaml: parameter → candidate values. Every combination
is a trial; when there are more than `tuning.trials`, that many are drawn (seeded by `tuning.seed`),
so every method gets the same budget. Each trial is one queued experiment (`dvc exp run --queue -S ...`)
whose target is the run's training stage (`train_student@S-seed` or `distill@T-S-method-seed`): no
evaluate stage runs, so test metrics are never computed while tuning. The queue runs them
(`rcekd run-queue`); the trials' parameters, best validation NDCG@20, best epoch and epochs, read from
each experiment's history, go to a CSV (default artifacts/tuning/<dataset>/<T>_to_<S>/<method>.csv),
best first, and the best trial's values are printed as the `-S` flags that select them.
"""

from __future__ import annotations

import csv
import itertools
import json
import random
import subprocess
import time
from pathlib import Path

import typer

from rcekd.io import atomic_path
from stages.common import log
from stages.run_queue import experiment_revs, queue, run_all, settle
from stages.params import PARAMS_OPTION, ParamsError, fail, load_params, section

METRIC = "valid_ndcg@20"


def trials(space: dict[str, list], budget: int, seed: int) -> list[dict]:
    """The combinations of `space` in grid order, or `budget` of them drawn with `seed` (kept in grid order)."""
    grid = [dict(zip(space, values)) for values in itertools.product(*space.values())]
    if len(grid) <= budget:
        return grid
    keep = sorted(random.Random(seed).sample(range(len(grid)), budget))
    return [grid[i] for i in keep]


def best_of(history: list[dict]) -> tuple[float, int, int]:
    """(best validation NDCG@20, its epoch, epochs run) of a history: the first epoch reaching the best."""
    values = [float(row[METRIC]) for row in history]
    best = max(range(len(values)), key=lambda i: (values[i], -i))
    return values[best], int(history[best]["epoch"]), len(values)


def run_name(method: str, teacher: str, student: str, seed: int) -> tuple[str, str]:
    """(target stage, run directory under artifacts/<dataset>) of a trial."""
    if method == "student":
        return f"train_student@{student}-{seed}", f"student_{student}/seed_{seed}"
    return f"distill@{teacher}-{student}-{method}-{seed}", f"{teacher}_to_{student}/{method}/seed_{seed}"


def main(
    method: str = typer.Option(..., help="A method of `kd` (e.g. rcekd), or `student` for the student alone."),
    teacher: str = typer.Option("mf", help="The teacher backbone."),
    student: str = typer.Option("mf", help="The student backbone."),
    space_name: str = typer.Option(None, "--space", help="The space of tuning.spaces to search (default: the method's own)."),
    jobs: int = typer.Option(2, "--jobs", "-j", min=1, help="Queue workers (rcekd run-queue)."),
    budget: int = typer.Option(None, "--trials", min=1, help="Trials to run (default tuning.trials; fewer where one costs much more)."),
    out: Path = typer.Option(None, help="The trials' CSV (default artifacts/tuning/<dataset>/<T>_to_<S>/<method>.csv)."),
    params: Path = PARAMS_OPTION,
) -> None:
    """Queue and run a method's trials (params: tuning), then write them to a CSV, best first."""
    try:
        all_params = load_params(params)
        space_name = space_name or method
        space = section(all_params, f"tuning.spaces.{space_name}", params)
        budget = budget or section(all_params, "tuning.trials", params)
        seed = section(all_params, "tuning.seed", params)
        dataset = section(all_params, "dataset", params)
        if not isinstance(space, dict) or not space or not all(isinstance(v, list) and v for v in space.values()):
            raise ParamsError(f"{params}: tuning.spaces.{space_name} = {space!r}; expected parameter: [values, ...] pairs")
        if method != "student" and method not in section(all_params, "kd", params):
            raise ParamsError(f"{params}: tuning.spaces.{space_name}: no section kd.{method} to tune")
    except ParamsError as err:
        fail(err)
    target, run_dir = run_name(method, teacher, student, seed)
    chosen = trials(space, budget, seed)
    out = out or Path(f"artifacts/tuning/{dataset}/{teacher}_to_{student}/{space_name}.csv")
    log(f"tune {method}: {len(chosen)} trials of {len(list(itertools.product(*space.values())))} ({target}, validation only)")
    names, stamp = [], time.strftime("%m%d-%H%M%S")  # experiment names are unique per search
    grid = {"grid.teachers": [teacher], "grid.students": [student], "grid.seeds": [seed]}
    grid |= {} if method == "student" else {"grid.methods": [method]}
    settle()
    for index, values in enumerate(chosen):
        names.append(f"tune-{space_name}-{stamp}-{index}")
        queue(names[-1], grid | values, target)
    run_all(jobs, f"the search of {method}")
    revs = experiment_revs()
    rows = []
    for name, values in zip(names, chosen):
        shown = subprocess.run(["git", "show", f"{revs[name]}:artifacts/{dataset}/{run_dir}/history.csv"],
                               capture_output=True, text=True, check=True).stdout
        best, epoch, epochs = best_of(list(csv.DictReader(shown.splitlines())))
        rows.append({"trial": name, **values, METRIC: best, "best_epoch": epoch, "epochs": epochs, "experiment": revs[name][:10]})
    rows.sort(key=lambda row: -row[METRIC])
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    select = " ".join(f"-S '++{key}={json.dumps(value)}'" for key, value in chosen[names.index(rows[0]["trial"])].items())
    log(f"tune {method}: best {METRIC} {rows[0][METRIC]:.5f} at epoch {rows[0]['best_epoch']} ({rows[0]['trial']}); trials in {out}")
    log(f"tune {method}: select it with {select}")
