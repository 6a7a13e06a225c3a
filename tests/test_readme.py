"""README's result tables are generated from committed files (stages/readme.py): the committed README
is what those files give, and a changed file changes the table."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from stages.readme import render, training_hours, tuning_block
from tests.dvc_repo import ROOT


def committed(tmp_path: Path) -> Path:
    """The repository as committed (`git archive HEAD`): `make run` rewrites the default pipeline's outputs,
    and on another CPU type RCE-KD's draws differ in the last bits (README, *Determinism*), so the check
    reads what the commit holds, not what a newcomer's own run left. ROOT itself outside a git checkout."""
    archive = subprocess.run(["git", "archive", "HEAD"], cwd=ROOT, capture_output=True)
    if archive.returncode != 0:
        return ROOT
    subprocess.run(["tar", "-x", "-C", str(tmp_path)], input=archive.stdout, check=True)
    return tmp_path


@pytest.mark.parametrize("name", ["README.md", "results/table1.md"])
def test_readme_is_what_its_committed_files_give(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = committed(tmp_path)
    monkeypatch.chdir(root)
    text = (root / name).read_text()
    assert "<!-- readme: run " in text  # at least one pipeline's table is generated
    assert render(text) == text, f"{name} differs from its committed results: run `rcekd readme`"


def test_a_changed_metric_changes_the_generated_table(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for path in ["params.yaml", "artifacts/reports/citeulike/results.json", *map(str, (ROOT / "artifacts/citeulike").rglob("history.csv"))]:
        source = ROOT / path
        target = tmp_path / source.relative_to(ROOT)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source, target)
    monkeypatch.chdir(tmp_path)
    text = "before\n<!-- readme: run . -->\nstale\n<!-- readme: end -->\nafter\n"
    first = render(text)
    assert first.startswith("before\n") and first.endswith("<!-- readme: end -->\nafter\n") and "stale" not in first
    assert render(first) == first
    path = tmp_path / "artifacts/reports/citeulike/results.json"
    report = json.loads(path.read_text())
    report["mf_to_mf"]["runs"]["rcekd"]["ndcg@20"]["mean"] = 0.5
    path.write_text(json.dumps(report))
    second = render(first)
    assert "| rcekd | " in second and "| 0.5000 |" in second and second != first
    assert "best first: `teacher (mf)`, `rcekd`" in first and "best first: `rcekd`, `teacher (mf)`" in second  # the stated order follows


def test_a_sequential_record_is_shown_at_10_beside_table_12_with_its_direct_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    histories = [path.relative_to(ROOT) for path in (ROOT / "artifacts/citeulike").rglob("history.csv")]
    for path in ["artifacts/reports/citeulike/results.json", *histories]:
        target = tmp_path / "record" / path
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / path, target)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["split"]["mode"] = "leave_one_out"
    (tmp_path / "record/params.yaml").write_text(yaml.safe_dump(params))
    shutil.copytree(ROOT / "results/paper", tmp_path / "results/paper")
    monkeypatch.chdir(tmp_path)
    table = render("<!-- readme: run record -->\n<!-- readme: end -->\n")
    report = json.loads((tmp_path / "record/artifacts/reports/citeulike/results.json").read_text())
    rcekd = report["mf_to_mf"]["runs"]["rcekd"]
    assert "| run | test Recall@10 | test NDCG@10 | NDCG@10 vs student | paper R@10 / N@10 |" in table
    assert f"| rcekd | {rcekd['recall@10']['mean']:.4f} | {rcekd['ndcg@10']['mean']:.4f} |" in table
    assert "| 0.0077 / 0.0063 |" in table  # Table 12's CiteULike MF teacher
    assert "@20" not in table.replace("valid NDCG@20", "")
    assert "--direct" not in table  # a record without record.json, or made on DVC's queue: no device named
    cells = {"s0-ce": {"experiment": "direct:NVIDIA H200"}, "s0-rcekd": {"experiment": "record-x-s0-rcekd", "commit": "ab"}}
    (tmp_path / "record/record.json").write_text(json.dumps({"upstream": "direct:NVIDIA H200", "cells": cells}))
    table = render("<!-- readme: run record -->\n<!-- readme: end -->\n")
    assert "; 2 of its 3 runs (the teachers, each cell) with `rcekd record --direct` on NVIDIA H200):" in table


def test_the_tuning_table_shows_each_search_best_first(tmp_path: Path) -> None:
    rows = [
        {"trial": "t1", "kd.rcekd.weight": 10, "valid_ndcg@20": 0.05, "best_epoch": 90, "epochs": 120, "experiment": "ab"},
        {"trial": "t0", "kd.rcekd.weight": 1, "valid_ndcg@20": 0.04, "best_epoch": 50, "epochs": 80, "experiment": "cd"},
        {"trial": "t2", "kd.rcekd.weight": 100, "valid_ndcg@20": 0.03, "best_epoch": 20, "epochs": 50, "experiment": "direct:NVIDIA H200"},
    ]
    with open(tmp_path / "rcekd.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    table = tuning_block(tmp_path)
    assert "| rcekd | 3 (1 on NVIDIA H200) | weight 10 | 0.0500 | 0.0300–0.0400 | 90 / 120 | `rcekd.csv` |" in table


def test_an_unknown_block_is_an_error_naming_it() -> None:
    with pytest.raises(ValueError, match="unknown generated block `plot`"):
        render("<!-- readme: plot x -->\n<!-- readme: end -->")


def test_the_datasets_copies_are_what_preprocessing_wrote() -> None:
    assert (ROOT / "results/datasets/citeulike.json").read_text() == (ROOT / "artifacts/metrics/citeulike/data.json").read_text()


def test_the_hours_are_epochs_times_the_median_epoch_so_a_pause_does_not_count(tmp_path: Path) -> None:
    for name, seconds in (("teacher_mf", [1800.0, 1800.0, 9e6]), ("mf_to_mf/rcekd/seed_0", [900.0, 900.0])):
        folder = tmp_path / "artifacts/citeulike" / name
        folder.mkdir(parents=True)
        rows = "".join(f"{epoch},{value}\n" for epoch, value in enumerate(seconds, 1))
        (folder / "history.csv").write_text("epoch,epoch_seconds\n" + rows)
    hours = training_hours(tmp_path, "citeulike", [("teacher_mf", [None]), ("mf_to_mf/rcekd", [0])])
    assert hours == pytest.approx(3 * 0.5 + 2 * 0.25)  # the 9e6-second epoch (a pause) counts as a median one
