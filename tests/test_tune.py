"""`rcekd tune`: trials drawn from a declared space, run as queued DVC experiments up to the training
stage (validation only), collected from each experiment's own history."""

from __future__ import annotations

import csv
import io
import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from stages.cli import app
from stages.params import ParamsError
from stages.tune import best_of, selection, trials
from tests.dvc_repo import make_repo, ran_stages, run
from tests.test_parallel_dvc import GRID


def test_trials_are_the_grid_or_a_seeded_draw_of_it() -> None:
    space = {"a": [1, 2], "b": ["x", "y", "z"]}
    assert trials(space, 8, 0) == [{"a": a, "b": b} for a in (1, 2) for b in ("x", "y", "z")]
    drawn = trials(space, 4, 0)
    assert len(drawn) == 4 and drawn == trials(space, 4, 0) and all(d in trials(space, 8, 0) for d in drawn)
    assert any(trials(space, 4, seed) != drawn for seed in range(1, 6))  # the draw follows the seed


def test_best_of_takes_the_first_epoch_reaching_the_best() -> None:
    history = [{"epoch": "1", "valid_ndcg@20": "0.1"}, {"epoch": "2", "valid_ndcg@20": "0.3"},
               {"epoch": "3", "valid_ndcg@20": "0.3"}, {"epoch": "4", "valid_ndcg@20": "0.2"}]
    assert best_of(history) == (0.3, 2, 4)
    history = [{**row, "valid_recall@20": value} for row, value in zip(history, ("0.5", "0.2", "0.6", "0.6"))]
    assert best_of(history, "valid_recall@20") == (0.6, 3, 4)


def test_a_search_ranks_by_its_protocols_selection_metric() -> None:
    params = {"train": {"select": "ndcg@20"}}
    assert selection(params, {"kd.ce.weight": [1, 10]}, "here") == "valid_ndcg@20"
    assert selection(params, {"train.select": ["recall@20"], "split.mode": ["holdout"]}, "here") == "valid_recall@20"  # MKD's
    assert selection({"train": {"select": "recall@20"}}, {}, "here") == "valid_recall@20"
    with pytest.raises(ParamsError, match=r"here: a search's train.select must be one value"):
        selection(params, {"train.select": ["ndcg@20", "recall@20"]}, "here")


def test_tune_refuses_a_csv_of_another_metric_and_direct_trials_of_another_protocol(tmp_path: Path, monkeypatch) -> None:
    params = yaml.safe_load(Path("params.yaml").read_text())
    params["tuning"]["spaces"] = {"ce": {"kd.ce.weight": [1]}, "holdout": {"split.mode": ["holdout"], "kd.ce.weight": [1]}}
    monkeypatch.chdir(tmp_path)
    Path("params.yaml").write_text(yaml.safe_dump(params))
    out = Path("ce.csv")  # a trial of the same values, selected on validation NDCG@20 ...
    out.write_text("trial,kd.ce.weight,valid_ndcg@20,best_epoch,epochs,experiment\nt0,1,0.05,3,5,e\n")
    params["train"]["select"] = "recall@20"  # ... and a search that selects on Recall@20
    Path("recall.yaml").write_text(yaml.safe_dump(params))
    done = CliRunner().invoke(app, ["tune", "--method", "ce", "--out", str(out), "--params", "recall.yaml"])
    assert done.exit_code == 2 and "ce.csv: trials t0 were selected on valid_ndcg@20, this search on valid_recall@20" in done.output
    done = CliRunner().invoke(app, ["tune", "--method", "ce", "--space", "holdout", "--direct", "--out", "h.csv"])
    assert done.exit_code == 2 and "tuning.spaces.holdout sets split.mode, which the processed data" in done.output, done.output
    assert sorted(path.name for path in tmp_path.iterdir()) == ["ce.csv", "params.yaml", "recall.yaml"]  # nothing written


