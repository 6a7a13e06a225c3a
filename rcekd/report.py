"""The results of a grid, as the paper reports them: mean ± std over seeds, the improvement of RCE-KD
over the best baseline with a paired t-test, the cost of each method, and the figures' data.

Runs are named as in the metrics directory: `teacher_<b>` (one run, the teacher's seed),
`student_<s>/seed_<n>` (the student alone) and `<t>_to_<s>/<method>/seed_<n>`. Within a setting
`<t>_to_<s>`, the target (RCE-KD) and the baselines are given by name (`student` = the student alone);
a run that is neither (an ablation, full CE) is listed but not compared. The best baseline is chosen
per metric by its mean; the t-test pairs the two runs of each seed (scipy.stats.ttest_rel, two-sided)
and needs two seeds or more. The cost columns: the median over epochs of the seconds of an epoch's
training (the method's per-epoch preparation and the steps; validation and diagnostics left out), and
the training run's peak resident (and GPU) memory.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from rcekd.io import read_json

METRICS = ("recall@10", "ndcg@10", "recall@20", "ndcg@20")
COST = ("train_seconds", "peak_rss_mb", "peak_gpu_mb")
HISTORY = ("epoch", "valid_ndcg@20", "train_seconds")  # columns every run's history.csv must have


@dataclass
class Run:
    """One row of the table: a run name and its metrics records by seed."""

    name: str  # teacher_mf, student_mf, mf_to_mf/rcekd
    records: dict[int, dict] = field(default_factory=dict)

    def values(self, metric: str) -> dict[int, float]:
        return {seed: record["test"][metric] for seed, record in self.records.items()}

    def summary(self) -> dict:
        out: dict = {"seeds": len(self.records)}
        for metric in METRICS:
            out[metric] = mean_std(list(self.values(metric).values()))
        for key in COST:
            costs = [r[key] for r in self.records.values() if key in r]
            if costs:
                out[key] = float(np.mean(costs))
        return out


def grid_runs(teachers: list[str], students: list[str], methods: list[str], seeds: list[int]) -> list[tuple[str, int | None]]:
    """(run name, seed) of every evaluated run of a grid; the teacher has one run (seed None)."""
    runs: list[tuple[str, int | None]] = [(f"teacher_{t}", None) for t in teachers]
    runs += [(f"student_{s}", seed) for s in students for seed in seeds]
    runs += [(f"{t}_to_{s}/{m}", seed) for t in teachers for s in students for m in methods for seed in seeds]
    return runs


def run_path(root: str | Path, name: str, seed: int | None) -> Path:
    """Where a run's files live below `root`: <name>/seed_<n> (or <name> for a teacher)."""
    return Path(root) / name / (f"seed_{seed}" if seed is not None else "")


def collect(metrics_dir: str | Path, runs_dir: str | Path | None, runs: list[tuple[str, int | None]]) -> dict[str, Run]:
    """{run name: Run} from the evaluate stage's JSON files (and, with `runs_dir`, each run's median
    training seconds per epoch from its history); a missing or malformed file is an error naming it."""
    out: dict[str, Run] = {}
    for name, seed in runs:
        path = run_path(metrics_dir, name, seed).with_suffix(".json") if seed is not None else Path(metrics_dir) / f"{name}.json"
        record = read_json(path)
        if not isinstance(record.get("test"), dict) or any(m not in record["test"] for m in METRICS):
            raise ValueError(f"{path}: expected test metrics {', '.join(METRICS)} (an evaluate stage's output)")
        if runs_dir is not None:
            history = read_rows(run_path(runs_dir, name, seed) / "history.csv", HISTORY)
            record = {**record, "train_seconds": float(np.median([float(row["train_seconds"]) for row in history]))}
        out.setdefault(name, Run(name)).records[seed if seed is not None else 0] = record
    return out


def mean_std(values: list[float]) -> dict[str, float | None]:
    """Mean and sample standard deviation (ddof = 1; None with one value)."""
    return {
        "mean": float(np.mean(values)),
        "std": float(np.std(values, ddof=1)) if len(values) > 1 else None,
    }


