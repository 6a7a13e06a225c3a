"""`rcekd readme`: README's result tables, generated from the committed files they report.

A generated block sits between `<!-- readme: KIND PATH -->` and `<!-- readme: end -->`; PATH is relative
to the repository root:
- `run FOLDER`: a pipeline's results (FOLDER holds params.yaml and artifacts/, as the repository root
  does for `make run` and results/<name> for a record): per setting, every run's test Recall@20 and
  NDCG@20 (mean ± std over seeds), its change against the student alone, the paper's Table 1 values
  where they exist (results/paper/table1.csv), best epoch and epochs run; then the target against every
  baseline with its paired t-test. A record of the sequential protocol (split.mode leave_one_out) is
  shown at 10 beside the paper's Table 12 (results/paper/table12.csv), as the paper reports it. A record's
  runs made without DVC (`rcekd record --direct`) are counted by device.
- `datasets FOLDER`: preprocessing's statistics, one row per <dataset>.json.
- `tuning FOLDER`: the searches' CSVs (rcekd tune), one row per method: trials (and how many ran with
  `--direct`, on which device), the chosen values, best validation NDCG@20.
`rcekd readme` makes README.md's blocks and results/table1.md's (the paper's five settings beside its Table 1);
`rcekd readme --check` (a test runs it) fails when either differs from what the files give.
"""

from __future__ import annotations

import csv
import difflib
import re
import statistics
from collections import Counter
from pathlib import Path
from typing import Callable

import typer
import yaml

from rcekd.io import read_json
from rcekd.report import run_path
from stages.tune import best_of, metric_of, selection

BLOCK = re.compile(r"(<!-- readme: (\w+) (\S+) -->\n)(.*?)(<!-- readme: end -->)", re.S)
# The paper's values a run block shows, by protocol: Table 1 at 20 (setting, run, recall@20, ndcg@20); with
# split.mode leave_one_out, the sequential Table 12 at 10 (App. D.1: setting, run, recall@10, ndcg@10)
PAPERS = {False: (20, Path("results/paper/table1.csv")), True: (10, Path("results/paper/table12.csv"))}
NOT_PARAMS = {"trial", "best_epoch", "epochs", "experiment"}  # and the selection column, valid_<metric>


def _cell(value: dict) -> str:
    return f"{value['mean']:.4f}" + (f" ± {value['std']:.4f}" if value["std"] is not None else "")


def _change(ours: float, base: float) -> str:
    return f"{100 * (ours / base - 1):+.1f}%"


def _p(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2g}"


def _history(folder: Path, dataset: str, name: str, seed: int | None) -> list[dict[str, str]]:
    """A run's history.csv rows (artifacts/<dataset>/<name>[/seed_<n>] below `folder`)."""
    return list(csv.DictReader((run_path(folder / "artifacts" / dataset, name, seed) / "history.csv").open()))


def _epochs(folder: Path, dataset: str, name: str, seeds: list[int | None], metric: str) -> str:
    """Best epoch / epochs run, from the runs' histories (the mean over seeds when there are several)."""
    found = [best_of(_history(folder, dataset, name, seed), metric)[1:] for seed in seeds]  # (best epoch, epochs run)
    best, run = (sum(column) / len(found) for column in zip(*found))
    return f"{best:.0f} / {run:.0f}"


def training_hours(folder: Path, dataset: str, runs: list[tuple[str, list[int | None]]]) -> float:
    """The runs' training time in hours: each history's epochs × its median seconds per epoch (a paused
    epoch, SIGSTOP or a suspended machine, would inflate a plain sum)."""
    seconds = 0.0
    for name, seeds in runs:
        for seed in seeds:
            history = _history(folder, dataset, name, seed)
            seconds += len(history) * statistics.median(float(row["epoch_seconds"]) for row in history)
    return seconds / 3600


