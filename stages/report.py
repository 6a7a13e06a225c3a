"""Stage 6: one Markdown table of every evaluated run of a dataset."""

from __future__ import annotations

from pathlib import Path

import typer

from rcekd.io import atomic_path
from rcekd.report import collect, results_table
from stages.common import log


def main(
    metrics: Path = typer.Option(..., help="Directory of metrics JSON files (from evaluate)."),
    out: Path = typer.Option(..., help="Output Markdown table."),
) -> None:
    """Tabulate the test metrics of every run under --metrics."""
    runs = collect(metrics)
    if not runs:
        typer.echo(f"error: {metrics}: no metrics JSON files found; run the evaluate stages first", err=True)
        raise typer.Exit(code=2)
    table = results_table(runs, title=f"Results: {metrics.name}")
    with atomic_path(out) as tmp:
        tmp.write_text(table)
    log(table)