def test_tune_runs_validation_only_trials_and_ranks_them(tmp_path: Path) -> None:
    space = {("tuning",): {"seed": 0, "trials": 2, "spaces": {"rcekd": {"kd.rcekd.student_weight_decay": [0.001, 0.00001]}}}}
    repo = make_repo(tmp_path / "repo", {**GRID, **space}, users=300)
    run(["dvc", "repro", "cache_teacher"], repo)
    output = run(["rcekd", "tune", "--method", "rcekd", "--jobs", "2"], repo)
    assert "2 trials of 2" in output and "-S '++kd.rcekd.student_weight_decay=" in output, output
    upstream = re.search(r"^\S+\s+(tune-rcekd-\S+-upstream)\s+.*Success$", run(["dvc", "queue", "status"], repo), re.M)
    assert upstream and not ran_stages(run(["dvc", "queue", "logs", upstream[1]], repo)), output  # the teacher: the workspace's
    rows = list(csv.DictReader((repo / "artifacts/tuning/citeulike/mf_to_mf/rcekd.csv").read_text().splitlines()))
    assert sorted(float(row["kd.rcekd.student_weight_decay"]) for row in rows) == [0.00001, 0.001]  # a key params.yaml lacks
    assert float(rows[0]["valid_ndcg@20"]) >= float(rows[1]["valid_ndcg@20"])  # best first
    for row in rows:
        log = run(["dvc", "queue", "logs", row["trial"]], repo)
        assert ran_stages(log) == {"distill@mf-mf-rcekd-0"}, log  # no evaluate stage: test never computed
        history = subprocess.run(["git", "show", f"{row['experiment']}:artifacts/citeulike/mf_to_mf/rcekd/seed_0/history.csv"],
                                 cwd=repo, capture_output=True, text=True, check=True).stdout
        best = max(float(r["valid_ndcg@20"]) for r in csv.DictReader(io.StringIO(history)))
        assert float(row["valid_ndcg@20"]) == best and int(row["epochs"]) == 2
        params = json.loads(run(["dvc", "exp", "show", "--json"], repo))
        assert row["experiment"] in json.dumps(params)
    # A rerun skips what the CSV holds. A trial whose experiment finished after its search stopped (a session
    # ended with it in the queue; the next one's workers ran it) is taken from its experiment, not run again.
    again = run(["rcekd", "tune", "--method", "rcekd", "--jobs", "2"], repo)
    assert "2 already in" in again and "queued" not in again, again
    out = repo / "artifacts/tuning/citeulike/mf_to_mf/rcekd.csv"
    whole = out.read_text()
    out.write_text("\n".join(whole.splitlines()[:2]) + "\n")
    adopted = run(["rcekd", "tune", "--method", "rcekd", "--jobs", "2"], repo)
    assert "(queued by an earlier run, finished since)" in adopted and "queued experiments" not in adopted, adopted
    assert out.read_text() == whole
    # An interrupted search whose trial left nothing (here: its row and experiment lost) runs only that one.
    out.write_text("\n".join(whole.splitlines()[:2]) + "\n")
    run(["dvc", "exp", "remove", rows[1]["trial"]], repo)
    resumed = run(["rcekd", "tune", "--method", "rcekd", "--jobs", "2"], repo)
    assert "1 already in" in resumed and "run-queue: 1 queued" in resumed, resumed
    rows_after = list(csv.DictReader(out.read_text().splitlines()))
    assert rows[0]["trial"] in {row["trial"] for row in rows_after}  # the kept trial stays, not run again
    assert sorted(float(row["kd.rcekd.student_weight_decay"]) for row in rows_after) == [0.00001, 0.001]
    # --direct runs the same trials without DVC (a machine without it): the same command on the same
    # params, so the same rows, labelled with the device instead of an experiment.
    direct = run(["rcekd", "tune", "--method", "rcekd", "--jobs", "2", "--direct", "--out", "direct.csv"], repo)
    assert "2 trials of 2" in direct and "queued" not in direct, direct
    direct_rows = list(csv.DictReader((repo / "direct.csv").read_text().splitlines()))
    key = "kd.rcekd.student_weight_decay"
    assert {(row[key], row["valid_ndcg@20"], row["epochs"]) for row in direct_rows} == \
        {(row[key], row["valid_ndcg@20"], row["epochs"]) for row in rows_after}
    assert {row["experiment"] for row in direct_rows} == {"direct:cpu"}
