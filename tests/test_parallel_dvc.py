"""The grid in parallel, end to end on the real pipeline (a CiteULike-t excerpt, 2 epochs):

(a) on one machine, `rcekd record` runs a 2-seed record on two workers of DVC's experiment queue (one
    experiment per cell, `rcekd run-queue`) after the shared upstream was built once; no experiment
    trains the teacher, each cell's files land in the record's folder, whose report is made from them;
    cut short, the record runs only its missing cells, and a teacher with other weights or changed
    parameters stop it;
(b) on "many machines", two clones sharing a local-directory DVC remote each run one seed and push
    (`dvc push --run-cache`); a third clone pulls and makes the report without training anything.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import yaml

from tests.dvc_repo import make_repo, ran_stages, run

GRID = {
    ("train", "max_epochs"): 2,
    ("train", "patience"): 2,
    ("train", "eval_chunk"): 256,
    ("backbones", "mf", "teacher", "model", "dim"): 16,
    ("backbones", "mf", "student", "model", "dim"): 8,
    ("grid", "methods"): ["rcekd"],
    ("cache", "topk"): 20,
    ("kd", "rcekd", "k"): 10,
    ("kd", "rcekd", "l"): 10,
    ("device",): "cpu",
}
TRAINING = ("train_teacher@", "cache_teacher@", "train_student@", "distill@")
SEEDS = (0, 1)


def trained(stages: set[str]) -> set[str]:
    return {stage for stage in stages if stage.startswith(TRAINING)}


def report_seeds(repo: Path) -> dict[str, int]:
    """Per method of the MF → MF block of the report, how many seeds it averages."""
    results = json.loads((repo / "artifacts/reports/citeulike/results.json").read_text())["mf_to_mf"]["runs"]
    return {method: entry["seeds"] for method, entry in results.items()}


def test_a_record_runs_its_cells_on_two_queue_workers_and_lands_each_one(tmp_path: Path) -> None:
    record = {("records",): {"two": {"set": {"grid.seeds": list(SEEDS), "grid.methods": ["ce", "rcekd"]}}}}
    repo = make_repo(tmp_path / "repo", {**GRID, **record}, users=300)
    upstream = ran_stages(run(["dvc", "repro", "cache_teacher"], repo))
    assert upstream == {"preprocess", "train_teacher@mf", "cache_teacher@mf"}, upstream
    output = run(["rcekd", "record", "--name", "two", "--jobs", "2"], repo)
    assert "2 queued experiments, 2 workers" in output and "0 failed" in output, output  # each round's
    names = re.findall(r"^\S+\s+(record-two-\S+)\s+.*Success$", run(["dvc", "queue", "status"], repo), re.M)
    assert len(names) == 5, names  # the teachers', then one experiment per cell (seed, method)
    prefix = next(name for name in names if name.endswith("-upstream")).removesuffix("-upstream")
    assert not trained(ran_stages(run(["dvc", "queue", "logs", f"{prefix}-upstream"], repo)))  # the teacher: cached
    for seed in SEEDS:  # the first method's cell trains the seed's student alone; the next restores it
        log = run(["dvc", "queue", "logs", f"{prefix}-s{seed}-ce"], repo)
        assert trained(ran_stages(log)) == {f"train_student@mf-{seed}", f"distill@mf-mf-ce-{seed}"}, log
        assert re.search(r"\d+ threads", log)  # each worker's stages run with the threads run-queue gave them
        log = run(["dvc", "queue", "logs", f"{prefix}-s{seed}-rcekd"], repo)
        assert trained(ran_stages(log)) == {f"distill@mf-mf-rcekd-{seed}"}, log

    folder = repo / "results/two"  # every cell's files and lock, checkpoints and caches left out; the report of all
    assert report_seeds(folder) == {"student": 2, "ce": 2, "rcekd": 2}
    meta = json.loads((folder / "record.json").read_text())
    assert meta["set"] == {"grid.seeds": [0, 1], "grid.methods": ["ce", "rcekd"]} and meta["complete"]
    assert set(meta["cells"]) == {"s0-ce", "s0-rcekd", "s1-ce", "s1-rcekd"} and len(meta["teachers"]["mf"]) == 64
    figures = sorted(folder.glob("figures/*.png"))  # dvc.yaml's five plots, drawn from the record's CSVs
    assert len(figures) == meta["figures"] == 5 and all(path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for path in figures)
    assert yaml.safe_load((folder / "params.yaml").read_text())["grid"]["seeds"] == [0, 1]  # the params it ran with
    for seed in SEEDS:
        assert (folder / f"artifacts/metrics/citeulike/mf_to_mf/rcekd/seed_{seed}.json").exists()
        assert (folder / f"artifacts/citeulike/mf_to_mf/rcekd/seed_{seed}/diagnostics/s_u.csv").exists()
        assert (folder / f"artifacts/citeulike/student_mf/seed_{seed}/history.csv").exists()
    assert (folder / "artifacts/metrics/citeulike/teacher_mf.json").exists()
    assert not list(folder.rglob("*.pt")) and not (folder / "artifacts/citeulike/teacher_mf/cache").exists()
    lock = yaml.safe_load((folder / "locks/s1-rcekd.lock").read_text())["stages"]  # the lock of the cell's experiment
    assert "distill@mf-mf-rcekd-1" in lock and "distill@mf-mf-ce-0" not in lock
    # The committed report is what the report code makes of the committed metrics.
    report = folder / "artifacts/reports/citeulike/results.json"
    run(["rcekd", "report", "--params", str(folder / "params.yaml"), "--metrics", str(folder / "artifacts/metrics/citeulike"),
         "--runs", str(folder / "artifacts/citeulike"), "--table", str(tmp_path / "again.md"), "--json", str(tmp_path / "again.json"),
         "--figures", str(tmp_path / "figures")], repo)
    assert (tmp_path / "again.json").read_text() == report.read_text()

    # The same record without DVC (`--direct`, as on a lent GPU machine, which has none): dvc.yaml's commands
    # in a scratch workspace give the same teacher and the same metrics, cell by cell, and touch no DVC output.
    status = run(["dvc", "status"], repo)
    run(["rcekd", "record", "--name", "two", "--direct", "--jobs", "2", "--out", "results/direct"], repo)
    direct = repo / "results/direct"
    landed = json.loads((direct / "record.json").read_text())
    assert landed["teachers"] == meta["teachers"] and landed["complete"] and landed["upstream"] == "direct:cpu"
    assert landed["cells"] == {cell: {"experiment": "direct:cpu"} for cell in meta["cells"]}
    assert not (direct / "locks").exists() and report_seeds(direct) == report_seeds(folder)
    metrics = sorted(path.relative_to(folder) for path in (folder / "artifacts/metrics").rglob("*.json"))
    assert metrics == sorted(path.relative_to(direct) for path in (direct / "artifacts/metrics").rglob("*.json")) and len(metrics) == 7
    for path in metrics:
        ours, theirs = (json.loads((where / path).read_text()) for where in (direct, folder))
        assert (ours["test"], ours.get("best_epoch")) == (theirs["test"], theirs.get("best_epoch")), path
    assert run(["dvc", "status"], repo) == status

    # A record cut short (a session ends; its DVC cache is gone with the machine) runs only the cells
    # record.json lacks, in one round when it holds their seed's student alone, and the same teacher
    # gives the same report.
    before = report.read_text()
    for method in ("ce", "rcekd"):
        del meta["cells"][f"s1-{method}"]
        (folder / f"artifacts/metrics/citeulike/mf_to_mf/{method}/seed_1.json").unlink()
    meta["complete"] = False
    (folder / "record.json").write_text(json.dumps(meta))
    output = run(["rcekd", "record", "--name", "two", "--jobs", "2"], repo)
    assert "2 already in" in output and re.findall(r"(\d+) queued experiments, 2 workers", output) == ["2"], output
    assert report.read_text() == before and json.loads((folder / "record.json").read_text())["complete"]
    # A teacher with other weights than the record's cells' stops it before any cell.
    meta = json.loads((folder / "record.json").read_text())
    meta["teachers"]["mf"] = "0" * 64
    del meta["cells"]["s1-ce"]
    (folder / "record.json").write_text(json.dumps(meta))
    done = subprocess.run(["rcekd", "record", "--name", "two"], cwd=repo, capture_output=True, text=True,
                          env={**os.environ, "DVC_NO_ANALYTICS": "1"})
    assert done.returncode == 2 and "a record's cells share one teacher" in done.stderr, done.stderr
    assert "s1-ce" not in json.loads((folder / "record.json").read_text())["cells"]
    # So does a parameter changed since the record's first cells ran (a method's λ, here).
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["kd"]["ce"]["weight"] = 3
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    done = subprocess.run(["rcekd", "record", "--name", "two"], cwd=repo, capture_output=True, text=True,
                          env={**os.environ, "DVC_NO_ANALYTICS": "1"})
    assert done.returncode == 2 and "params.yaml changed since the record's first cells ran (kd.ce.weight)" in done.stderr, done.stderr


def test_clones_share_a_remote_and_a_third_reports_without_training(tmp_path: Path) -> None:
    origin = make_repo(tmp_path / "origin", GRID, users=300)
    run(["dvc", "remote", "add", "-d", "shared", str(tmp_path / "remote")], origin)
    run(["git", "commit", "-qam", "a shared remote"], origin)
    clones = {name: tmp_path / name for name in ("first", "second", "third")}
    for clone in clones.values():
        run(["git", "clone", "-q", str(origin), str(clone)], tmp_path)

    first = ran_stages(run(["dvc", "exp", "run", "-S", "grid.seeds=[0]"], clones["first"]))
    assert {"train_teacher@mf", "train_student@mf-0", "distill@mf-mf-rcekd-0"} <= first
    run(["rcekd", "push-runs"], clones["first"])

    run(["dvc", "fetch", "--run-cache"], clones["second"])  # the run records (no dvc.lock yet: nothing to check out)
    second = ran_stages(run(["dvc", "exp", "run", "--pull", "-S", "grid.seeds=[1]"], clones["second"]))  # their outputs
    assert trained(second) == {"train_student@mf-1", "distill@mf-mf-rcekd-1"}, second  # the teacher came from the remote
    run(["rcekd", "push-runs"], clones["second"])

    run(["dvc", "fetch", "--run-cache"], clones["third"])
    third = run(["dvc", "exp", "run", "--pull", "-S", "grid.seeds=[0,1]"], clones["third"])
    assert not trained(ran_stages(third)) and "report" in ran_stages(third), third
    assert report_seeds(clones["third"]) == {"student": 2, "rcekd": 2}
    assert (clones["third"] / "artifacts/citeulike/mf_to_mf/rcekd/seed_1/checkpoint.pt").exists()
