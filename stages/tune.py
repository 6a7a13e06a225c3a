"""`rcekd tune`: a validation-only search for one method (or the student alone), as DVC experiments.

The space is `tuning.spaces.<method>` in params.yaml: parameter → candidate values. Every combination
is a trial; when there are more than `tuning.trials`, that many are drawn (seeded by `tuning.seed`),
so every method gets the same budget. Each trial is one queued experiment (`dvc exp run --queue -S ...`)
whose target is the run's training stage (`train_student@S-seed` or `distill@T-S-method-seed`): no
evaluate stage runs, so test metrics are never computed while tuning. The queue runs them
(`rcekd run-queue`); the trials' parameters, best validation NDCG@20 (the selection metric, `train.select`,
or the space's one value of it: MKD's protocol selects on Recall@20), best epoch and epochs, read from
each experiment's history, go to a CSV (default artifacts/tuning/<dataset>/<T>_to_<S>/<method>.csv),
best first, as each trial finishes; a rerun skips the trials the CSV already holds, so an interrupted
search (a killed process, a lost machine) loses only its unfinished trials. The best trial's values are
printed as the `-S` flags that select them.

`--direct` runs the same trials without DVC, on a machine that has no DVC (a lent GPU machine): each
trial is the stage's own command (`rcekd train` or `rcekd distill`) on the workspace's processed data
and teacher files, with a params file that is params.yaml plus the trial's values, its outputs in a
scratch folder; `--jobs` trials run at once. Its rows name the device in `experiment` (`direct:<device>`).
"""

from __future__ import annotations

import csv
import itertools
import json
import random
import re
import subprocess
import sys
import time
from pathlib import Path

import typer
import yaml

from rcekd.io import atomic_path
from stages.common import log
from stages.direct import device_label
from stages.run_queue import drop_unfinished, experiment_revs, queue, run_all, run_landing, settle, stamp
from stages.params import PARAMS_OPTION, ParamsError, fail, load_params, read_yaml, section, with_settings

METRIC = "valid_ndcg@20"  # the default selection; a search's CSV names its own column, valid_<train.select>


def selection(params: dict, space: dict, where: str) -> str:
    """The history column a search ranks its trials by: valid_<train.select>, the space's one value of it
    or params.yaml's (trials selected on different metrics would not be comparable)."""
    chosen = space.get("train.select", [section(params, "train", where).get("select", "ndcg@20")])
    if len(set(chosen)) != 1:
        raise ParamsError(f"{where}: a search's train.select must be one value (its trials are ranked by it), not {chosen}")
    return f"valid_{chosen[0]}"


def metric_of(row: dict) -> str:
    """The selection column of a trials CSV's row (valid_ndcg@20 or valid_recall@20)."""
    column = next((key for key in row if key.startswith("valid_")), None)
    if column is None:
        raise ParamsError(f"a trials CSV row has no valid_<metric> column (its columns: {', '.join(row)})")
    return column


def trials(space: dict[str, list], budget: int, seed: int) -> list[dict]:
    """The combinations of `space` in grid order, or `budget` of them drawn with `seed` (kept in grid order)."""
    grid = [dict(zip(space, values)) for values in itertools.product(*space.values())]
    if len(grid) <= budget:
        return grid
    keep = sorted(random.Random(seed).sample(range(len(grid)), budget))
    return [grid[i] for i in keep]


def best_of(history: list[dict], metric: str = METRIC) -> tuple[float, int, int]:
    """(best value of `metric`, its epoch, epochs run) of a history: the first epoch reaching the best."""
    values = [float(row[metric]) for row in history]
    best = max(range(len(values)), key=lambda i: (values[i], -i))
    return values[best], int(history[best]["epoch"]), len(values)


def trial_row(name: str, values: dict, history: list[dict], metric: str, experiment: str) -> dict:
    """A trials CSV's row: the trial's values, its history's best `metric`, best epoch and epochs run."""
    best, epoch, epochs = best_of(history, metric)
    return {"trial": name, **values, metric: best, "best_epoch": epoch, "epochs": epochs, "experiment": experiment}


def trial_key(values: dict, space: dict) -> tuple[str, ...]:
    """A trial's values as the CSV writes them (str), so that a row read back matches its trial."""
    return tuple(str(values[key]) for key in space)


def read_rows(path: Path) -> list[dict]:
    """The trials a CSV already holds (none if it does not exist)."""
    return list(csv.DictReader(path.open())) if path.exists() else []


