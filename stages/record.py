"""`rcekd record --name N`: a protocol of record (params `records.N`), run as DVC experiments, each cell's
files landing in results/N as soon as it finishes.

A record is the default pipeline with a few params set (more methods, five seeds): hours of training,
more than one machine session, whose DVC cache does not outlive it. So every cell is one queued
experiment, and what a cell made is copied into the folder as soon as its experiment exists: its small
files (metrics JSON, history, timing, diagnostics CSVs) and its dvc.lock (locks/<cell>.lock, true for
that experiment's outputs). Run again, the command runs only the cells record.json does not list yet.

1. The teachers and their caches first, as one experiment (restored from the run cache when they ran
   before); their files and lock are copied in, and the sha256 of each teacher's weights is kept in
   record.json. A later run whose teacher has other weights (another CPU type trains other last bits;
   other code) stops before any cell: a record's cells share one teacher.
2. One experiment per cell (seed, method): each seed's first method (which also trains that seed's
   student alone), then the other methods, whose experiments restore the student from the run cache.
3. Once every cell is in, the report is made from the folder's own files by the report stage's code
   (`rcekd report` on the folder), and its figures are drawn as PNG (figures/).

`--direct` runs the same stages without DVC (a machine that has none, such as a lent GPU): dvc.yaml's
commands, rendered with the record's params, in a scratch workspace (stages/direct.py), the teachers
first, then `--jobs` cells at once; each cell lands the same way, without a lock, its record.json entry
naming the device (`direct:<device>`). Once every cell is in, the report is made by a run where DVC is
(its figures are drawn by `dvc plots`).

Every file is written whole or not at all, and a cell counts as in only once record.json lists it.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
import shutil
import statistics
import subprocess
import tempfile
from pathlib import Path
from typing import Protocol

import typer

from rcekd.io import atomic_path, read_json, write_json
from stages.common import log
from stages.direct import Workspace, device_label
from stages.params import PARAMS_OPTION, ParamsError, fail, load_params, section, with_settings
from stages.run_queue import drop_unfinished, experiment_revs, queue, run_all, run_landing, settle, stamp

KEPT = (".csv", ".json", ".md")  # the record's files: metrics, histories, timings, diagnostics
SKIPPED = ("cache", "reports")  # left out: the teacher's score cache; a cell's own one-cell report


def weights_sha256(payload: bytes) -> str:
    """sha256 of a checkpoint's weights (every tensor of its state, by name): the same teacher trained
    again gives the same value, though the file's bytes differ (its metadata holds peak memory)."""
    import torch

    state = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)["state"]
    digest = hashlib.sha256()
    for name in sorted(state):
        digest.update(name.encode())
        digest.update(state[name].contiguous().numpy().tobytes())
    return digest.hexdigest()


def read(params: dict) -> dict:
    """What a record's stages read of `params`: the protocol's sections, the dataset's, its backbones'
    sizes and its methods' sections (not `records`, `tuning`, nor other methods and backbones)."""
    grid = params["grid"]
    shared = {key: params.get(key) for key in ("seed", "device", "dataset", "split", "train", "trajectory", "cache",
                                                 "evaluate", "diagnostics", "grid", "report")}
    return shared | {"datasets": params["datasets"].get(params["dataset"]),
                     "teachers": {t: params["backbones"].get(t, {}).get("teacher") for t in grid["teachers"]},
                     "students": {s: params["backbones"].get(s, {}).get("student") for s in grid["students"]},
                     "kd": {m: params["kd"].get(m) for m in grid["methods"]}}


def training_seconds(timing: Path) -> float:
    """A run's training time from its timing.csv: its median epoch times its epochs (an epoch stretched by a
    pause, as when the machine is shared, does not count)."""
    with timing.open(newline="") as handle:
        epochs = [float(row["epoch_seconds"]) for row in csv.DictReader(handle)]
    return statistics.median(epochs) * len(epochs) if epochs else 0.0


