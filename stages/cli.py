"""`rcekd`: the command line that every DVC stage calls. Options are paths and selectors; the
parameters of each stage come from params.yaml (see `--params`)."""

from __future__ import annotations

import signal

import typer

from stages import cache_teacher, distill, evaluate, fetch, html_template, preprocess, report, train

app = typer.Typer(
    help="rcekd: knowledge distillation for top-N recommenders (RCE-KD and baselines) as DVC stages. "
    "Normally run through `dvc repro`; each command is one stage of dvc.yaml.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _setup() -> None:
    signal.signal(signal.SIGTERM, _terminated)


def _terminated(signum: int, frame: object) -> None:
    """SIGTERM unwinds like Ctrl-C: files being written are removed, the last saved training state kept."""
    raise SystemExit(128 + signum)


app.command("fetch")(fetch.main)
app.command("preprocess")(preprocess.main)
app.command("train")(train.main)
app.command("cache-teacher")(cache_teacher.main)
app.command("distill")(distill.main)
app.command("evaluate")(evaluate.main)
app.command("report")(report.main)
app.command("html-template")(html_template.main)

if __name__ == "__main__":
    app()