def compare(target: Run, baselines: dict[str, Run], metric: str) -> dict:
    """The target against the best of {label: run} (highest mean) on one metric: improvement and paired t-test."""
    label, best = max(baselines.items(), key=lambda item: np.mean(list(item[1].values(metric).values())))
    ours, theirs = target.values(metric), best.values(metric)
    seeds = sorted(set(ours) & set(theirs))
    a, b = [ours[s] for s in seeds], [theirs[s] for s in seeds]
    p_value = None
    if len(seeds) >= 2:
        from scipy import stats  # here, not at import: every `rcekd` command imports this module, only the report tests

        p = float(stats.ttest_rel(a, b).pvalue)
        p_value = p if math.isfinite(p) else None  # identical differences: no test
    mean_ours, mean_best = float(np.mean(list(ours.values()))), float(np.mean(list(theirs.values())))
    return {
        "baseline": label,
        "ours": mean_ours,
        "best_baseline": mean_best,
        "improvement": mean_ours / mean_best - 1 if mean_best > 0 else None,
        "p_value": p_value,
        "paired_seeds": len(seeds),
    }


def summarize(runs: dict[str, Run], settings: list[tuple[str, str]], *, target: str, baselines: list[str]) -> dict:
    """The report as one JSON-able dict (a DVC metrics file): per setting, every run's summary and the
    target method against the best of `baselines` present (`student` = the student alone) on every metric."""
    report: dict = {"teachers": {name: run.summary() for name, run in runs.items() if name.startswith("teacher_")}}
    for teacher, student in settings:
        setting = f"{teacher}_to_{student}"
        members = {name.split("/")[-1]: run for name, run in runs.items() if name.startswith(f"{setting}/")}
        alone = runs.get(f"student_{student}")
        block: dict = {"runs": {}}
        if alone is not None:
            block["runs"]["student"] = alone.summary()
        block["runs"].update({method: run.summary() for method, run in members.items()})
        candidates = {**members, **({"student": alone} if alone is not None else {})}
        present = {name: candidates[name] for name in baselines if name in candidates and name != target}
        if target in members and present:
            block["vs_best_baseline"] = {"target": target, **{m: compare(members[target], present, m) for m in METRICS}}
            block["vs_each_baseline"] = {name: {m: compare(members[target], {name: run}, m) for m in METRICS} for name, run in present.items()}
        report[setting] = block
    return report


def markdown(report: dict, *, title: str, seeds: list[int]) -> str:
    """The report laid out like the paper's Table 1 (plus its Tables 2 and 3's costs)."""
    lines = [
        f"# {title}",
        "",
        f"Test split, full ranking, the checkpoint of the best validation NDCG@20 epoch; mean ± std over "
        f"{len(seeds)} seed(s) {seeds} (the teacher: one run). Costs as in the paper's Tables 2 and 3: "
        "s/epoch and the training run's peak memory (see the note below the tables).",
        "",
    ]
    gpu = any("peak_gpu_mb" in summary for block in report.values() for summary in _summaries(block))
    costs = ["train_seconds", "peak_rss_mb"] + (["peak_gpu_mb"] if gpu else [])
    header = "| run | " + " | ".join(METRICS) + " | seeds | s/epoch | peak RSS MiB |" + (" peak GPU MiB |" if gpu else "")
    rule = "|---|" + "---:|" * (len(METRICS) + 1 + len(costs))
    blank = " |" * (2 + len(costs))  # closes the last metric cell, then empty seeds and cost cells

    def row(name: str, summary: dict) -> str:
        cells = [_mean_std(summary[m]) for m in METRICS]
        cost = [(f"{summary[k]:.2f}" if k == "train_seconds" else f"{summary[k]:.0f}") if k in summary else "" for k in costs]
        return f"| {name} | " + " | ".join(cells) + f" | {summary['seeds']} | " + " | ".join(cost) + " |"

    for setting, block in report.items():
        if setting == "teachers":
            continue
        teacher = setting.split("_to_")[0]
        lines += [f"## {setting.replace('_to_', ' → ')}", "", header, rule]
        if f"teacher_{teacher}" in report["teachers"]:
            lines.append(row(f"teacher ({teacher})", report["teachers"][f"teacher_{teacher}"]))
        lines += [row(name, summary) for name, summary in block["runs"].items()]
        versus = block.get("vs_best_baseline")
        if versus:
            lines.append("| best baseline | " + " | ".join(versus[m]["baseline"] for m in METRICS) + blank)
            lines.append(f"| Improv. of {versus['target']} | " + " | ".join(_percent(versus[m]["improvement"]) for m in METRICS) + blank)
            lines.append("| p-value | " + " | ".join(_p(versus[m]["p_value"]) for m in METRICS)
                         + f" | {versus[METRICS[0]]['paired_seeds']} |" + " |" * len(costs))
        lines.append("")
        each = block.get("vs_each_baseline")
        if each:
            lines += [f"{versus['target']} against each baseline (improvement of the means, paired t-test p-value):", "",
                      "| baseline | " + " | ".join(f"{m} improv. | p" for m in METRICS) + " | seeds |",
                      "|---|" + "---:|---:|" * len(METRICS) + "---:|"]
            lines += [f"| {name} | " + " | ".join(f"{_percent(c[m]['improvement'])} | {_p(c[m]['p_value'])}" for m in METRICS)
                      + f" | {c[METRICS[0]]['paired_seeds']} |" for name, c in each.items()]
            lines.append("")
    lines.append(
        "Improv. = relative change of the target's mean over the best baseline's mean (params `report`); "
        "p-value: paired t-test over seeds (scipy.stats.ttest_rel, two-sided; needs 2 seeds or more). "
        "s/epoch = median seconds of an epoch's training (per-epoch preparation and steps; validation left out)."
    )
    return "\n".join(lines) + "\n"