def write_rows(path: Path, rows: list[dict]) -> None:
    """The trials, best first, written whole (never a half-written file)."""
    rows = sorted(rows, key=lambda row: -float(row[metric_of(row)]))
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def run_recording(jobs: int, method: str, queued: dict[str, dict], rows: list[dict], history: str, out: Path,
                  metric: str) -> list[dict]:
    """Run the queue; each trial's row goes into `out` as soon as its experiment exists, so an interrupted
    search keeps (and a rerun skips) every finished trial. Returns all rows."""
    left = len(queued)

    def land(name: str, rev: str) -> None:
        nonlocal left
        rows.append(trial_row(name, queued[name], history_at(rev, history), metric, rev[:10]))
        write_rows(out, rows)
        left -= 1
        log(f"tune {method}: {name} {metric} {rows[-1][metric]:.5f}; {left} to go (in {out})")

    if not run_landing(jobs, queued, land):
        raise SystemExit(f"error: the experiments of the search of {method} did not all finish (above); "
                         f"`dvc queue status` lists them; the finished ones are in {out}, and a rerun runs the others")
    return rows


def shown(rev: str, path: str) -> str:
    """A file of an experiment's commit."""
    return subprocess.run(["git", "show", f"{rev}:{path}"], capture_output=True, text=True, check=True).stdout


def history_at(rev: str, path: str) -> list[dict]:
    """The rows of a history.csv in an experiment's commit."""
    return list(csv.DictReader(shown(rev, path).splitlines()))


def adopt(space_name: str, space: dict, chosen: list[dict], rows: list[dict], history: str, metric: str) -> list[dict]:
    """Rows for this search's trials that an earlier run queued and that finished after it stopped (a session
    ended with trials in the queue, and the next session's workers ran them): an experiment named as the
    search names its trials, for a trial without a row, whose params.yaml holds that trial's values."""
    done = {trial_key(row, space) for row in rows}
    found = []
    for name, rev in sorted(experiment_revs().items()):
        index = re.fullmatch(rf"tune-{re.escape(space_name)}-\d{{4}}-\d{{6}}-(\d+)", name)
        if not index or int(index[1]) >= len(chosen) or trial_key(chosen[int(index[1])], space) in done:
            continue
        values = chosen[int(index[1])]
        ran = read_yaml(shown(rev, "params.yaml")) or {}
        try:
            if any(section(ran, key) != value for key, value in values.items()):
                continue
        except ParamsError:
            continue
        found.append(trial_row(name, values, history_at(rev, history), metric, rev[:10]))
        done.add(trial_key(values, space))
    return found


def direct_command(method: str, teacher: str, student: str, seed: int, dataset: str, run: Path) -> list[str]:
    """The training stage's command of dvc.yaml (train_student or distill) with its outputs in `run`."""
    data, teacher_dir = f"data/processed/{dataset}", f"artifacts/{dataset}/teacher_{teacher}"
    outputs = ["--out", str(run / "checkpoint.pt"), "--history", str(run / "history.csv"),
               "--timing", str(run / "timing.csv"), "--params", str(run / "params.yaml")]
    if method == "student":
        return ["train", "--role", "student", "--backbone", student, "--seed", str(seed), "--data", data, *outputs]
    return ["distill", "--method", method, "--student", student, "--seed", str(seed), "--data", data,
            "--cache", f"{teacher_dir}/cache", "--teacher", f"{teacher_dir}/checkpoint.pt",
            "--trajectory", f"{teacher_dir}/trajectory.parquet", *outputs]