def differences(old: object, new: object, where: str = "") -> list[str]:
    """The dotted keys whose values differ between two parameter trees."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [found for key in sorted(set(old) | set(new), key=str)
                for found in differences(old.get(key), new.get(key), f"{where}.{key}" if where else str(key))]
    return [] if old == new else [where]


class Source(Protocol):
    """Where a run's files are read from: an experiment (DVC's DVCFileSystem at its commit) or a Folder."""

    def find(self, path: str) -> list[str]: ...
    def exists(self, path: str) -> bool: ...
    def get_file(self, source: str, target: str) -> None: ...
    def read_bytes(self, path: str) -> bytes: ...


class Folder:
    """A direct run's workspace as a Source."""

    def __init__(self, root: Path):
        self.root = root

    def find(self, path: str) -> list[str]:
        return sorted(found.relative_to(self.root).as_posix() for found in (self.root / path).rglob("*") if found.is_file())

    def exists(self, path: str) -> bool:
        return (self.root / path).exists()

    def get_file(self, source: str, target: str) -> None:
        shutil.copyfile(self.root / source, target)

    def read_bytes(self, path: str) -> bytes:
        return (self.root / path).read_bytes()


class Record:
    """The folder of a record and its record.json; every change is written at once."""

    def __init__(self, folder: Path, name: str, settings: dict, params: dict):
        self.folder = folder
        self.path = folder / "record.json"
        self.cells: list[str] | None = None  # the cells this run makes (start)
        self.meta = read_json(self.path) if self.path.exists() else {}
        if self.meta and self.meta.get("set") != settings:
            raise ParamsError(f"{self.path}: a record of other settings ({self.meta.get('set')}); records.{name}.set is now "
                              f"{settings}: move the folder away (or restore the settings) to start over")
        kept = folder / "params.yaml"  # the parameters its first cells ran with
        if self.meta and kept.exists():
            changed = differences(read(load_params(kept)), read(params))
            if changed:
                raise ParamsError(f"{self.path}: params.yaml changed since the record's first cells ran ({', '.join(changed[:5])}"
                                  f"{', ...' if len(changed) > 5 else ''}); a record's cells share one set of parameters: "
                                  f"restore them, or move {folder} away to start over")
        self.meta = {"name": name, "command": f"rcekd record --name {name}", "set": settings, "teachers": {}, "cells": {},
                     "complete": False, **self.meta}

    def save(self) -> None:
        write_json(self.path, self.meta)

    def land(self, cell: str, fs: Source, entry: dict, overwrite: tuple[str, ...], keep: tuple[str, ...]) -> None:
        """A finished cell's files into the folder, then the cell into record.json (`entry`: its DVC experiment
        and commit, or `direct:<device>`)."""
        files = self.copy(fs, cell, overwrite=overwrite, keep=keep)
        self.meta["cells"][cell] = entry
        self.save()
        log(f"record {self.meta['name']}: cell {cell} in ({files} files from {entry['experiment']}); "
            f"{len(self.meta['cells'])}{self.progress()} cells in {self.folder}")

    def start(self, cells: list[str], jobs: int) -> None:
        """This run makes the record's `cells` ('s<seed>-<method>'), some of them already in, `jobs` at once."""
        self.cells, self.jobs = cells, jobs

    def progress(self) -> str:
        """' of N' and the training left: each cell not yet in at the mean training time of its method's cells
        in the folder (their timing.csv), shared by the workers; methods with no cell in yet are named apart."""
        if self.cells is None:
            return ""
        runs: dict[tuple[str, str], float] = {}  # (method, seed) → seconds, over the record's teacher/student pairs
        for timing in self.folder.glob("artifacts/*/*_to_*/*/seed_*/timing.csv"):
            key = (timing.parent.parent.name, timing.parent.name)
            runs[key] = runs.get(key, 0.0) + training_seconds(timing)
        pace: dict[str, list[float]] = {}
        for (method, _), seconds in runs.items():
            pace.setdefault(method, []).append(seconds)
        left = [cell.split("-", 1)[1] for cell in self.cells if cell not in self.meta["cells"]]
        if not left:
            return f" of {len(self.cells)}"
        timed = [method for method in left if method in pace]
        hours = sum(statistics.fmean(pace[method]) for method in timed) / self.jobs / 3600
        untimed = sorted(set(left) - set(timed))
        return (f" of {len(self.cells)} (about {hours:.1f} h of training left for the {len(timed)} "
                f"cells of timed methods, at {self.jobs} at once" + (f"; not yet timed: {', '.join(untimed)})" if untimed else ")"))

    def copy(self, fs: Source, cell: str, *, keep: tuple[str, ...] = (), overwrite: tuple[str, ...] = ()) -> int:
        """Copy a run's dvc.lock, when it has one (to locks/<cell>.lock; the teachers' only the first time), and
        its small artifacts: those under a path of `overwrite` always, those under a path of `keep` only when
        the folder lacks them; also params.yaml and dvc.yaml, once. Returns the files copied."""
        lock = self.folder / "locks" / f"{cell}.lock"
        wanted = {} if (cell == "upstream" and lock.exists()) or not fs.exists("dvc.lock") else {"dvc.lock": lock}
        wanted |= {name: self.folder / name for name in ("params.yaml", "dvc.yaml") if not (self.folder / name).exists()}
        for path in fs.find("artifacts"):
            if not path.endswith(KEPT) or set(Path(path).parts) & set(SKIPPED):
                continue
            if path.startswith(overwrite) or (path.startswith(keep) and not (self.folder / path).exists()):
                wanted[path] = self.folder / path
        for source, target in wanted.items():
            with atomic_path(target) as tmp:
                fs.get_file(source, str(tmp))
        return len(wanted)


