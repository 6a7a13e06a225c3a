"""End to end: the real DVC pipeline on a small configuration in a temporary git repository.

`dvc repro` builds everything; `dvc exp run -S` on one RCE-KD parameter reruns only that method's
distill stage and what follows it; `dvc metrics diff` shows the changed metric.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SMALL = {
    ("train", "max_epochs"): 4,
    ("train", "patience"): 3,
    ("train", "eval_chunk"): 256,
    ("backbones", "mf", "teacher", "model", "dim"): 32,
    ("backbones", "mf", "student", "model", "dim"): 8,
    ("backbones", "lightgcn", "teacher", "model", "dim"): 32,
    ("backbones", "lightgcn", "student", "model", "dim"): 8,
    ("backbones", "hstu", "teacher", "model"): {"dim": 16, "blocks": 2, "heads": 2, "max_len": 20, "negatives": 64},
    ("backbones", "hstu", "student", "model"): {"dim": 8, "blocks": 1, "heads": 1, "max_len": 20, "negatives": 64},
    ("grid", "teachers"): ["mf", "lightgcn", "hstu"],
    ("grid", "students"): ["mf", "lightgcn", "hstu"],
    ("cache", "topk"): 20,
    ("kd", "ce", "k"): 10,
    ("kd", "rcekd", "k"): 10,
    ("kd", "rcekd", "l"): 10,
    ("device",): "cpu",
}


def run(cmd: list[str], cwd: Path) -> str:
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout + done.stderr


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    repo = tmp_path_factory.mktemp("pipeline")
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(ROOT / name, repo / name)
    shutil.copytree(ROOT / "rcekd", repo / "rcekd", ignore=shutil.ignore_patterns("__pycache__"))
    raw = repo / "data/raw/citeulike-t"
    raw.mkdir(parents=True)
    lines = (ROOT / "data/raw/citeulike-t/users.dat").read_text().splitlines(keepends=True)
    (raw / "users.dat").write_text("".join(lines[:500]))  # a real excerpt: the first 500 users
    params = yaml.safe_load((repo / "params.yaml").read_text())
    for keys, value in SMALL.items():
        node = params
        for key in keys[:-1]:
            node = node[key]
        node[keys[-1]] = value
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["git", "init", "-q"], repo)
    run(["dvc", "init", "-q"], repo)
    run(["dvc", "config", "core.analytics", "false"], repo)
    run(["dvc", "config", "core.check_update", "false"], repo)
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-qm", "small pipeline"], repo)
    return repo


def ran_stages(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


BACKBONES = ("mf", "lightgcn", "hstu")


def test_repro_builds_every_run(repo: Path) -> None:
    output = run(["dvc", "repro"], repo)
    expected = {"preprocess", "report"}
    for backbone in BACKBONES:
        expected |= {f"train_teacher@{backbone}", f"cache_teacher@{backbone}", f"train_student@{backbone}"}
    expected |= {f"distill@{t}-{s}-{m}" for t in BACKBONES for s in BACKBONES for m in ("ce", "rcekd")}
    assert expected <= ran_stages(output)
    metrics = repo / "artifacts/metrics/citeulike"
    names = [f"{role}_{b}" for role in ("teacher", "student") for b in BACKBONES]
    names += [f"{t}_to_{s}/{m}" for t in BACKBONES for s in BACKBONES for m in ("ce", "rcekd")]
    for name in names:
        record = json.loads((metrics / f"{name}.json").read_text())
        assert set(record["test"]) == {"recall@10", "ndcg@10", "recall@20", "ndcg@20"}
        assert 0.0 <= record["test"]["ndcg@20"] <= 1.0
    table = (repo / "artifacts/citeulike/results.md").read_text()
    assert all(f"| {name} |" in table for name in names), table
    for backbone in BACKBONES:  # a curve and seconds per epoch for every teacher
        timing = (repo / f"artifacts/citeulike/teacher_{backbone}/timing.csv").read_text().splitlines()
        assert timing[0] == "epoch,epoch_seconds,prep_seconds,train_seconds" and len(timing) == 1 + 4
    assert "Data and pipelines are up to date" in run(["dvc", "status"], repo)
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-qm", "results"], repo)


def test_exp_run_reruns_only_the_changed_method(repo: Path) -> None:
    output = run(["dvc", "exp", "run", "-S", "kd.rcekd.weight=100"], repo)
    ran = ran_stages(output)
    rcekd_cells = {f"{stage}@{t}-{s}-rcekd" for stage in ("distill", "evaluate") for t in BACKBONES for s in BACKBONES}
    assert rcekd_cells <= ran, output
    assert ran <= rcekd_cells | {"report"}, ran

    diff = json.loads(run(["dvc", "metrics", "diff", "--json"], repo))
    changed = diff["artifacts/metrics/citeulike/mf_to_mf/rcekd.json"]
    assert any(entry.get("diff") not in (None, 0) for entry in changed.values()), changed
    for unchanged in ("student_mf", "mf_to_mf/ce"):
        path = f"artifacts/metrics/citeulike/{unchanged}.json"
        assert path not in diff or not any(entry.get("diff") for entry in diff[path].values())
    assert "kd.rcekd.weight" in run(["dvc", "exp", "show", "--no-pager", "--csv"], repo)


def test_plots_show_renders_histories(repo: Path) -> None:
    output = run(["dvc", "plots", "show", "--json"], repo)
    assert "valid_ndcg@20" in output
    for backbone in BACKBONES:  # every teacher's curve and its seconds per epoch are plots
        for name in ("history.csv", "timing.csv"):
            assert f"artifacts/citeulike/teacher_{backbone}/{name}" in output, (backbone, name)
    assert "epoch_seconds" in output
