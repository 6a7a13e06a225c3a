"""Bad parameters and bad artifacts through the command line: one clear message naming the problem,
exit code 2, and nothing written, before any training starts."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import yaml
from test_methods_cli import workspace  # noqa: F401 (the module-scoped fixture: a tiny real pipeline)
from typer.testing import CliRunner

from stages.cli import app


def set_key(params: dict, dotted: str, value) -> None:
    *parents, last = dotted.split(".")
    node = params
    for key in parents:
        node = node[key]
    node[last] = value


def distill(root: Path, tmp_path: Path, params: Path, *, method: str = "ce", cache: Path | None = None,
            teacher: Path | None = None, student: str = "mf"):
    """`rcekd distill` on the tiny pipeline in `root`, writing under tmp_path/out."""
    args = [
        "distill", "--method", method, "--student", student, "--data", str(root / "data"),
        "--cache", str(cache or root / "cache"), "--out", str(tmp_path / "out" / "checkpoint.pt"),
        "--history", str(tmp_path / "out" / "history.csv"), "--params", str(params),
    ]
    if teacher is not None:
        args += ["--teacher", str(teacher)]
    return CliRunner().invoke(app, args)


BAD_PARAMS = [
    ("sed", 0, r"unknown parameter 'sed' \(did you mean 'seed'\?\)"),
    ("train.lrr", 0.01, r"unknown parameter 'train.lrr' \(did you mean 'train.lr'\?\)"),
    ("train.batch_size", "big", r"train.batch_size = 'big'; expected an integer >= 1"),
    ("train.patience", 0, r"train.patience = 0; expected an integer >= 1"),
    ("device", "gpu", r"device = 'gpu'; expected auto, cpu, cuda or cuda:<index>"),
    ("split.train", 0.95, r"split.train \+ split.valid = 1.05; expected < 1"),
    ("split.valid", 1.5, r"split.valid = 1.5; expected a number in \(0, 1\)"),
    ("dataset", "citeulik", r"dataset names no section 'datasets.citeulik' \(did you mean 'datasets.citeulike'\?\)"),
    ("grid.methods", ["ce", "rrdd"], r"grid.methods names 'rrdd', which is not a section of kd"),
    ("grid.seeds", [0, 0], r"grid.seeds = \[0, 0\]; expected a non-empty list of distinct integers >= 0"),
    ("kd.ce.weight", -1, r"kd.ce.weight = -1; expected a number >= 0"),
    ("kd.ce.kk", 5, r"unknown parameter kd.ce.kk; did you mean 'k'\?"),
    ("kd.ce.k", 10**6, r"kd.ce.k = 1000000 exceeds the \d+ items"),
    ("backbones.mf.student.patience", 0, r"backbones.mf.student.patience = 0; expected an integer >= 1 \(or leave it out: train.patience\)"),
    ("backbones.mf.student.model.dimm", 8, r"unknown parameter backbones.mf.student.model.dimm; did you mean 'dim'\?"),
    ("diagnostics.users", -5, r"diagnostics.users = -5; expected an integer >= 1"),
    ("split.mode", "random", r"split.mode = 'random'; expected chronological, holdout or leave_one_out"),
    ("train.select", "mrr@20", r"train.select = 'mrr@20'; expected ndcg@20 or recall@20"),
    ("evaluate.ks", [10, 50], r"evaluate.ks = \[10, 50\]; expected a list of distinct integers >= 1 with 20 among them"),
    ("evaluate.valid_in_test_input", "yes", r"evaluate.valid_in_test_input = 'yes'; expected true or false"),
]


@pytest.mark.parametrize("key, value, message", BAD_PARAMS, ids=[case[0] for case in BAD_PARAMS])
def test_bad_parameter_is_refused_before_any_work(workspace, tmp_path, key, value, message):  # noqa: F811
    params = yaml.safe_load((workspace / "params.yaml").read_text())
    set_key(params, key, value)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    result = distill(workspace, tmp_path, tmp_path / "params.yaml")
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error: ") and re.search(message, result.output), result.output
    assert not (tmp_path / "out").exists()  # nothing written


@pytest.mark.parametrize("student, parts, message", [
    ("mf", ["nkd", "fd"], r"kd.mkd.parts = \['nkd', 'fd'\]: expected a non-empty subset of nkd, cpd, sld"),
    ("hstu", ["nkd", "cpd", "sld"], r"kd.mkd \(mkd\) reads the batch's training pairs: the student must be a pairwise backbone"),
])
def test_mkd_refuses_bad_parts_and_a_sequence_student(workspace, tmp_path, student, parts, message):  # noqa: F811
    params = yaml.safe_load((workspace / "params.yaml").read_text())
    params["kd"]["mkd"].update(parts=parts, top_n=10, sld={"q": 10, "pool": 20})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    result = distill(workspace, tmp_path, tmp_path / "params.yaml", method="mkd", student=student)
    assert result.exit_code == 2 and re.search(message, result.output), result.output
    assert not (tmp_path / "out").exists()


def test_every_problem_is_listed_at_once(workspace, tmp_path):  # noqa: F811
    params = yaml.safe_load((workspace / "params.yaml").read_text())
    params["sed"], params["train"]["lr"], params["device"] = 1, "fast", "tpu"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    result = distill(workspace, tmp_path, tmp_path / "params.yaml")
    assert result.exit_code == 2 and "3 problems" in result.output
    for fragment in ("'sed'", "train.lr = 'fast'", "device = 'tpu'"):
        assert fragment in result.output


def test_params_that_are_not_yaml(workspace, tmp_path):  # noqa: F811
    (tmp_path / "params.yaml").write_text("train: {lr: 0.1\nseed: [\n")
    result = distill(workspace, tmp_path, tmp_path / "params.yaml")
    assert result.exit_code == 2 and "not valid YAML" in result.output and str(tmp_path / "params.yaml") in result.output


def test_exponent_floats_as_dvc_writes_them_are_numbers(tmp_path):
    """`dvc exp run -S backbones.mf.student.weight_decay=0.00001` writes `weight_decay: 1e-05`, which
    YAML 1.1 loaders read as text; the stages read it as the number DVC meant."""
    from stages.params import load_params

    text = (Path(__file__).resolve().parents[1] / "params.yaml").read_text()
    path = tmp_path / "params.yaml"
    params = load_params(Path(__file__).resolve().parents[1] / "params.yaml")
    old = f"      weight_decay: {params['backbones']['mf']['student']['weight_decay']}"
    assert text.count(old) >= 1
    path.write_text(text.replace(old, "      weight_decay: 1e-05", 1))  # the first: MF's student
    assert "weight_decay: 1e-05" in path.read_text()
    assert load_params(path)["backbones"]["mf"]["student"]["weight_decay"] == 1e-05


def test_cache_of_another_teacher_is_refused(workspace, tmp_path):  # noqa: F811
    """--teacher given: the cache must have been written from that checkpoint; both hashes named."""
    other = tmp_path / "other.pt"
    shutil.copy(workspace / "t.pt", other)
    with open(other, "ab") as handle:
        handle.write(b"\0")  # another file, another sha256
    result = distill(workspace, tmp_path, workspace / "params.yaml", teacher=other)
    assert result.exit_code == 2 and "teacher checkpoint sha256" in result.output and "the teacher given has" in result.output
    assert not (tmp_path / "out").exists()


def test_truncated_cache_is_refused(workspace, tmp_path):  # noqa: F811
    cache = tmp_path / "cache"
    shutil.copytree(workspace / "cache", cache)
    scores = cache / "scores.f32"
    with open(scores, "r+b") as handle:
        handle.truncate(scores.stat().st_size - 8)
    result = distill(workspace, tmp_path, workspace / "params.yaml", cache=cache)
    assert result.exit_code == 2 and "scores.f32 has" in result.output and "truncated" in result.output
    assert not (tmp_path / "out").exists()


def test_checkpoint_of_another_dataset_is_refused(workspace, tmp_path):  # noqa: F811
    """A student checkpoint evaluated against data of another split: both fingerprints named."""
    data = tmp_path / "data"
    shutil.copytree(workspace / "data", data)
    meta = json.loads((data / "meta.json").read_text())
    meta["fingerprint"] = "0" * len(meta["fingerprint"])
    (data / "meta.json").write_text(json.dumps(meta))
    result = CliRunner().invoke(app, [
        "evaluate", "--data", str(data), "--checkpoint", str(workspace / "t.pt"), "--out", str(tmp_path / "m.json"),
        "--params", str(workspace / "params.yaml"),
    ])
    assert result.exit_code == 2 and "fingerprint" in result.output, result.output
    assert not (tmp_path / "m.json").exists()


@pytest.mark.parametrize("stage", ["train", "distill"])
def test_a_diverging_run_stops_with_the_run_epoch_and_parts_named(workspace, tmp_path, stage):  # noqa: F811
    """Adam at lr 1e30 sends the scores past float32's range in the first epoch: one error line naming
    the run, the epoch and the loss parts; exit 2; no checkpoint."""
    params = yaml.safe_load((workspace / "params.yaml").read_text())
    params["train"].update(lr=1e30, max_epochs=3, patience=3)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    if stage == "distill":
        result = distill(workspace, tmp_path, tmp_path / "params.yaml")
        run = "distill ce (student mf)"
    else:
        result = CliRunner().invoke(app, [
            "train", "--role", "student", "--backbone", "mf", "--data", str(workspace / "data"),
            "--out", str(tmp_path / "out" / "checkpoint.pt"), "--history", str(tmp_path / "out" / "history.csv"),
            "--params", str(tmp_path / "params.yaml"),
        ])
        run = "student mf"
    assert result.exit_code == 2, result.output
    line = [text for text in result.output.splitlines() if text.startswith("error: ")][-1]
    assert re.search(rf"{re.escape(run)}: epoch \d+: non-finite loss part 'base'.* \(epoch sums .*'base': (nan|inf)", line), line
    assert not (tmp_path / "out" / "checkpoint.pt").exists()
