"""`rcekd`: the command line that every DVC stage calls. Options are paths and selectors; the
parameters of each stage come from params.yaml (see `--params`)."""

from __future__ import annotations

import ctypes
import signal

import typer

from stages import cache_teacher, distill, evaluate, fetch, html_template, preprocess, readme, record, report, run_queue, share, train, tune
from stages.worker import apply_threads, lease_gpu

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
    keep_freed_memory()
    lease_gpu()  # RCEKD_GPUS: one GPU per concurrent stage (stages/worker.py), before anything touches CUDA
    apply_threads()  # RCEKD_THREADS: torch's threads per concurrent stage


def keep_freed_memory() -> None:
    """Have glibc serve allocations up to 2 GiB from its heap and keep freed memory mapped, for the
    whole process. By default it maps every allocation above 32 MiB afresh and returns it when freed,
    so each step's large tensors (a dim-400 MF's embedding gradients, LightGCN's layers) are
    page-faulted in again at every step (its effect: benchmarks/README.md, the two throughput runs).
    Only time changes: no computed value depends on where memory comes from. Peak RSS is the high-water
    mark either way. Elsewhere than glibc (macOS), nothing is changed."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's malloc.h
    libc.mallopt(m_mmap_threshold, 2**31 - 1)
    libc.mallopt(m_trim_threshold, 2**31 - 1)


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
app.command("run-queue")(run_queue.main)
app.command("push-runs")(share.main)
app.command("tune")(tune.main)
app.command("record")(record.main)
app.command("readme")(readme.main)

if __name__ == "__main__":
    app()