def _summaries(block: dict) -> list[dict]:
    return list(block.get("runs", block).values()) if isinstance(block, dict) else []


def _mean_std(value: dict) -> str:
    return f"{value['mean']:.4f}" + (f" ± {value['std']:.4f}" if value["std"] is not None else "")


def _percent(value: float | None) -> str:
    return "" if value is None else f"{100 * value:+.2f}%"


def _p(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3g}"


# The figures: CSV files drawn by the plot definitions of dvc.yaml.


def read_rows(path: Path, columns: tuple[str, ...]) -> list[dict]:
    """The rows of a run's CSV (history or diagnostics), checked for the columns the report reads."""
    if not path.exists():
        raise FileNotFoundError(f"{path}: file not found (written by the run's train or distill stage)")
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in columns if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: missing column(s) {', '.join(missing)} (has {reader.fieldnames}); rerun its stage")
        return list(reader)


def figure_tables(runs_dir: str | Path, runs: list[tuple[str, int | None]]) -> dict[str, list[dict]]:
    """{file name: rows} of every figure, from the runs' histories and diagnostics below `runs_dir`:
    valid_ndcg (every run), train_ndcg (Fig. 5), a_overlap (Table 7, RCE-KD runs), s_u (Fig. 10, summed
    over seeds) and ranks (Fig. 2, the first seed)."""
    tables: dict[str, list[dict]] = {name: [] for name in ("valid_ndcg", "train_ndcg", "a_overlap", "s_u", "ranks")}
    s_u: dict[tuple[str, str, str], int] = {}
    first_seed = min((seed for _, seed in runs if seed is not None), default=None)
    for name, seed in runs:
        where = run_path(runs_dir, name, seed)
        history = read_rows(where / "history.csv", HISTORY)
        label = {"run": name, "seed": "" if seed is None else seed}
        epochs_run = len(history)
        for row in history:
            tables["valid_ndcg"].append({**label, "epoch": int(row["epoch"]), "valid_ndcg@20": float(row["valid_ndcg@20"])})
            if row.get("a_overlap"):  # measured in the epoch's preparation, before its steps
                tables["a_overlap"].append({
                    **label, "epoch": int(row["epoch"]), "training_share": (int(row["epoch"]) - 1) / epochs_run,
                    "a_overlap": float(row["a_overlap"]),
                })
        if "_to_" not in name:
            continue
        diagnostics = where / "diagnostics"
        for row in read_rows(diagnostics / "epochs.csv", ("epoch", "train_ndcg@10")):
            tables["train_ndcg"].append({**label, "epoch": int(row["epoch"]), "train_ndcg@10": float(row["train_ndcg@10"])})
        for row in read_rows(diagnostics / "s_u.csv", ("phase", "s_u", "users")):
            key = (name, row["phase"], row["s_u"])
            s_u[key] = s_u.get(key, 0) + int(row["users"])
        if seed == first_seed:
            tables["ranks"] += [
                {"run": name, "phase": row["phase"], "teacher_rank": int(row["teacher_rank"]), "student_rank": int(row["student_rank"])}
                for row in read_rows(diagnostics / "ranks.csv", ("phase", "teacher_rank", "student_rank"))
            ]
    totals: dict[tuple[str, str], int] = {}
    for (name, phase, _), users in s_u.items():
        totals[(name, phase)] = totals.get((name, phase), 0) + users
    tables["s_u"] = [
        {"run": name, "phase": phase, "s_u": float(value), "user_share": users / max(totals[(name, phase)], 1)}
        for (name, phase, value), users in s_u.items()
    ]
    return tables


def write_figures(directory: Path, tables: dict[str, list[dict]]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for name, rows in tables.items():
        with open(directory / f"{name}.csv", "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]) if rows else ["run"])
            writer.writeheader()
            for row in rows:
                writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