def draw(folder: Path) -> int:
    """The record's figures as PNG files in `folder`/figures: dvc.yaml's plots, filled by `dvc plots show`
    from the record's own CSVs (in a scratch DVC project holding a copy), drawn by vl-convert."""
    import vl_convert

    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch) / "record"
        top = lambda where, names: {"figures", "locks"} & set(names) if Path(where) == folder else set()  # noqa: E731
        shutil.copytree(folder, work, ignore=top)
        subprocess.run(["dvc", "init", "--no-scm", "-q"], cwd=work, check=True)
        shutil.copytree(Path(".dvc/plots"), work / ".dvc/plots")
        shown = subprocess.run(["dvc", "plots", "show", "--json"], cwd=work, capture_output=True, text=True)
    if shown.returncode != 0:
        raise SystemExit(f"error: `dvc plots show --json` on the record failed:\n{shown.stderr.strip()}")
    drawn = 0
    with atomic_path(folder / "figures") as tmp:
        tmp.mkdir()
        for title, plots in json.loads(shown.stdout)["data"].items():
            if title.endswith(".csv"):  # a stage's own history or timing plot, one per run: the report's figures cover them
                continue
            for plot in plots:
                name = re.sub(r"[^a-z0-9]+", "_", title.lower()).strip("_")
                (tmp / f"{name}.png").write_bytes(vl_convert.vegalite_to_png(plot["content"]))
                drawn += 1
    return drawn


def experiment(rev: str) -> Source:
    from dvc.fs import DVCFileSystem

    return DVCFileSystem(url=".", rev=rev)


def run_cells(record: Record, jobs: int, cells: dict[str, tuple[str, tuple[str, ...], tuple[str, ...]]], what: str) -> None:
    """Run the queued `cells` (experiment name → (cell, paths to overwrite, paths to keep)) on the queue;
    each cell's files go into the record as soon as its experiment exists."""
    def land(name: str, rev: str) -> None:
        cell, overwrite, keep = cells[name]
        record.land(cell, experiment(rev), {"experiment": name, "commit": rev}, overwrite, keep)

    if not run_landing(jobs, cells, land, every=30.0):
        raise SystemExit(f"error: the experiments of {what} did not all finish (above); `dvc queue status` lists them; "
                         f"the finished cells are in {record.folder}, and running the command again runs the others")


