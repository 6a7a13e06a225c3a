"""`rcekd run-queue`: run every queued DVC experiment on N workers, until none is left queued.

DVC's experiment queue does the work (`dvc exp run --run-all -j N`, which waits for the workers).
This sets what each worker's stages read (stages/worker.py): torch's threads (RCEKD_THREADS, by
default the cores shared out among the workers) and the GPUs the workers share (RCEKD_GPUS), and it
keeps each experiment's training state in one folder outside the experiments' copies of the repository
(RCEKD_RESUME_DIR, default `.resume/`), so that an experiment queued again resumes; and it
works around a known weakness of the queue: workers may exit while experiments are still queued
(treeverse/dvc#10562), so it starts them again as long as a round leaves fewer queued than before.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from collections import Counter
from pathlib import Path
from typing import Callable, Iterable

import typer

from stages.common import RESUME_DIR, log
from stages.worker import threads_per_job


STATES = ("Queued", "Running", "Success", "Failed")


def queue_status(tries: int = 10) -> tuple[list[tuple[str, str]], int, int]:
    """(name, state) of every task of `dvc queue status`, and how many workers are active and idle.
    It can fail for a moment while another DVC process ends (seen once in CI, under load): it is asked again."""
    for _ in range(tries):
        done = subprocess.run(["dvc", "queue", "status"], capture_output=True, text=True)
        if done.returncode == 0:
            break
        time.sleep(3)
    else:
        raise SystemExit(f"error: `dvc queue status` failed {tries} times (exit {done.returncode}):\n{done.stderr.strip()}")
    lines = done.stdout.splitlines()
    tasks = [(line.split()[1], line.split()[-1]) for line in lines if len(line.split()) > 2 and line.split()[-1] in STATES]
    workers = re.search(r"Worker status: (\d+) active, (\d+) idle", "\n".join(lines))
    return tasks, int(workers[1]) if workers else 0, int(workers[2]) if workers else 0


def queue_states() -> Counter:
    """How many queued tasks are in each state (Queued, Running, Success, Failed), how many workers are
    alive (`workers`) and how many of those are idle (`idle`)."""
    tasks, active, idle = queue_status()
    counts = Counter(state for _, state in tasks)
    counts["workers"], counts["idle"] = active + idle, idle
    return counts


def drop_unfinished(prefix: str) -> list[str]:
    """Remove the tasks named `<prefix>-<stamp>-...` (`stamp`) that an earlier run left Queued, or Running
    with no worker alive (a session or a run that ended), so that a run again does not run them beside its
    own (call after `settle`; nothing is touched while a worker lives). What had finished is kept: in the
    experiments and the run cache."""
    tasks, active, idle = queue_status()
    if active or idle:
        return []
    earlier = re.compile(re.escape(prefix) + r"-\d{4}-\d{6}-")
    dropped = {name: state for name, state in tasks if earlier.match(name) and state in ("Queued", "Running")}
    running = [name for name, state in dropped.items() if state == "Running"]
    if running:
        subprocess.run(["dvc", "queue", "kill", "--force", *running], capture_output=True, text=True)
    if dropped:
        subprocess.run(["dvc", "queue", "remove", *dropped], capture_output=True, text=True)
        log(f"run-queue: {len(dropped)} unfinished tasks of an earlier run removed from the queue ({prefix}-...)")
    return list(dropped)


def stamp() -> str:
    """The time part of a run's task names (`<prefix>-<stamp>-<task>`), unique per run."""
    return time.strftime("%m%d-%H%M%S")


def settle(timeout: float = 300.0) -> None:
    """Wait until no queue worker is alive. A worker of an earlier round lingers a while after its last
    task and may take a task queued then and lose it as it exits (left `Running` for ever), so new
    experiments are queued only once every worker is gone. Workers that are all idle with nothing queued
    are told to stop (`dvc queue stop`: they have no task to finish) instead of being waited out."""
    waited, stopped = 0.0, False
    while (states := queue_states())["workers"] and waited < timeout:
        if not stopped and states["idle"] == states["workers"] and not states["Queued"]:
            subprocess.run(["dvc", "queue", "stop"], capture_output=True, text=True)
            stopped = True
        time.sleep(2)
        waited += 2


def set_flags(settings: dict) -> list[str]:
    """`-S ++key=value` flags for DVC (each value as JSON, which Hydra's grammar reads as YAML); `++`
    sets a key that params.yaml does not have yet, such as kd.<method>.student_weight_decay."""
    return [arg for key, value in settings.items() for arg in ("-S", f"++{key}={json.dumps(value)}")]


def queue(name: str, settings: dict, *targets: str) -> None:
    """Queue one experiment named `name` of params.yaml with `settings` set (the whole pipeline, or `targets`)."""
    done = subprocess.run(["dvc", "exp", "run", "--queue", "--name", name, *set_flags(settings), *targets], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"error: queuing experiment {name} ({settings}) failed:\n{done.stderr.strip()}")


def experiment_revs() -> dict[str, str]:
    """name → commit of every local experiment, whatever its baseline (a long search outlives new commits).
    Read from git's refs (refs/exps/<baseline>/<name>), not through DVC's Repo, which takes the lock
    that a running `dvc exp run` holds."""
    listed = subprocess.run(["git", "for-each-ref", "--format=%(refname) %(objectname)", "refs/exps"],
                            capture_output=True, text=True, check=True).stdout.split("\n")
    revs = {}
    for line in filter(None, listed):
        ref, rev = line.split()
        parts = ref.split("/")  # refs/exps/<2 hex>/<38 hex>/<name>; DVC's own refs (exec, celery, temp) differ
        if len(parts) == 5 and len(parts[2]) == 2 and len(parts[3]) == 38:
            revs[parts[4]] = rev
    return revs