def run_direct(jobs: int, method: str, queued: dict[str, dict], commands: dict[str, list[str]], rows: list[dict],
               out: Path, scratch: Path, label: str, metric: str) -> list[dict]:
    """Run each trial's command, `jobs` at once; its row goes into `out` as soon as it finishes. Returns all rows."""
    waiting, running, failed = list(queued), {}, []
    while waiting or running:
        while waiting and len(running) < jobs:
            name = waiting.pop(0)
            log_file = open(scratch / name / "log.txt", "w")
            running[name] = (subprocess.Popen([sys.executable, "-m", "stages.cli", *commands[name]],
                                              stdout=log_file, stderr=subprocess.STDOUT), log_file)
        time.sleep(1)
        for name, (process, log_file) in list(running.items()):
            if process.poll() is None:
                continue
            log_file.close()
            del running[name]
            if process.returncode != 0:
                failed.append(name)
                tail = (scratch / name / "log.txt").read_text().strip().splitlines()[-5:]
                log(f"tune {method}: {name} failed (exit {process.returncode}):\n  " + "\n  ".join(tail))
                continue
            history = list(csv.DictReader((scratch / name / "history.csv").open()))
            rows.append(trial_row(name, queued[name], history, metric, label))
            write_rows(out, rows)
            log(f"tune {method}: {name} {metric} {rows[-1][metric]:.5f}; {len(waiting) + len(running)} to go (in {out})")
    if failed:
        raise SystemExit(f"error: trials {', '.join(failed)} of the search of {method} failed (their logs: {scratch}); "
                         f"the finished ones are in {out}, and a rerun runs the others")
    return rows


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
    direct: bool = typer.Option(False, "--direct", help="Run the trials as the stage's own command, without DVC "
                                "(a machine without DVC, such as a lent GPU); needs the processed data and teacher files in place."),
    scratch: Path = typer.Option(Path(".tune"), help="With --direct: the folder of each trial's params, outputs and log."),
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
        metric = selection(all_params, space, f"{params}: tuning.spaces.{space_name}")
    except ParamsError as err:
        fail(err)
    target, run_dir = run_name(method, teacher, student, seed)
    chosen = trials(space, budget, seed)
    out = out or Path(f"artifacts/tuning/{dataset}/{teacher}_to_{student}/{space_name}.csv")
    rows = [row for row in read_rows(out) if trial_key(row, space) in {trial_key(values, space) for values in chosen}]
    other = [row["trial"] for row in rows if metric not in row]
    if other:  # trials ranked on another metric would not compare with these
        fail(ParamsError(f"{out}: trials {', '.join(other)} were selected on {metric_of(rows[0])}, this search on {metric}; "
                         f"move the file away or pass another --out"))
    adopted = [] if direct else adopt(space_name, space, chosen, rows, f"artifacts/{dataset}/{run_dir}/history.csv", metric)
    if adopted:
        rows += adopted
        write_rows(out, rows)
        log(f"tune {method}: {', '.join(row['trial'] for row in adopted)} (queued by an earlier run, finished since) into {out}")
    done = {trial_key(row, space) for row in rows}
    todo = [values for values in chosen if trial_key(values, space) not in done]
    log(f"tune {method}: {len(chosen)} trials of {len(list(itertools.product(*space.values())))} ({target}, validation only)"
        + (f"; {len(chosen) - len(todo)} already in {out}" if done else ""))
    # keys the processed data (preprocess's params) or, for a distillation, the teacher and its cache read
    upstream = [key for key in space if key.split(".")[0] in {"dataset", "datasets", "split"}
                or method != "student" and (key.split(".")[0] in {"seed", "device", "train", "trajectory", "cache"}
                                            or key.startswith(f"backbones.{teacher}.teacher."))]
    if todo and direct and upstream:  # --direct reuses the workspace's processed data and teacher as they are
        fail(ParamsError(f"tuning.spaces.{space_name} sets {', '.join(upstream)}, which the processed data or the teacher "
                         f"depend on; --direct reuses the workspace's, so run this search without --direct"))
    if todo and direct:
        names = [f"direct-{space_name}-{chosen.index(values)}" for values in todo]
        needed = [Path(f"data/processed/{dataset}")]
        if method != "student":
            needed += [Path(f"artifacts/{dataset}/teacher_{teacher}") / name for name in ("cache", "checkpoint.pt", "trajectory.parquet")]
        missing = [str(path) for path in needed if not path.exists()]
        if missing:
            fail(ParamsError(f"--direct needs {', '.join(missing)} (dvc repro cache_teacher@{teacher} makes them)"))
        commands = {}
        for name, values in zip(names, todo):
            run = scratch / space_name / name
            run.mkdir(parents=True, exist_ok=True)
            (run / "params.yaml").write_text(yaml.safe_dump(with_settings(all_params, values), sort_keys=False))
            commands[name] = direct_command(method, teacher, student, seed, dataset, run)
        rows = run_direct(jobs, method, dict(zip(names, todo)), commands, rows, out, scratch / space_name, device_label(all_params), metric)
    elif todo:
        names, when = [], stamp()  # experiment names are unique per search
        grid = {"grid.teachers": [teacher], "grid.students": [student], "grid.seeds": [seed]}
        grid |= {} if method == "student" else {"grid.methods": [method]}
        settle()
        drop_unfinished(f"tune-{space_name}")  # an earlier run's, left by its end
        if method != "student":  # the teacher and its cache once (another protocol's teacher: trained here), so
            # that the trials, run at once, each restore them from the run cache instead of each training them
            queue(f"tune-{space_name}-{when}-upstream", grid | todo[0], f"cache_teacher@{teacher}")
            run_all(1, f"the search of {method} (its teacher)")
            settle()  # its worker lingers and could take a trial queued now, and lose it
        for values in todo:
            names.append(f"tune-{space_name}-{when}-{chosen.index(values)}")
            queue(names[-1], grid | values, target)
        rows = run_recording(jobs, method, dict(zip(names, todo)), rows, f"artifacts/{dataset}/{run_dir}/history.csv", out, metric)
    rows.sort(key=lambda row: -float(row[metric]))
    best = next(values for values in chosen if trial_key(values, space) == trial_key(rows[0], space))
    select = " ".join(f"-S '++{key}={json.dumps(value)}'" for key, value in best.items())
    log(f"tune {method}: best {metric} {float(rows[0][metric]):.5f} at epoch {rows[0]['best_epoch']} ({rows[0]['trial']}); trials in {out}")
    log(f"tune {method}: select it with {select}")