def main(
    name: str = typer.Option(..., help="A record of `records` in params.yaml (e.g. citeulike_mf)."),
    jobs: int = typer.Option(2, "--jobs", "-j", min=1, help="Cells at once (queue workers, or direct runs)."),
    out: Path = typer.Option(None, help="The record's folder (default results/<name>)."),
    direct: bool = typer.Option(False, "--direct", help="Run dvc.yaml's stages as their own commands, without DVC "
                                "(a machine without DVC, such as a lent GPU), in --scratch; the report is made where DVC is."),
    scratch: Path = typer.Option(Path(".record"), help="With --direct: the folder of each record's workspace (<scratch>/<name>)."),
    params: Path = PARAMS_OPTION,
) -> None:
    """Run a protocol of record (params: records.<name>.set, over params.yaml), cell by cell into its folder.

    Each cell's files land in the folder as soon as its experiment finishes; run again, only the cells
    its record.json lacks run. Once every cell is in, the report and its figures are made from the folder."""
    try:
        all_params = load_params(params)
        settings = section(all_params, f"records.{name}.set", params)
        if not isinstance(settings, dict) or not settings:
            raise ParamsError(f"{params}: records.{name}.set = {settings!r}; expected parameter: value pairs (as dvc exp run -S)")
        lists = {key: settings.get(f"grid.{key}", section(all_params, f"grid.{key}", params))
                 for key in ("teachers", "students", "methods", "seeds")}
        dataset = settings.get("dataset", section(all_params, "dataset", params))
        out = out or Path("results") / name
        record = Record(out, name, settings, with_settings(all_params, settings))
        workspace = Workspace(scratch / name, with_settings(all_params, settings)) if direct else None
    except (ParamsError, ValueError, KeyError) as err:
        fail(err)
    prefix = f"record-{name}-{stamp()}"
    cells = [(seed, method) for seed in lists["seeds"] for method in lists["methods"]]
    todo = [cell for cell in cells if f"s{cell[0]}-{cell[1]}" not in record.meta["cells"]]
    record.start([f"s{seed}-{method}" for seed, method in cells], jobs)
    log(f"record {name}: {len(cells)} cells ({len(lists['seeds'])} seeds x {len(lists['methods'])} methods), "
        f"{len(cells) - len(todo)} already in {out}; {jobs} {'direct runs' if direct else 'workers'} ({settings})")

    if todo:  # the teachers once: restored from the run cache when the default pipeline trained them in this session
        if workspace:
            label = device_label(with_settings(all_params, settings))
            upstream = ["preprocess"] + [f"{stage}@{t}" for t in lists["teachers"]
                                         for stage in ("train_teacher", "cache_teacher", "evaluate_teacher")]
            if workspace.run({"upstream": upstream}, 1, lambda _: None):
                raise SystemExit(f"error: the teachers of the record {name} did not finish (above); running the command again resumes them")
            fs: Source = Folder(workspace.folder)
        else:
            settle()
            drop_unfinished(f"record-{name}")  # an earlier run's, left by its end
            label = f"{prefix}-upstream"
            queue(label, settings, "cache_teacher", "evaluate_teacher")
            run_all(1, f"the record {name} (its teachers)")
            fs = experiment(experiment_revs()[label])
        found = {teacher: weights_sha256(fs.read_bytes(f"artifacts/{dataset}/teacher_{teacher}/checkpoint.pt"))
                 for teacher in lists["teachers"]}
        for teacher, digest in found.items():
            kept = record.meta["teachers"].get(teacher)
            if kept is not None and kept != digest:
                fail(ParamsError(f"{record.path}: this run's teacher {teacher} has weights sha256 {digest[:16]}..., "
                                 f"the record's cells were made with {kept[:16]}... (another CPU type, a GPU or other code "
                                 f"trains other weights); a record's cells share one teacher: run it where the teacher is the "
                                 f"same, or move {out} away to start over"))
        teacher_paths = tuple(f"artifacts/{sub}/teacher_{t}" for t in lists["teachers"] for sub in (dataset, f"metrics/{dataset}"))
        record.copy(fs, "upstream", keep=teacher_paths)
        record.meta["teachers"] = found
        record.meta.setdefault("upstream", label)
        record.save()

    def paths(seed: int, method: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """(the cell's own run paths, always copied; its student alone's, copied once)."""
        own = tuple(f"artifacts/{sub}/{t}_to_{s}/{method}/seed_{seed}" for t in lists["teachers"] for s in lists["students"]
                    for sub in (dataset, f"metrics/{dataset}"))
        alone = tuple(f"artifacts/{sub}/student_{s}/seed_{seed}" for s in lists["students"] for sub in (dataset, f"metrics/{dataset}"))
        return own, alone

    def chain(seed: int, method: str) -> list[str]:
        """A cell's stages in dvc.yaml's order (the student alone's are done once per seed)."""
        alone = [f"{stage}@{s}-{seed}" for s in lists["students"] for stage in ("train_student", "evaluate_student")]
        return alone + [f"{stage}@{t}-{s}-{method}-{seed}" for t in lists["teachers"] for s in lists["students"]
                        for stage in ("distill", "evaluate")]

    # a seed's first cell trains its student alone, which its other cells then restore from the run cache: that
    # cell runs in a first round, unless the record already holds the student alone of that seed (then at worst,
    # in a clone without the run cache, the cells of a seed each train that short run again, at once)
    held = lambda prefix: (out / prefix).exists() or (out / f"{prefix}.json").exists()  # noqa: E731 (a run's folder, its metrics)
    alone_in = {seed: all(held(prefix) for prefix in paths(seed, "")[1]) for seed in lists["seeds"]}
    first = {seed: None if alone_in[seed] else next((m for s, m in todo if s == seed), None) for seed in lists["seeds"]}
    for round_ in ([cell for cell in todo if first[cell[0]] == cell[1]], [cell for cell in todo if first[cell[0]] != cell[1]]):
        if not round_:
            continue
        if workspace:
            chains = {f"s{seed}-{method}": chain(seed, method) for seed, method in round_}
            owned = {f"s{seed}-{method}": paths(seed, method) for seed, method in round_}
            failed = workspace.run(chains, jobs, lambda cell: record.land(cell, Folder(workspace.folder), {"experiment": label}, *owned[cell]))
            if failed:
                raise SystemExit(f"error: the cells {', '.join(failed)} of the record {name} failed (above; logs in {workspace.folder}/logs); "
                                 f"the finished cells are in {out}, and running the command again runs the others")
            continue
        settle()
        queued = {}
        for seed, method in round_:
            experiment_name = f"{prefix}-s{seed}-{method}"
            queue(experiment_name, settings | {"grid.seeds": [seed], "grid.methods": [method]})
            queued[experiment_name] = (f"s{seed}-{method}", *paths(seed, method))
        run_cells(record, jobs, queued, f"the record {name}")

    if not record.meta["complete"]:
        if shutil.which("dvc") is None:
            log(f"record {name}: every cell is in {out}; this machine has no DVC: make the report and figures where it is "
                f"(rcekd record --name {name}, which runs nothing else)")
            return
        reports = out / "artifacts/reports" / dataset
        subprocess.run(["rcekd", "report", "--params", str(out / "params.yaml"), "--metrics", str(out / "artifacts/metrics" / dataset),
                        "--runs", str(out / "artifacts" / dataset), "--table", str(reports / "results.md"),
                        "--json", str(reports / "results.json"), "--figures", str(reports / "figures")], check=True)
        record.meta["figures"] = draw(out)
        record.meta["complete"] = True
        record.save()
    log(f"record {name}: complete in {out} ({len(record.meta['cells'])} cells); commit it with git add {out}")