def run_block(folder: Path) -> str:
    """The tables of one pipeline's report (results.json), as described in the module's docstring."""
    params = yaml.safe_load((folder / "params.yaml").read_text())
    dataset, seeds = params["dataset"], params["grid"]["seeds"]
    k, paper_file = PAPERS[params.get("split", {}).get("mode", "chronological") == "leave_one_out"]
    recall, ndcg = f"recall@{k}", f"ndcg@{k}"
    selected = selection(params, {}, str(folder / "params.yaml"))  # the runs' selection metric
    report = read_json(folder / "artifacts/reports" / dataset / "results.json")
    paper = {(row["setting"], row["run"]): row for row in csv.DictReader(paper_file.open())} if paper_file.exists() else {}
    lines = [f"From `{folder / 'artifacts/reports' / dataset / 'results.json'}` ({len(seeds)} seed(s) {seeds}; test split, full ranking"
             f"{_direct(folder / 'record.json')}):", ""]
    for setting, block in report.items():
        if setting == "teachers":
            continue
        teacher, student = setting.split("_to_")
        runs = {f"teacher ({teacher})": (report["teachers"][f"teacher_{teacher}"], f"teacher_{teacher}", [None])}
        runs |= {name: (summary, f"student_{student}" if name == "student" else f"{setting}/{name}", seeds)
                 for name, summary in block["runs"].items()}
        alone = block["runs"].get("student")
        lines += [f"**{teacher} → {student}**", "",
                  f"| run | test Recall@{k} | test NDCG@{k} | NDCG@{k} vs student | paper R@{k} / N@{k} | best epoch / epochs |",
                  "|---|---:|---:|---:|---:|---:|"]
        for label, (summary, name, run_seeds) in runs.items():
            key = "teacher" if label.startswith("teacher") else label
            theirs = paper.get((setting, key))
            vs = _change(summary[ndcg]["mean"], alone[ndcg]["mean"]) if alone and key != "student" else ""
            lines.append(f"| {label} | {_cell(summary[recall])} | {_cell(summary[ndcg])} | {vs} | "
                         f"{theirs[recall] + ' / ' + theirs[ndcg] if theirs else ''} | {_epochs(folder, dataset, name, run_seeds, selected)} |")
        order = sorted(runs, key=lambda label: -runs[label][0][ndcg]["mean"])
        hours = training_hours(folder, dataset, [(name, run_seeds) for _, name, run_seeds in runs.values()])
        lines += ["", f"By test NDCG@{k} (mean), best first: " + ", ".join(f"`{label}`" for label in order) + ". "
                  f"Training these runs took {hours:.1f} h here, summed over the runs (each one its epochs × its median seconds per epoch).", ""]
        each, best = block.get("vs_each_baseline"), block.get("vs_best_baseline")
        if each:
            target = best["target"]
            lines += [f"`{target}` against each baseline (change of the means; p: paired t-test over seeds, two-sided):", "",
                      f"| baseline | Recall@{k} | p | NDCG@{k} | p |", "|---|---:|---:|---:|---:|"]
            lines += [f"| {name} | {_percent(c[recall])} | {_p(c[recall]['p_value'])} | {_percent(c[ndcg])} | {_p(c[ndcg]['p_value'])} |"
                      for name, c in each.items()]
            lines.append("")
            for metric, label in ((ndcg, f"NDCG@{k}"), (recall, f"Recall@{k}")):
                n = best[metric]
                verdict = ("no test with one seed" if n["p_value"] is None else
                           "significant at p < 0.05" if n["p_value"] < 0.05 else "not significant at p < 0.05")
                lines.append(f"The best baseline by {label} is `{n['baseline']}`: `{target}` changes its {label} by "
                             f"{_percent(n)} (p = {_p(n['p_value'])}, {n['paired_seeds']} paired seeds, {verdict}).")
            lines.append("")
    return "\n".join(lines)


def _direct(record: Path) -> str:
    """A record's runs made without DVC (`rcekd record --direct`), by device: the teachers and the cells."""
    if not record.exists():
        return ""
    meta = read_json(record)
    runs = [meta.get("upstream", "")] + [cell["experiment"] for cell in meta["cells"].values()]
    devices = Counter(run.removeprefix("direct:") for run in runs if run.startswith("direct:"))
    return "".join(f"; {n} of its {len(runs)} runs (the teachers, each cell) with `rcekd record --direct` on {device}"
                   for device, n in devices.items())


