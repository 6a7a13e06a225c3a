"""A training stage killed mid-epoch or mid-write (SIGKILL or SIGTERM) and started again continues from
its last saved epoch and ends with exactly the outputs of an uninterrupted run; a killed stage never
leaves a file under an output's final name. The same seed gives the same outputs on CPU."""

from __future__ import annotations

import csv
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from typer.testing import CliRunner

from rcekd.data import load_splits
from stages.cli import app
from stages.common import RESUME_DIR, resume_options

ROOT = Path(__file__).resolve().parents[1]
EPOCHS, BATCH = 6, 1024


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A real excerpt (the first 1,500 lines of CiteULike-t: 980 users) on which a teacher learns within
    a few epochs, its cache and trajectory; several steps per epoch, the state saved after every epoch."""
    tmp = tmp_path_factory.mktemp("resume")
    lines = (ROOT / "data/raw/citeulike-t/users.dat").read_text().splitlines(keepends=True)
    (tmp / "users.dat").write_text("".join(lines[:1500]))
    values = yaml.safe_load((ROOT / "params.yaml").read_text())
    values["datasets"]["citeulike"]["path"] = str(tmp / "users.dat")
    values["device"] = "cpu"
    values["train"].update(max_epochs=EPOCHS, patience=EPOCHS, batch_size=BATCH, lr=0.01, eval_chunk=256, resume_every=0)
    values["backbones"]["mf"]["teacher"]["model"]["dim"] = 32
    values["backbones"]["mf"]["student"]["model"]["dim"] = 8
    values["trajectory"]["every"] = 1  # the teacher's lists at every epoch before its best, carried across a restart
    values["kd"]["dcd"]["every"] = 2  # corrections drawn at epochs 1, 3, 5: epochs 2, 4, 6 use those carried over
    values["kd"]["hetcomp"]["max_stay"] = 2  # users move along the lists every 2 epochs at the latest
    values["diagnostics"].update(users=50, rank_users=5)
    (tmp / "params.yaml").write_text(yaml.safe_dump(values, sort_keys=False))
    data = str(tmp / "data")
    for args in (
        ["preprocess", "--dataset", "citeulike", "--out", data, "--stats", str(tmp / "data.json")],
        ["train", "--role", "teacher", "--backbone", "mf", "--data", data, "--out", str(tmp / "t.pt"), "--history", str(tmp / "t.csv"), "--trajectory", str(tmp / "trajectory.parquet")],
        ["cache-teacher", "--data", data, "--checkpoint", str(tmp / "t.pt"), "--out", str(tmp / "cache")],
    ):
        result = CliRunner().invoke(app, [*args, "--params", str(tmp / "params.yaml")])
        assert result.exit_code == 0, result.output
    return tmp


@pytest.fixture(scope="module")
def params(workspace: Path) -> Path:
    return workspace / "params.yaml"


def command(workspace: Path, params: Path, out: Path, run: str) -> list[str]:
    """The rcekd arguments of a run: `train` (a teacher with its trajectory) or `distill <method>`."""
    data, common = str(workspace / "data"), ["--params", str(params), "--out", str(out / "checkpoint.pt"), "--history", str(out / "history.csv")]
    if run == "train":
        return ["train", "--role", "teacher", "--backbone", "mf", "--data", data, "--trajectory", str(out / "trajectory.parquet"), *common]
    method = run.split()[1]
    return [
        "distill", "--method", method, "--student", "mf", "--data", data, "--cache", str(workspace / "cache"),
        "--teacher", str(workspace / "t.pt"), "--trajectory", str(workspace / "trajectory.parquet"),
        "--diagnostics", str(out / "diagnostics"), *common,
    ]


def outputs(out: Path) -> dict:
    """Everything a run writes, less wall-clock figures (seconds, peak memory)."""
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=True)
    meta = {k: v for k, v in checkpoint["meta"].items() if k != "peak_rss_mb"}
    history = pd.read_csv(out / "history.csv")
    found = {"state": checkpoint["state"], "meta": meta, "history": history.drop(columns=[c for c in history if c.endswith("seconds")])}
    for extra in sorted(out.glob("diagnostics/*.csv")) + sorted(out.glob("*.parquet")):
        found[extra.name] = pd.read_csv(extra) if extra.suffix == ".csv" else pd.read_parquet(extra)
    return found


def assert_same(found: dict, expected: dict) -> None:
    assert found.keys() == expected.keys()
    for name, value in expected.items():
        if name == "state":
            assert value.keys() == found[name].keys()
            for key in value:
                assert torch.equal(found[name][key], value[key]), key
        elif isinstance(value, pd.DataFrame):
            pd.testing.assert_frame_equal(found[name], value, check_exact=True)
        else:
            assert found[name] == value


_references: dict[str, dict] = {}


def uninterrupted(workspace: Path, params: Path, run: str, tmp_path_factory) -> dict:
    if run not in _references:
        out = tmp_path_factory.mktemp("reference")
        result = CliRunner().invoke(app, command(workspace, params, out, run))
        assert result.exit_code == 0, result.output
        assert not list(out.glob("*.resume")), "the training state is removed once the checkpoint is written"
        _references[run] = outputs(out)
    return _references[run]


def interrupted(signal_name: str, point: str, at: int, args: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    """`rcekd <args>` in a subprocess, signalled at an exact point (tests/interrupt.py)."""
    return subprocess.run(
        [sys.executable, str(ROOT / "tests/interrupt.py"), signal_name, point, str(at), "--", *args],
        cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
    )


def steps_per_epoch(workspace: Path) -> int:
    return math.ceil(len(load_splits(workspace / "data").train) / BATCH)


# (run, signal, where it strikes, the epochs completed and saved before it)
CASES = [
    ("distill rcekd", "KILL", "step", 2),     # mid-epoch 3
    ("distill dcd", "KILL", "save", 3),       # halfway through writing the state of epoch 4
    ("distill hetcomp", "TERM", "step", 3),   # mid-epoch 4
    ("distill rcekd", "TERM", "save", 2),     # halfway through writing the state of epoch 3
    ("train", "KILL", "step", 3),             # mid-epoch 4, the teacher and its trajectory (lists of epochs 1-3 carried)
    ("distill ce", "KILL", "save", EPOCHS),   # halfway through writing the checkpoint itself
    ("distill mkd", "KILL", "step", 2),       # mid-epoch 3: a method with parameters (the projectors and their Adam state)
]


@pytest.mark.parametrize("run, signal_name, point, saved", CASES, ids=[f"{r.split()[-1]}-{s}-{p}" for r, s, p, _ in CASES])
def test_interrupted_run_resumes_to_the_uninterrupted_result(workspace, params, tmp_path, tmp_path_factory, run, signal_name, point, saved):
    expected = uninterrupted(workspace, params, run, tmp_path_factory)
    out = tmp_path / "out"
    at = saved * steps_per_epoch(workspace) + steps_per_epoch(workspace) // 2 + 1 if point == "step" else saved + 1
    killed = interrupted(signal_name, point, at, command(workspace, params, out, run))
    assert killed.returncode == (-9 if signal_name == "KILL" else 128 + 15), killed.stderr[-3000:]
    assert f"epoch {saved:4d}" in killed.stderr
    if point == "step":
        assert f"epoch {saved + 1:4d}" not in killed.stderr

    # Nothing under a final name but complete files: the checkpoint is absent, the state is the last epoch's.
    assert not (out / "checkpoint.pt").exists()
    state = torch.load(out / "checkpoint.pt.resume", weights_only=True)
    assert state["epoch"] == saved
    leftovers = [p.name for p in out.iterdir() if ".tmp-" in p.name]
    # A KILL mid-write leaves the half-written temporary (nothing can run after SIGKILL); TERM cleans up.
    assert len(leftovers) == (1 if (signal_name, point) == ("KILL", "save") else 0), leftovers

    restarted = CliRunner().invoke(app, command(workspace, params, out, run))
    assert restarted.exit_code == 0, restarted.output
    assert f"after epoch {saved} " in restarted.output
    assert not any(".tmp-" in p.name or p.suffix == ".resume" for p in out.iterdir())  # stale temporaries removed too
    assert_same(outputs(out), expected)


def test_a_state_of_other_settings_is_not_continued(workspace, params, tmp_path, tmp_path_factory):
    expected = uninterrupted(workspace, params, "distill ce", tmp_path_factory)
    out = tmp_path / "out"
    other = yaml.safe_load(params.read_text())
    other["train"]["lr"] = 0.5
    (tmp_path / "other.yaml").write_text(yaml.safe_dump(other))
    killed = interrupted("KILL", "save", 3, command(workspace, tmp_path / "other.yaml", out, "distill ce"))
    assert killed.returncode == -9 and (out / "checkpoint.pt.resume").exists()
    restarted = CliRunner().invoke(app, command(workspace, params, out, "distill ce"))
    assert restarted.exit_code == 0, restarted.output
    assert "saved by a run with other settings or data; starting from epoch 1" in restarted.output
    assert_same(outputs(out), expected)


def test_a_queued_experiment_run_again_in_a_fresh_copy_resumes(workspace, params, tmp_path, tmp_path_factory):
    """With RCEKD_RESUME_DIR (set by `rcekd run-queue`), the state lives outside the run's folder, as a queued
    experiment's copy of the repository is gone when it is queued again: a run killed in one folder and
    started in another continues from it, and ends with the uninterrupted outputs and no state left."""
    expected = uninterrupted(workspace, params, "distill rcekd", tmp_path_factory)
    env = {RESUME_DIR: str(tmp_path / "states")}
    at = 2 * steps_per_epoch(workspace) + 1
    killed = interrupted("KILL", "step", at, command(workspace, params, tmp_path / "first", "distill rcekd"), env)
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert not list((tmp_path / "first").glob("*.resume")) and len(list((tmp_path / "states").glob("*.resume"))) == 1
    restarted = CliRunner().invoke(app, command(workspace, params, tmp_path / "second", "distill rcekd"), env=env)
    assert restarted.exit_code == 0, restarted.output
    assert "after epoch 2 " in restarted.output
    assert not list((tmp_path / "states").iterdir())
    assert_same(outputs(tmp_path / "second"), expected)


def test_same_seed_same_outputs_on_cpu(workspace, params, tmp_path, tmp_path_factory):
    """Determinism: a second run of RCE-KD with the seed gives identical weights, losses and metrics."""
    expected = uninterrupted(workspace, params, "distill rcekd", tmp_path_factory)
    result = CliRunner().invoke(app, command(workspace, params, tmp_path, "distill rcekd"))
    assert result.exit_code == 0, result.output
    assert_same(outputs(tmp_path), expected)
    rows = list(csv.DictReader((tmp_path / "history.csv").open()))
    assert len(rows) == EPOCHS and len({row["loss"] for row in rows}) == EPOCHS  # it trained: the loss moved


@pytest.mark.parametrize("signal_name", ["KILL", "TERM"])
def test_a_cache_killed_mid_write_is_never_under_its_final_name(workspace, params, tmp_path, signal_name):
    """cache-teacher writes chunk after chunk into a temporary directory: killed after its 3rd chunk
    (of 8), there is no cache; run again, it writes the same files as a run never interrupted."""
    values = yaml.safe_load(params.read_text())
    values["cache"]["chunk"] = 128
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(values))
    args = ["cache-teacher", "--data", str(workspace / "data"), "--checkpoint", str(workspace / "t.pt"), "--out", str(tmp_path / "cache"), "--params", str(tmp_path / "params.yaml")]
    killed = interrupted(signal_name, "chunk", 3, args)
    assert killed.returncode == (-9 if signal_name == "KILL" else 128 + 15), killed.stderr[-3000:]
    assert "interrupted after 384/980 users" in killed.stderr and "wrote" not in killed.stderr
    assert not (tmp_path / "cache").exists()
    leftovers = [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name]
    assert len(leftovers) == (1 if signal_name == "KILL" else 0), leftovers
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name] == []
    reference = CliRunner().invoke(app, [*args[:-4], "--out", str(tmp_path / "reference"), *args[-2:]])
    assert reference.exit_code == 0, reference.output
    written = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert written == sorted(p.name for p in (tmp_path / "reference").iterdir()) and "topk.parquet" in written
    for name in written:
        assert (tmp_path / "cache" / name).read_bytes() == (tmp_path / "reference" / name).read_bytes(), name


def test_the_state_is_keyed_by_the_settings_and_the_code(tmp_path):
    """A change to any rcekd source file (DVC reruns the stage) makes a saved state another run's."""
    code = tmp_path / "rcekd"
    shutil.copytree(ROOT / "rcekd", code, ignore=shutil.ignore_patterns("__pycache__"))
    run = {"stage": "distill", "lr": 0.001, "resume_every": 60}
    key = resume_options(tmp_path / "c.pt", run, code)
    assert key == {"resume_path": tmp_path / "c.pt.resume", "resume_key": key["resume_key"]}
    assert resume_options(tmp_path / "c.pt", {**run, "resume_every": 0}, code) == key  # how often: not what
    assert resume_options(tmp_path / "c.pt", {**run, "lr": 0.01}, code) != key
    (code / "kd" / "rcekd.py").write_text((code / "kd" / "rcekd.py").read_text() + "\n# changed\n")
    assert resume_options(tmp_path / "c.pt", run, code) != key
