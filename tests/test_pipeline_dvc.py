"""End to end: the real DVC pipeline on a small configuration in a temporary git repository.

`dvc repro` builds everything; `dvc exp run -S` on one RCE-KD parameter reruns only that method's
distill stage and what follows it; `dvc metrics diff` shows the changed metric.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from tests.dvc_repo import ROOT, make_repo, ran_stages, run

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


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    return make_repo(tmp_path_factory.mktemp("pipeline"), SMALL)


BACKBONES = ("mf", "lightgcn", "hstu")


def test_repro_builds_every_run(repo: Path) -> None:
    output = run(["dvc", "repro"], repo)
    expected = {"preprocess", "report"}
    for backbone in BACKBONES:
        expected |= {f"train_teacher@{backbone}", f"cache_teacher@{backbone}", f"train_student@{backbone}-0"}
    expected |= {f"distill@{t}-{s}-{m}-0" for t in BACKBONES for s in BACKBONES for m in ("ce", "rcekd")}
    assert expected <= ran_stages(output)
    metrics = repo / "artifacts/metrics/citeulike"
    names = [f"teacher_{b}" for b in BACKBONES] + [f"student_{b}/seed_0" for b in BACKBONES]
    names += [f"{t}_to_{s}/{m}/seed_0" for t in BACKBONES for s in BACKBONES for m in ("ce", "rcekd")]
    for name in names:
        record = json.loads((metrics / f"{name}.json").read_text())
        assert set(record["test"]) == {f"{m}@{k}" for m in ("precision", "recall", "ndcg") for k in (10, 20)}
        assert 0.0 <= record["test"]["ndcg@20"] <= 1.0
        assert name.startswith("teacher_") or record["peak_rss_mb"] > 50  # the run's own peak memory
    table = (repo / "artifacts/reports/citeulike/results.md").read_text()
    for t in BACKBONES:
        for s in BACKBONES:
            assert f"## {t} → {s}" in table, table
    assert table.count("| rcekd |") == 9 and table.count("| p-value | n/a |") == 9, table  # one seed: no test
    for backbone in BACKBONES:  # a curve and seconds per epoch for every teacher
        timing = (repo / f"artifacts/citeulike/teacher_{backbone}/timing.csv").read_text().splitlines()
        assert timing[0] == "epoch,epoch_seconds,prep_seconds,train_seconds" and len(timing) == 1 + 4
    assert "Data and pipelines are up to date" in run(["dvc", "status"], repo)
    run(["git", "add", "-A"], repo)
    run(["git", "commit", "-qm", "results"], repo)


def test_exp_run_reruns_only_the_changed_method(repo: Path) -> None:
    output = run(["dvc", "exp", "run", "-S", "kd.rcekd.weight=100"], repo)
    ran = ran_stages(output)
    rcekd_cells = {f"{stage}@{t}-{s}-rcekd-0" for stage in ("distill", "evaluate") for t in BACKBONES for s in BACKBONES}
    assert rcekd_cells <= ran, output
    assert ran <= rcekd_cells | {"report"}, ran

    diff = json.loads(run(["dvc", "metrics", "diff", "--json"], repo))
    changed = diff["artifacts/metrics/citeulike/mf_to_mf/rcekd/seed_0.json"]
    assert any(entry.get("diff") not in (None, 0) for entry in changed.values()), changed
    summary = diff["artifacts/reports/citeulike/results.json"]  # every method in one table
    assert any(key.startswith("mf_to_mf.runs.rcekd.") and entry.get("diff") for key, entry in summary.items()), summary
    every = json.loads(run(["dvc", "metrics", "diff", "--all", "--json"], repo))["artifacts/reports/citeulike/results.json"]
    assert {f"{t}_to_{s}.runs.{m}.ndcg@20.mean" for t in BACKBONES for s in BACKBONES for m in ("student", "ce", "rcekd")} <= set(every)
    for unchanged in ("student_mf/seed_0", "mf_to_mf/ce/seed_0"):
        path = f"artifacts/metrics/citeulike/{unchanged}.json"
        assert path not in diff or not any(entry.get("diff") for entry in diff[path].values())
    assert "kd.rcekd.weight" in run(["dvc", "exp", "show", "--no-pager", "--csv"], repo)


FIGURES = ("valid_ndcg", "train_ndcg", "a_overlap", "s_u", "ranks")


def test_plots_show_renders_every_figure(repo: Path) -> None:
    shown = json.loads(run(["dvc", "plots", "show", "--json"], repo))["data"]
    for figure in FIGURES:  # each figure is drawn from its CSV, with a run label on every point
        drawn = [p["content"]["data"]["values"] for plots in shown.values() for p in plots
                 if f"figures/{figure}.csv" in json.dumps(p["content"]["data"]["values"][:1])]
        assert drawn and drawn[0] and all(point["run"] for point in drawn[0]), (figure, list(shown))
    for backbone in BACKBONES:  # every teacher's curve and its seconds per epoch are plots too
        for name in ("history.csv", "timing.csv"):
            assert f"artifacts/citeulike/teacher_{backbone}/{name}" in shown, (backbone, name)
    run(["rcekd", "html-template", "--out", "page.html"], repo)
    run(["dvc", "plots", "show", "--html-template", "page.html", "-o", "shown"], repo)
    page = (repo / "shown/index.html").read_text()
    assert "cdn.jsdelivr" not in page and "vegaEmbed" in page  # offline: the scripts are inlined
    embeds = re.findall(r"vegaEmbed\('#([^,]*), spec", page)  # a quote in a plot id breaks the script
    assert len(embeds) == len(shown) and all(e.count("'") == 1 and e.endswith("'") for e in embeds), embeds
    assert "paper Fig. 10" in page and "paper Table 7" in page


def test_two_seeds_report_matches_scipy(repo: Path) -> None:
    """The paper's protocol in small: two seeds, mean ± std, improvement over the best baseline and a
    paired t-test, checked against numpy and scipy on the metrics files themselves."""
    output = run(["dvc", "exp", "run", "-S", "grid.seeds=[0,1]", "-S", "grid.teachers=[mf]", "-S", "grid.students=[mf]"], repo)
    assert {"distill@mf-mf-rcekd-1", "train_student@mf-1"} <= ran_stages(output)
    assert "distill@mf-mf-rcekd-0" not in ran_stages(output)  # seed 0 is unchanged
    metrics = repo / "artifacts/metrics/citeulike"
    runs = {"student": "student_mf", "ce": "mf_to_mf/ce", "rcekd": "mf_to_mf/rcekd"}
    values = {
        label: {seed: json.loads((metrics / f"{path}/seed_{seed}.json").read_text())["test"] for seed in (0, 1)}
        for label, path in runs.items()
    }
    report = json.loads((repo / "artifacts/reports/citeulike/results.json").read_text())["mf_to_mf"]
    for metric in ("recall@10", "ndcg@10", "recall@20", "ndcg@20"):
        series = {label: np.array([values[label][seed][metric] for seed in (0, 1)]) for label in runs}
        for label, numbers in series.items():
            assert report["runs"][label][metric]["mean"] == pytest.approx(numbers.mean())
            assert report["runs"][label][metric]["std"] == pytest.approx(numbers.std(ddof=1))
        best = max(("student", "ce"), key=lambda label: series[label].mean())
        versus = report["vs_best_baseline"][metric]
        assert versus["baseline"] == best and versus["paired_seeds"] == 2
        if series[best].mean() > 0:
            assert versus["improvement"] == pytest.approx(series["rcekd"].mean() / series[best].mean() - 1)
        else:  # a tiny run whose baselines hit nothing: no relative change to report
            assert versus["improvement"] is None
        expected = stats.ttest_rel(series["rcekd"], series[best]).pvalue
        assert versus["p_value"] == pytest.approx(expected) if np.isfinite(expected) else versus["p_value"] is None
    table = (repo / "artifacts/reports/citeulike/results.md").read_text()
    assert "| p-value |" in table and "±" in table, table
