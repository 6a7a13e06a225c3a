"""Every `kd` section of params.yaml (each method and each RCE-KD ablation) trains a student through
the real `rcekd distill` command on a small real excerpt, and logs its per-epoch preparation time."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from stages.cli import app

ROOT = Path(__file__).resolve().parents[1]
PARAMS = yaml.safe_load((ROOT / "params.yaml").read_text())


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("methods")
    lines = (ROOT / "data/raw/citeulike-t/users.dat").read_text().splitlines(keepends=True)
    (tmp / "users.dat").write_text("".join(lines[:300]))
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["datasets"]["citeulike"]["path"] = str(tmp / "users.dat")
    params["device"] = "cpu"
    params["train"].update(max_epochs=1, patience=1, eval_chunk=128)
    params["backbones"]["mf"]["teacher"]["model"]["dim"] = 16
    params["backbones"]["mf"]["student"]["model"]["dim"] = 8
    (tmp / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    p = ["--params", str(tmp / "params.yaml")]
    for args in (
        ["preprocess", "--dataset", "citeulike", "--out", str(tmp / "data"), "--stats", str(tmp / "data.json")],
        ["train", "--role", "teacher", "--backbone", "mf", "--data", str(tmp / "data"), "--out", str(tmp / "t.pt"), "--history", str(tmp / "t.csv"), "--trajectory", str(tmp / "trajectory.parquet")],
        ["cache-teacher", "--data", str(tmp / "data"), "--checkpoint", str(tmp / "t.pt"), "--out", str(tmp / "cache")],
    ):
        result = CliRunner().invoke(app, args + p)
        assert result.exit_code == 0, result.output
    return tmp


@pytest.mark.parametrize("name", sorted(PARAMS["kd"]))
def test_every_kd_section_trains_a_student(workspace: Path, name: str) -> None:
    out = workspace / name
    result = CliRunner().invoke(app, [
        "distill", "--method", name, "--student", "mf", "--data", str(workspace / "data"),
        "--cache", str(workspace / "cache"), "--teacher", str(workspace / "t.pt"),
        "--trajectory", str(workspace / "trajectory.parquet"), "--out", str(out / "checkpoint.pt"), "--history", str(out / "history.csv"), "--timing", str(out / "timing.csv"),
        "--params", str(workspace / "params.yaml"),
    ])
    assert result.exit_code == 0, result.output
    (row,) = list(csv.DictReader((out / "history.csv").open()))
    assert float(row["kd"]) > 0 and float(row["prep_seconds"]) >= 0
    assert (out / "checkpoint.pt").exists()


def test_a_section_without_a_method_is_refused(workspace: Path, tmp_path: Path) -> None:
    params = yaml.safe_load((workspace / "params.yaml").read_text())
    params["kd"]["mystery"] = {"weight": 1.0, "k": 5}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    result = CliRunner().invoke(app, [
        "distill", "--method", "mystery", "--student", "mf", "--data", str(workspace / "data"),
        "--cache", str(workspace / "cache"), "--out", str(tmp_path / "c.pt"), "--history", str(tmp_path / "h.csv"),
        "--params", str(tmp_path / "params.yaml"),
    ])
    assert result.exit_code == 2 and "kd.mystery names no method" in result.output


class _Stop(Exception):
    pass


def test_a_run_takes_its_own_learning_rate_and_weight_decay(workspace: Path, tmp_path: Path, monkeypatch) -> None:
    """kd.<method>.lr / student_weight_decay set that method's student runs alone, and
    backbones.<S>.student.lr the student alone's, over train.lr and backbones.<S>.student.weight_decay."""
    params = yaml.safe_load((workspace / "params.yaml").read_text())
    params["kd"]["ce"].update(lr=0.0005, student_weight_decay=0.25)
    params["backbones"]["mf"]["student"]["lr"] = 0.002
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    seen = {}

    def fake_fit(*args, **kwargs):
        seen.update(lr=kwargs["lr"], weight_decay=kwargs["weight_decay"])
        raise _Stop

    common = ["--data", str(workspace / "data"), "--out", str(tmp_path / "c.pt"), "--history", str(tmp_path / "h.csv"), "--params", str(tmp_path / "params.yaml")]
    monkeypatch.setattr("stages.distill.fit", fake_fit)
    result = CliRunner().invoke(app, ["distill", "--method", "ce", "--student", "mf", "--cache", str(workspace / "cache"), *common])
    assert isinstance(result.exception, _Stop) and seen == {"lr": 0.0005, "weight_decay": 0.25}
    monkeypatch.setattr("stages.train.fit", fake_fit)
    result = CliRunner().invoke(app, ["train", "--role", "student", "--backbone", "mf", *common])
    assert isinstance(result.exception, _Stop) and seen == {"lr": 0.002, "weight_decay": params["backbones"]["mf"]["student"]["weight_decay"]}
    params["kd"]["ce"]["lr"] = 0
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    result = CliRunner().invoke(app, ["distill", "--method", "ce", "--student", "mf", "--cache", str(workspace / "cache"), *common])
    assert result.exit_code == 2 and "kd.ce.lr = 0" in result.output


def test_a_role_takes_its_own_patience(workspace: Path, tmp_path: Path, monkeypatch) -> None:
    """backbones.<B>.<role>.patience sets that role's early stopping (the HSTU teacher's: its validation
    dips for tens of epochs early on) over train.patience, and only that role's."""
    params = yaml.safe_load((workspace / "params.yaml").read_text())
    params["backbones"]["mf"]["teacher"]["patience"] = params["train"]["patience"] + 7
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    seen = []

    def fake_fit(*args, **kwargs):
        seen.append(kwargs["patience"])
        raise _Stop

    monkeypatch.setattr("stages.train.fit", fake_fit)
    common = ["--backbone", "mf", "--data", str(workspace / "data"), "--out", str(tmp_path / "c.pt"), "--history", str(tmp_path / "h.csv"), "--params", str(tmp_path / "params.yaml")]
    for role in ("teacher", "student"):
        assert isinstance(CliRunner().invoke(app, ["train", "--role", role, *common]).exception, _Stop)
    assert seen == [params["train"]["patience"] + 7, params["train"]["patience"]]
