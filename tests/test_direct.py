"""stages/direct.py renders dvc.yaml's stages as DVC does: the same names and the same commands, for the
project's own dvc.yaml over a grid with several values on every axis (what `rcekd record --direct` runs
without DVC; tests/test_parallel_dvc.py checks that it gives the queue's results)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from stages.direct import Workspace, render, stage_commands
from tests.dvc_repo import make_repo


def test_every_stage_and_command_is_dvcs_own(tmp_path: Path) -> None:
    from dvc.repo import Repo

    grid = {("grid", "teachers"): ["mf", "lightgcn"], ("grid", "students"): ["mf", "hstu"],
            ("grid", "methods"): ["ce", "rcekd"], ("grid", "seeds"): [0, 3]}
    repo = make_repo(tmp_path / "repo", grid, users=50)
    with Repo(str(repo)) as dvc:
        theirs = {stage.addressing.split(":")[-1]: " ".join(stage.cmd.split()) for stage in dvc.index.stages}
    ours = stage_commands(yaml.safe_load((repo / "dvc.yaml").read_text())["stages"],
                          yaml.safe_load((repo / "params.yaml").read_text()))
    assert ours == theirs
    assert "distill@lightgcn-hstu-rcekd-3" in ours and "--seed 3" in ours["distill@lightgcn-hstu-rcekd-3"]


def test_a_reference_keeps_its_type_whole_and_is_text_inside_text() -> None:
    values = {"grid": {"seeds": [0, 1]}, "dataset": "citeulike"}
    assert render("${grid.seeds}", values) == [0, 1]
    assert render("data/${dataset}/seed_${grid.seeds}", {**values, "grid": {"seeds": 4}}) == "data/citeulike/seed_4"
    with pytest.raises(KeyError, match=r"\$\{grid.teachers\} names nothing in params.yaml"):
        render("${grid.teachers}", values)


def test_a_workspace_outlives_edits_of_the_sections_no_stage_reads(tmp_path: Path, monkeypatch) -> None:
    """Its finished stages (done.json) and training states stay when only `records` or `tuning` change;
    any other parameter starts it afresh."""
    repo = make_repo(tmp_path / "repo", {}, users=50)
    monkeypatch.chdir(repo)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    folder = tmp_path / "work"
    Workspace(folder, params)
    (folder / "done.json").write_text('["preprocess"]')
    (folder / "state.resume").write_text("kept")
    params["records"] = {**params.get("records", {}), "another": {"set": {"train.lr": 0.5}}}
    params.setdefault("tuning", {})["trials"] = 99
    assert Workspace(folder, params).done == {"preprocess"}
    assert (folder / "state.resume").read_text() == "kept"
    params["train"]["lr"] *= 2
    assert Workspace(folder, params).done == set()
    assert not (folder / "state.resume").exists()