def run_landing(jobs: int, names: Iterable[str], land: Callable[[str, str], None], every: float = 60.0) -> bool:
    """Run the queue (`rcekd run-queue --jobs N` as a child process) and call land(name, commit) for each
    experiment of `names` as soon as it exists, so that what finished is kept however the rest ends.
    True when the queue succeeded and every one of `names` landed."""
    runner = subprocess.Popen(["rcekd", "run-queue", "--jobs", str(jobs)])
    waiting = list(names)
    while waiting:
        try:
            runner.wait(timeout=every)
        except subprocess.TimeoutExpired:
            pass
        finished = runner.poll() is not None
        revs = experiment_revs()
        for name in [name for name in waiting if name in revs]:
            waiting.remove(name)
            land(name, revs[name])
        if finished:
            break
    return runner.wait() == 0 and not waiting


def run_all(jobs: int, what: str) -> None:
    """`rcekd run-queue --jobs N` as a child process; exits with an error naming `what` unless all succeeded."""
    if subprocess.run(["rcekd", "run-queue", "--jobs", str(jobs)]).returncode != 0:
        raise SystemExit(f"error: the experiments of {what} did not all finish (above); `dvc queue status` lists them")


def run_workers(jobs: int, env: dict, every: float = 60.0) -> int:
    """`dvc exp run --run-all --jobs N`, keeping N workers while tasks are queued: a DVC worker may exit with
    tasks still queued (treeverse/dvc#10562) while another works on, which would leave the rest of a search
    to one worker; the missing workers are started again (`dvc queue start`, which starts only the numbered
    workers that answer no ping). A worker counts as missing only when fewer tasks run than N while some
    are queued, on two polls `every` seconds apart: the workers' count alone comes from pings, which a
    busy worker can leave unanswered on a loaded machine (seen live: two more workers started beside two
    alive), and a task that just ended leaves one slot empty for a moment. Its exit status."""
    runner = subprocess.Popen(["dvc", "exp", "run", "--run-all", "--jobs", str(jobs)], env=env)
    short = 0  # polls in a row that found a worker missing
    while True:
        try:
            return runner.wait(timeout=every)
        except subprocess.TimeoutExpired:
            pass
        try:
            states = queue_states()
        except SystemExit:  # the status failing for a while: the run goes on, asked again next time
            continue
        missing = states["Queued"] and states["Running"] < jobs and states["workers"] < jobs
        short = short + 1 if missing else 0
        if short == 2:
            log(f"run-queue: {states['Running']} of {jobs} workers running with {states['Queued']} experiments "
                "queued (treeverse/dvc#10562); starting the missing ones")
            subprocess.run(["dvc", "queue", "start", "--jobs", str(jobs)], env=env, capture_output=True, text=True)
            short = 0


def main(
    jobs: int = typer.Option(2, "--jobs", "-j", min=1, help="Queue workers (experiments at once)."),
    threads: int = typer.Option(0, min=0, help="torch threads per worker; 0 = the usable cores (CPU affinity) divided among the workers."),
    gpus: str = typer.Option("", help="GPU ids the workers share, one per running stage (e.g. 0,1,2,3); empty = none."),
) -> None:
    """Run the queued experiments (`dvc exp run --queue ...`) with JOBS workers of THREADS threads each."""
    threads = threads or threads_per_job(jobs)
    # Each experiment runs in a fresh copy of the repository: its training state is kept outside it, so that
    # an experiment queued again (after a killed run or session) resumes instead of starting over.
    env = {**os.environ, "RCEKD_THREADS": str(threads), RESUME_DIR: os.environ.get(RESUME_DIR) or str(Path(".resume").resolve())}
    if gpus:
        env["RCEKD_GPUS"] = gpus
    states = queue_states()
    failed_before, succeeded_before = states["Failed"], states["Success"]
    log(f"run-queue: {states['Queued']} queued experiments, {jobs} workers x {threads} threads" + (f", GPUs {gpus}" if gpus else ""))
    while states["Queued"]:
        queued = states["Queued"]
        returncode = run_workers(jobs, env)
        if returncode != 0:
            raise SystemExit(f"error: `dvc exp run --run-all --jobs {jobs}` failed (exit {returncode}); see `dvc queue status`")
        states = queue_states()
        if states["Queued"]:
            if states["Queued"] >= queued:
                raise SystemExit(f"error: {states['Queued']} experiments stay queued; see `dvc queue status` and `dvc queue logs <name>`")
            log(f"run-queue: the workers exited with {states['Queued']} experiments queued (treeverse/dvc#10562); starting them again")
    orphaned = 0
    while states["Running"]:  # a worker left idle by an earlier round may have taken a task queued since
        orphaned = orphaned + 1 if not states["workers"] else 0
        if orphaned > 6:
            raise SystemExit(f"error: {states['Running']} experiments stay Running with no worker alive (lost by an exiting "
                             "worker); `dvc queue status`, `dvc queue kill <name>`, then run the command again (finished runs come from the run cache)")
        time.sleep(5)
        states = queue_states()
    failed = states["Failed"] - failed_before
    log(f"run-queue: done; {states['Success'] - succeeded_before} succeeded, {failed} failed in this run (`dvc exp show` lists the results)")
    if failed:
        raise SystemExit(f"error: {failed} experiments failed; `dvc queue status`, then `dvc queue logs <name>`")
