"""The 5-seed CiteULike MF→MF protocol (the student alone, ce and rcekd for each seed, after one
teacher) run by DVC's experiment queue with one worker using every core and with N workers sharing
them, in one run.

Usage: python benchmarks/parallel.py [--seeds 0,1,2,3,4] [--jobs 2] [--work DIR]

A fresh clone of this commit builds the shared upstream once (`dvc repro cache_teacher`: preprocess,
teacher, teacher cache; timed apart); a copy of that clone is taken for each arm, so both start from
the same teacher. In each arm every cell is one queued experiment whose target is the cell's last
stage (`evaluate_student@mf-S`, `evaluate@mf-mf-ce-S`, `evaluate@mf-mf-rcekd-S`: 15 cells for 5 seeds),
then `rcekd run-queue --jobs J --threads cores/J` runs them; an arm's figure is the wall time of
run-queue. The arms then produce the same report (test NDCG@20 per cell printed for both).
Ends with a line `ratio parallel <N workers / 1 worker>`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from stages.worker import threads_per_job

ROOT = Path(__file__).resolve().parents[1]
TARGET = 0.65


def run(command: list[str], cwd: Path, env: dict) -> str:
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{' '.join(command)} failed in {cwd}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return done.stdout + done.stderr


def cells(seeds: list[int]) -> list[tuple[str, str]]:
    """(grid.seeds value, target stage) of every cell."""
    out = []
    for seed in seeds:
        out.append((f"[{seed}]", f"evaluate_student@mf-{seed}"))
        out += [(f"[{seed}]", f"evaluate@mf-mf-{method}-{seed}") for method in ("ce", "rcekd")]
    return out


def metrics_file(name: str) -> str:
    """The metrics file of a cell's experiment, named after its target (evaluate_student-mf-3, evaluate-mf-mf-ce-3)."""
    *_, method, seed = name.split("-")
    run_name = f"student_mf/seed_{seed}" if name.startswith("evaluate_student") else f"mf_to_mf/{method}/seed_{seed}"
    return f"artifacts/metrics/citeulike/{run_name}.json"


def arm(clone: Path, jobs: int, threads: int, seeds: list[int], env: dict) -> tuple[float, dict]:
    for seeds_value, target in cells(seeds):
        run(["dvc", "exp", "run", "--queue", "-S", f"grid.seeds={seeds_value}", "--name", target.replace("@", "-"), target], clone, env)
    started = time.perf_counter()
    run(["rcekd", "run-queue", "--jobs", str(jobs), "--threads", str(threads)], clone, env)
    seconds = time.perf_counter() - started
    results = {}
    try:  # each experiment's test NDCG@20 (a figure's run is still measured if DVC's JSON changes shape)
        for baseline in json.loads(run(["dvc", "exp", "show", "--json"], clone, env)):
            for experiment in baseline.get("experiments") or []:
                cell = metrics_file(experiment["name"])
                for rev in experiment.get("revs", []):
                    record = ((rev.get("data") or {}).get("metrics") or {}).get(cell) or {}
                    if (record.get("data") or {}).get("test"):
                        results[cell.split("citeulike/")[-1].removesuffix(".json")] = round(record["data"]["test"]["ndcg@20"], 5)
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        results = {"unreadable": repr(error)}
    return seconds, results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--jobs", type=int, default=2, help="workers of the parallel arm")
    parser.add_argument("--work", type=Path, help="keep the clones here (default: a temporary directory)")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    cores = threads_per_job(1)  # the cores this process may use
    work = args.work or Path(tempfile.mkdtemp(prefix="rcekd-parallel-"))
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    commit = run(["git", "rev-parse", "HEAD"], ROOT, env).strip()
    print(f"parallel: 5-seed protocol as {len(cells(seeds))} queued cells; {cores} cores; commit {commit[:10]}; "
          f"{time.strftime('%Y-%m-%d %H:%M')}", flush=True)

    base = work / "upstream"
    shutil.rmtree(base, ignore_errors=True)
    run(["git", "clone", "--quiet", str(ROOT), str(base)], work, env)
    env["PYTHONPATH"] = str(base)  # each arm's stages import this commit's code (the arms are copies of it)
    started = time.perf_counter()
    run(["dvc", "repro", "cache_teacher"], base, env)
    print(f"  upstream (preprocess, teacher, cache), once: {time.perf_counter() - started:.0f} s", flush=True)
    run(["git", "-c", "user.name=bench", "-c", "user.email=bench@localhost", "commit", "-qam", "upstream"], base, env)

    figures = {}
    for jobs in (1, args.jobs):
        clone = work / f"workers-{jobs}"
        shutil.rmtree(clone, ignore_errors=True)
        shutil.copytree(base, clone, symlinks=True)
        threads = threads_per_job(jobs)
        seconds, results = arm(clone, jobs, threads, seeds, {**env, "PYTHONPATH": str(clone)})
        figures[jobs] = seconds
        print(f"  {jobs} worker(s) x {threads} thread(s): {seconds:.0f} s  {json.dumps(dict(sorted(results.items())))}", flush=True)
    ratio = figures[args.jobs] / figures[1]
    print(f"ratio parallel {ratio:.3f}  (target <= {TARGET}: {'met' if ratio <= TARGET else 'NOT met'})")


if __name__ == "__main__":
    main()
