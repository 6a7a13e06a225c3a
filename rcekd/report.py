"""The Markdown results table, built from the evaluate stage's metrics JSON files."""

from __future__ import annotations

from pathlib import Path

from rcekd.io import read_json

COLUMNS = ("recall@10", "ndcg@10", "recall@20", "ndcg@20")


def collect(metrics_dir: str | Path) -> dict[str, dict]:
    """{run name: metrics} for every JSON below metrics_dir; the name is its path without '.json'."""
    metrics_dir = Path(metrics_dir)
    runs = {}
    for path in sorted(metrics_dir.rglob("*.json")):
        name = path.relative_to(metrics_dir).with_suffix("").as_posix()
        record = read_json(path)
        if isinstance(record.get("test"), dict):  # skips the dataset statistics (data.json)
            runs[name] = record
    return runs


def results_table(runs: dict[str, dict], *, title: str) -> str:
    """Test metrics per run, with the change against the student alone of the same backbone: run
    `<teacher>_to_<student>/<method>` against `student_<student>`."""
    lines = [
        f"# {title}",
        "",
        "Test split, full ranking, the checkpoint of the best validation NDCG@20 epoch. "
        "Δ = relative change of NDCG@20 against the student alone of the same backbone (`student_<backbone>`).",
        "",
        "| run | " + " | ".join(COLUMNS) + " | Δ NDCG@20 vs student alone | best epoch | s/epoch |",
        "|---|" + "---:|" * (len(COLUMNS) + 3),
    ]
    for name, record in runs.items():
        test = record["test"]
        baseline = runs.get(f"student_{name.split('/')[0].split('_to_')[-1]}") if "_to_" in name else None
        delta = ""
        if baseline is not None and baseline["test"]["ndcg@20"] > 0:
            delta = f"{100 * (test['ndcg@20'] / baseline['test']['ndcg@20'] - 1):+.1f}%"
        seconds = f"{record['seconds_per_epoch']:.2f}" if "seconds_per_epoch" in record else ""
        lines.append(
            f"| {name} | " + " | ".join(f"{test[c]:.4f}" for c in COLUMNS)
            + f" | {delta} | {record.get('best_epoch', '')} | {seconds} |"
        )
    return "\n".join(lines) + "\n"
