"""stages/direct.py renders dvc.yaml's stages as DVC does: the same names and the same commands, for the
project's own dvc.yaml over a grid with several values on every axis (what `rcekd record --direct` runs
without DVC; tests/test_parallel_dvc.py checks that it gives the queue's results)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from stages.direct import render, stage_commands
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
