"""`rcekd push-runs`: share this repository's finished stages through a DVC remote, so that another
clone restores them from the run cache (`dvc fetch --run-cache`, then `dvc exp run --pull ...`)
instead of running them again.

`dvc push --run-cache` sends the run records but, in DVC 3, only the outputs the workspace's dvc.lock
tracks with the cache on. A record is restored only when every output it names is available, and
each training stage also writes `cache: false` files (its history and timing, which git holds), so a
record of another machine would never be restored. This pushes the records and then every output that
the local records name, through DVC's own transfer (`repo.cloud.push`), which skips what the remote holds.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import typer

from stages.common import log


def main(remote: str = typer.Option("", "--remote", "-r", help="The DVC remote (default: the repository's default remote).")) -> None:
    """Push the run cache and every output its records name to a DVC remote."""
    command = ["dvc", "push", "--run-cache", *(["--remote", remote] if remote else [])]
    if subprocess.run(command).returncode != 0:
        raise SystemExit(f"error: `{' '.join(command)}` failed (above); is a DVC remote configured (`dvc remote add -d ...`)?")
    from dvc.repo import Repo

    with Repo(".") as repo:
        runs = Path(repo.stage_cache.cache_dir)
        records = [(path.parent.name, path.name) for path in sorted(runs.glob("*/*/*"))]
        pushed = 0
        for objects in repo.stage_cache.get_used_objs(records).values():
            pushed += len(repo.cloud.push(objects, remote=remote or None).transferred)
    log(f"push-runs: {len(records)} run records; {pushed} more output objects pushed")
