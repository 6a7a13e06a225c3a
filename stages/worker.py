"""What one worker of a parallel grid sets up before a stage starts: its CPU threads and its GPU.

Several stages run at once when DVC's queue has several workers (`dvc queue start -j N`, README
"More than one core, GPU or machine"). They share the machine, so each stage reads from the
environment, not from params.yaml (the same cell must hit the same run-cache entry whichever way it
was scheduled):

- RCEKD_THREADS=n: torch's intra-op threads (else torch's default, which honours OMP_NUM_THREADS);
  N workers × n threads should not exceed the cores;
- RCEKD_GPUS=0,1,2,3: the GPUs the workers share. The stage takes the first of them that no other
  stage holds (an exclusive lock on RCEKD_LOCK_DIR/rcekd-gpu-<id>.lock, default the system's temp
  directory, held until the process exits, also when it is killed), waits while all are held, and
  sees only that one (CUDA_VISIBLE_DEVICES), before anything touches CUDA.
"""

from __future__ import annotations

import fcntl
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import IO

_held: list[IO] = []  # the lease's open lock file: it lives as long as the process


def threads_per_job(jobs: int) -> int:
    """torch threads for each of `jobs` concurrent stages: the cores this process may use (its CPU affinity,
    so `taskset -c 1 rcekd ...` counts one core, not the machine's) divided among them, at least 1."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(cores // jobs, 1)


def apply_threads() -> int | None:
    """Set torch's intra-op threads from RCEKD_THREADS; returns the number set (None: unset)."""
    value = os.environ.get("RCEKD_THREADS", "").strip()
    if not value:
        return None
    if not value.isdigit() or int(value) < 1:
        sys.exit(f"error: RCEKD_THREADS = {value!r}; expected a whole number >= 1 (threads per worker)")
    import torch

    torch.set_num_threads(int(value))
    return int(value)


def lease_gpu(poll_seconds: float = 5.0) -> str | None:
    """Take one GPU of RCEKD_GPUS for this process (see the module docstring); returns its id, or None
    when RCEKD_GPUS is unset."""
    value = os.environ.get("RCEKD_GPUS", "").strip()
    if not value:
        return None
    ids = [part.strip() for part in value.split(",") if part.strip()]
    if not ids or not all(part.isdigit() for part in ids):
        sys.exit(f"error: RCEKD_GPUS = {value!r}; expected comma-separated GPU ids such as 0,1,2,3")
    directory = Path(os.environ.get("RCEKD_LOCK_DIR") or tempfile.gettempdir())
    directory.mkdir(parents=True, exist_ok=True)
    waited = False
    while True:
        for gpu in ids:
            handle = open(directory / f"rcekd-gpu-{gpu}.lock", "a")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.close()
                continue
            _held.append(handle)
            os.environ["CUDA_VISIBLE_DEVICES"] = gpu
            print(f"worker: GPU {gpu} of {','.join(ids)}", file=sys.stderr, flush=True)
            return gpu
        if not waited:
            print(f"worker: every GPU of {','.join(ids)} is held by another stage; waiting", file=sys.stderr, flush=True)
            waited = True
        time.sleep(poll_seconds)
