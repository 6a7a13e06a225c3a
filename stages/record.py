"""`rcekd record --name N`: a protocol of record (params `records.N`), run as DVC experiments and
committed as plain files under results/N.

The default pipeline stays small; a record is the same pipeline with a few params set (more methods,
five seeds). Its cells run in parallel on DVC's queue, one experiment per seed and method (`rcekd
run-queue`); one more experiment with every seed and method then restores all of them from the run
cache and runs only the report. That experiment's commit holds a dvc.lock that is true for its outputs; the record folder is
a copy of it: its params.yaml, dvc.yaml and dvc.lock, and every metrics file, history, timing,
diagnostics CSV, report and figure table of its artifacts/ (not checkpoints or the teacher's cache),
the figures drawn as PNG (figures/), and record.json naming the experiment. The folder is written
whole or not at all.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import typer

from rcekd.io import atomic_path, write_json
from stages.common import log
from stages.params import PARAMS_OPTION, ParamsError, fail, load_params, section
from stages.run_queue import experiment_revs, queue, run_all, settle

KEPT = (".csv", ".json", ".md")  # the record's files: metrics, histories, timings, diagnostics, reports
SKIPPED = ("cache",)  # folders left out: the teacher's score cache (its meta.json describes a file not kept)


def export(rev: str, out: Path) -> int:
    """Copy the experiment `rev`'s pipeline files and small artifacts into the folder `out`; files copied."""
    from dvc.fs import DVCFileSystem

    fs = DVCFileSystem(url=".", rev=rev)
    paths = ["params.yaml", "dvc.yaml", "dvc.lock"]
    paths += [path for path in fs.find("artifacts") if path.endswith(KEPT) and not set(Path(path).parts) & set(SKIPPED)]
    for path in paths:
        (out / path).parent.mkdir(parents=True, exist_ok=True)
        fs.get_file(path, str(out / path))
    return len(paths)


def draw(folder: Path) -> int:
    """The record's figures as PNG files in `folder`/figures: dvc.yaml's plots, filled by `dvc plots show`
    from the record's own CSVs (in a scratch DVC project holding a copy), drawn by vl-convert."""
    import vl_convert

    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch) / "record"
        shutil.copytree(folder, work)
        subprocess.run(["dvc", "init", "--no-scm", "-q"], cwd=work, check=True)
        shutil.copytree(Path(".dvc/plots"), work / ".dvc/plots")
        shown = subprocess.run(["dvc", "plots", "show", "--json"], cwd=work, capture_output=True, text=True)
    if shown.returncode != 0:
        raise SystemExit(f"error: `dvc plots show --json` on the record failed:\n{shown.stderr.strip()}")
    (folder / "figures").mkdir(exist_ok=True)
    drawn = 0
    for title, plots in json.loads(shown.stdout)["data"].items():
        if title.endswith(".csv"):  # a stage's own history or timing plot, one per run: the report's figures cover them
            continue
        for plot in plots:
            name = re.sub(r"[^a-z0-9]+", "_", title.lower()).strip("_")
            (folder / "figures" / f"{name}.png").write_bytes(vl_convert.vegalite_to_png(plot["content"]))
            drawn += 1
    return drawn


def main(
    name: str = typer.Option(..., help="A record of `records` in params.yaml (e.g. citeulike_mf)."),
    jobs: int = typer.Option(2, "--jobs", "-j", min=1, help="Queue workers (rcekd run-queue): cells at once."),
    out: Path = typer.Option(None, help="The record's folder (default results/<name>)."),
    params: Path = PARAMS_OPTION,
) -> None:
    """Run a protocol of record (params: records.<name>.set, over params.yaml) and commit-ready copy it to a folder."""
    try:
        all_params = load_params(params)
        settings = section(all_params, f"records.{name}.set", params)
        if not isinstance(settings, dict) or not settings:
            raise ParamsError(f"{params}: records.{name}.set = {settings!r}; expected parameter: value pairs (as dvc exp run -S)")
        seeds = settings.get("grid.seeds", section(all_params, "grid.seeds", params))
        methods = settings.get("grid.methods", section(all_params, "grid.methods", params))
    except ParamsError as err:
        fail(err)
    out = out or Path("results") / name
    stamp = time.strftime("%m%d-%H%M%S")
    final = f"record-{name}-{stamp}"
    log(f"record {name}: {len(seeds)} seeds x {len(methods)} methods on {jobs} workers, then the report of all ({settings})")
    # The teachers and their caches first, once (restored from the run cache when they ran before); then
    # one experiment per cell, so that the workers share out every (seed, method): each seed's first
    # method (which also trains that seed's student alone), then the other methods, whose experiments
    # restore the student from the run cache.
    settle()
    queue(f"{final}-upstream", settings, "cache_teacher")
    run_all(1, f"the record {name} (its teachers)")
    for round_ in ([methods[:1]], [[m] for m in methods[1:]]):
        if not round_:
            continue
        settle()
        for seed in seeds:
            for chosen in round_:
                queue(f"{final}-s{seed}-{chosen[0]}", settings | {"grid.seeds": [seed], "grid.methods": chosen})
        run_all(jobs, f"the record {name}")
    settle()
    queue(final, settings)
    run_all(1, f"the record {name}")
    rev = experiment_revs()[final]
    with atomic_path(out) as tmp:
        files = export(rev, tmp)
        figures = draw(tmp)
        write_json(tmp / "record.json", {"name": name, "experiment": final, "commit": rev, "set": settings,
                                         "command": f"rcekd record --name {name}", "files": files, "figures": figures})
    log(f"record {name}: {files} files of experiment {final} ({rev[:10]}) in {out}; commit it with git add {out}")