def _percent(compared: dict) -> str:
    return "" if compared["improvement"] is None else f"{100 * compared['improvement']:+.1f}%"


def tuning_block(folder: Path) -> str:
    """One row per search CSV of `folder`: the chosen trial (best validation NDCG@20) and the budget spent."""
    lines = [f"From the searches' files in `{folder}/` (validation only; a method's values are the best over its search and its `_edge` search, in params.yaml):", "",
             "| search | trials | best trial's values | best valid NDCG@20 | other trials' range | best epoch / epochs | file |",
             "|---|---:|---|---:|---:|---:|---|"]
    files = sorted(folder.glob("*.csv"), key=lambda path: (not path.stem.startswith("student"), path.stem))
    for path in files:
        rows = list(csv.DictReader(path.open()))
        chosen = rows[0]
        metric = metric_of(chosen)
        values = ", ".join(f"{key.split('.')[-1]} {chosen[key]}" for key in chosen if key not in NOT_PARAMS | {metric})
        others = [float(row[metric]) for row in rows[1:]]
        shown = "" if metric == "valid_ndcg@20" else f" ({metric.removeprefix('valid_')})"  # a search on another metric
        spread = f"{min(others):.4f}–{max(others):.4f}" if others else ""
        direct = Counter(row["experiment"].removeprefix("direct:") for row in rows if row["experiment"].startswith("direct:"))
        where = "".join(f" ({count} on {device})" for device, count in sorted(direct.items()))
        lines.append(f"| {path.stem} | {len(rows)}{where} | {values} | {float(chosen[metric]):.4f}{shown} | {spread} | "
                     f"{chosen['best_epoch']} / {chosen['epochs']} | `{path.name}` |")
    return "\n".join(lines) + "\n"


def datasets_block(folder: Path) -> str:
    """One row per preprocessing statistics file of `folder` (<dataset>.json, as preprocess writes data.json)."""
    keys = ("users", "items", "interactions", "train", "valid", "test")
    lines = ["| dataset | " + " | ".join(keys) + " | file |", "|---|" + "---:|" * len(keys) + "---|"]
    for path in sorted(folder.glob("*.json")):
        stats = read_json(path)
        lines.append(f"| `{path.stem}` | " + " | ".join(f"{stats[key]:,}" for key in keys) + f" | `{path}` |")
    return "\n".join(lines) + "\n"


RENDERERS: dict[str, Callable[[Path], str]] = {"run": run_block, "tuning": tuning_block, "datasets": datasets_block}


def render(text: str) -> str:
    """`text` with every generated block made again from its files (paths relative to the working directory)."""
    def block(match: re.Match) -> str:
        if match[2] not in RENDERERS:
            raise ValueError(f"README: unknown generated block `{match[2]}` (known: {', '.join(RENDERERS)})")
        return match[1] + RENDERERS[match[2]](Path(match[3])) + "\n" + match[5]

    return BLOCK.sub(block, text)


def main(
    readme: list[Path] = typer.Option([Path("README.md"), Path("results/table1.md")],
                                      help="The files whose generated blocks are made again (repeat the option for several)."),
    check: bool = typer.Option(False, help="Change nothing; fail with a diff when a file differs from what its sources give."),
) -> None:
    """Make README's result tables (and results/table1.md's) again from the committed results (blocks `<!-- readme: KIND PATH -->`)."""
    for path in readme:
        text = path.read_text()
        try:
            new = render(text)
        except (OSError, ValueError, KeyError) as err:
            raise SystemExit(f"error: {path}: a generated block's source is missing or malformed: {err}") from None
        if check:
            if new != text:
                diff = "".join(difflib.unified_diff(text.splitlines(True), new.splitlines(True), str(path), "generated"))
                raise SystemExit(f"error: {path} differs from its committed results (run `rcekd readme`):\n{diff}")
            typer.echo(f"{path}: every generated block matches its files")
            continue
        path.write_text(new)
        typer.echo(f"{path}: {len(BLOCK.findall(text))} generated blocks written")
