"""A small real pipeline in a temporary git + DVC repository, for the end-to-end DVC tests: this
project's dvc.yaml, params.yaml with overrides, rcekd/ and a real excerpt of CiteULike-t."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def run(cmd: list[str], cwd: Path, env: dict | None = None) -> str:
    """Run a command in `cwd`; fail the test with its output unless it exits 0; return stdout + stderr."""
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t", **(env or {})}
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout + done.stderr


def make_repo(repo: Path, overrides: dict[tuple, object], *, users: int = 500) -> Path:
    """A committed repository at `repo` running the pipeline on the first `users` users of CiteULike-t,
    with params.yaml's values at each key path of `overrides` replaced."""
    repo.mkdir(parents=True, exist_ok=True)
    for name in ("dvc.yaml", "params.yaml", ".dvcignore"):
        shutil.copy(ROOT / name, repo / name)
    shutil.copytree(ROOT / "rcekd", repo / "rcekd", ignore=shutil.ignore_patterns("__pycache__"))
    raw = repo / "data/raw/citeulike-t"
    raw.mkdir(parents=True)
    lines = (ROOT / "data/raw/citeulike-t/users.dat").read_text().splitlines(keepends=True)
    (raw / "users.dat").write_text("".join(lines[:users]))  # a real excerpt: the first users of the file
    params = yaml.safe_load((repo / "params.yaml").read_text())
    for keys, value in overrides.items():
        node = params
        for key in keys[:-1]:
            node = node[key]
        node[keys[-1]] = value
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["git", "init", "-q"], repo)
    run(["dvc", "init", "-q"], repo)
    run(["dvc", "config", "core.analytics", "false"], repo)
    run(["dvc", "config", "core.check_update", "false"], repo)
    shutil.copytree(ROOT / ".dvc/plots", repo / ".dvc/plots")  # the figures' templates
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-qm", "small pipeline"], repo)
    return repo


def ran_stages(output: str) -> set[str]:
    """The stages DVC ran (not restored) according to its output."""
    return set(re.findall(r"Running stage '([^']+)'", output))
