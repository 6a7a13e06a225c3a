"""The report over seeds (rcekd/report.py) against numpy and scipy on synthetic metrics files."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import stats

from rcekd.report import METRICS, collect, grid_runs, markdown, summarize

BASELINES = ["student", "ce", "cd", "rrd"]

RNG = np.random.default_rng(7)
SEEDS = [0, 1, 2]


def write_metrics(root, name: str, seed: int | None, level: float) -> dict:
    test = {m: float(level + RNG.normal(scale=0.002)) for m in METRICS}
    path = root / (f"{name}.json" if seed is None else f"{name}/seed_{seed}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"test": test, "valid": test, "best_epoch": 3, "epochs_run": 9,
                                "peak_rss_mb": 700.0}))
    history = path.with_suffix("") / "history.csv" if seed is not None else root / name / "history.csv"
    history.parent.mkdir(parents=True, exist_ok=True)
    extra = seed or 0
    history.write_text("epoch,valid_ndcg@20,train_seconds\n" + "".join(
        f"{e},0.01,{t}\n" for e, t in enumerate([0.5 + extra, 1.0 + extra, 9.0], 1)))
    return test


@pytest.fixture
def grid(tmp_path):
    levels = {"student_mf": 0.02, "mf_to_mf/ce": 0.018, "mf_to_mf/rrd": 0.03, "mf_to_mf/rcekd": 0.036,
              "mf_to_mf/rcekd_wo_t": 0.05}  # an ablation that "wins" must not count as a baseline
    values = {"teacher_mf": {0: write_metrics(tmp_path, "teacher_mf", None, 0.04)}}
    for name, level in levels.items():
        values[name] = {seed: write_metrics(tmp_path, name, seed, level) for seed in SEEDS}
    runs = grid_runs(["mf"], ["mf"], ["ce", "rrd", "rcekd", "rcekd_wo_t"], SEEDS)
    return tmp_path, runs, values


def test_summary_against_numpy_and_scipy(grid):
    root, runs, values = grid
    report = summarize(collect(root, root, runs), [("mf", "mf")], target="rcekd", baselines=BASELINES)
    block = report["mf_to_mf"]
    assert set(block["runs"]) == {"student", "ce", "rrd", "rcekd", "rcekd_wo_t"}
    for metric in METRICS:
        series = {name: np.array([values[name][s][metric] for s in SEEDS]) for name in values if name != "teacher_mf"}
        rcekd = block["runs"]["rcekd"][metric]
        assert rcekd["mean"] == pytest.approx(series["mf_to_mf/rcekd"].mean())
        assert rcekd["std"] == pytest.approx(series["mf_to_mf/rcekd"].std(ddof=1))
        best = max(["student_mf", "mf_to_mf/ce", "mf_to_mf/rrd"], key=lambda n: series[n].mean())
        versus = block["vs_best_baseline"][metric]
        assert versus["baseline"] == best.split("/")[-1] == "rrd"
        assert versus["improvement"] == pytest.approx(series["mf_to_mf/rcekd"].mean() / series[best].mean() - 1)
        assert versus["p_value"] == pytest.approx(stats.ttest_rel(series["mf_to_mf/rcekd"], series[best]).pvalue)
        assert versus["paired_seeds"] == 3
        assert set(block["vs_each_baseline"]) == {"student", "ce", "rrd"}  # not the ablation, not the target
        for name in ("student_mf", "mf_to_mf/ce", "mf_to_mf/rrd"):
            each = block["vs_each_baseline"][name.split("/")[-1].replace("student_mf", "student")][metric]
            assert each["p_value"] == pytest.approx(stats.ttest_rel(series["mf_to_mf/rcekd"], series[name]).pvalue)
            assert each["improvement"] == pytest.approx(series["mf_to_mf/rcekd"].mean() / series[name].mean() - 1)
    assert block["runs"]["rcekd"]["train_seconds"] == pytest.approx(np.mean([1.0 + s for s in SEEDS]))
    assert report["teachers"]["teacher_mf"]["ndcg@20"]["std"] is None  # one run
    text = markdown(report, title="t", seeds=SEEDS)
    assert "| rcekd | " in text and "| best baseline | rrd | rrd | rrd | rrd |" in text and "| Improv. of rcekd |" in text
    assert "rcekd against each baseline" in text and text.count("\n| ce | ") == 2  # its row, and its comparison
    assert text.count(" ± ") == 5 * len(METRICS) + 1  # every run of the setting but the teacher, and the caption
    json.dumps(report)  # a valid DVC metrics file


def test_one_seed_gives_no_test(grid):
    root, _, _ = grid
    report = summarize(collect(root, None, grid_runs(["mf"], ["mf"], ["ce", "rcekd"], [0])), [("mf", "mf")],
                       target="rcekd", baselines=BASELINES)
    versus = report["mf_to_mf"]["vs_best_baseline"]["ndcg@20"]
    assert versus["p_value"] is None and versus["paired_seeds"] == 1 and versus["improvement"] is not None
    assert "| p-value | n/a |" in markdown(report, title="t", seeds=[0])


def test_history_without_the_timing_column_is_named(grid):
    root, runs, _ = grid
    (root / "mf_to_mf/ce/seed_1/history.csv").write_text("epoch,valid_ndcg@20\n1,0.01\n")
    with pytest.raises(ValueError, match=r"ce/seed_1/history.csv: missing column\(s\) train_seconds"):
        collect(root, root, runs)


def test_missing_run_is_named(grid):
    root, _, _ = grid
    with pytest.raises(FileNotFoundError, match="mf_to_mf/dcd/seed_0.json"):
        collect(root, None, grid_runs(["mf"], ["mf"], ["dcd"], [0]))
