"""Stage 6: the grid's results over seeds (a Markdown table and a DVC metrics JSON) and the figures' CSVs."""

from __future__ import annotations

from pathlib import Path

import typer

from rcekd.io import atomic_path, write_json
from rcekd.report import collect, figure_tables, grid_runs, markdown, summarize, write_figures
from stages.common import log
from stages.params import PARAMS_OPTION, ParamsError, fail, load_params, section


def main(
    metrics: Path = typer.Option(..., help="Directory of the evaluate stages' metrics JSON files."),
    runs: Path = typer.Option(..., help="Directory of the runs' histories and diagnostics (artifacts/<dataset>)."),
    table: Path = typer.Option(..., help="Output Markdown table, laid out like the paper's Table 1."),
    summary: Path = typer.Option(..., "--json", help="Output JSON (a DVC metrics file): mean, std, improvement, p-value."),
    figures: Path = typer.Option(..., help="Output directory of the figures' CSV files (DVC plots)."),
    params: Path = PARAMS_OPTION,
) -> None:
    """Aggregate every run of the grid over its seeds (params: grid, report): mean ± std, the target against
    the best baseline (relative improvement, paired t-test), seconds per epoch and peak memory; and the figures."""
    try:
        all_params = load_params(params)
        lists = {key: section(all_params, f"grid.{key}", params) for key in ("teachers", "students", "methods", "seeds")}
        seeds = lists["seeds"]  # types and ranges: checked by load_params (stages.params.validate)
        target = section(all_params, "report.target", params)
        baselines = section(all_params, "report.baselines", params)
        names = grid_runs(lists["teachers"], lists["students"], lists["methods"], seeds)
        found = collect(metrics, runs, names)
        tables = figure_tables(runs, names)
    except (ParamsError, ValueError, FileNotFoundError) as err:
        fail(err)
    settings = [(t, s) for t in lists["teachers"] for s in lists["students"]]
    report = summarize(found, settings, target=target, baselines=baselines)
    text = markdown(report, title=f"Results: {metrics.name}", seeds=seeds)
    with atomic_path(figures) as tmp:
        write_figures(tmp, tables)
    write_json(summary, report)
    with atomic_path(table) as tmp:
        tmp.write_text(text)
    log(text)
