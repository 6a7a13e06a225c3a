"""What a worker of a parallel grid takes from the environment (stages/worker.py): its threads and
one GPU of those the workers share, held until the process exits."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from stages.worker import apply_threads, lease_gpu, threads_per_job

ROOT = Path(__file__).resolve().parents[1]
LEASE = "from stages.worker import lease_gpu; import os, sys, time; print(lease_gpu(poll_seconds=0.1), os.environ['CUDA_VISIBLE_DEVICES'], flush=True); time.sleep(float(sys.argv[1]))"


def test_threads_from_the_environment(monkeypatch) -> None:
    before = torch.get_num_threads()
    try:
        monkeypatch.setenv("RCEKD_THREADS", "1")
        assert apply_threads() == 1 and torch.get_num_threads() == 1
        monkeypatch.delenv("RCEKD_THREADS")
        assert apply_threads() is None and torch.get_num_threads() == 1  # unset: left as it is
        monkeypatch.setenv("RCEKD_THREADS", "two")
        with pytest.raises(SystemExit, match="RCEKD_THREADS = 'two'"):
            apply_threads()
    finally:
        torch.set_num_threads(before)


def test_threads_per_job_divide_the_usable_cores_not_the_machines(monkeypatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {1}, raising=False)  # as under `taskset -c 1`
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    assert threads_per_job(1) == 1 and threads_per_job(2) == 1
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    assert [threads_per_job(jobs) for jobs in (1, 2, 3, 8, 9)] == [8, 4, 2, 1, 1]


def lease_process(lock_dir: Path, hold_seconds: float) -> subprocess.Popen:
    env = {**os.environ, "RCEKD_GPUS": "0,1", "RCEKD_LOCK_DIR": str(lock_dir), "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-c", LEASE, str(hold_seconds)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_each_stage_takes_a_free_gpu_and_waits_when_none_is(tmp_path: Path, monkeypatch) -> None:
    first = lease_process(tmp_path, 30)
    assert first.stdout.readline().split() == ["0", "0"]  # the first free one, and only it is visible
    monkeypatch.setenv("RCEKD_GPUS", "0,1")
    monkeypatch.setenv("RCEKD_LOCK_DIR", str(tmp_path))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert lease_gpu() == "1" and os.environ["CUDA_VISIBLE_DEVICES"] == "1"  # 0 is held by the other process
    waiting = lease_process(tmp_path, 0)  # both held (0 by `first`, 1 by this process): it waits
    time.sleep(1.0)
    assert waiting.poll() is None
    first.kill()  # a killed holder releases its GPU
    first.wait()
    out, err = waiting.communicate(timeout=20)
    assert out.split() == ["0", "0"] and "waiting" in err
    monkeypatch.setenv("RCEKD_GPUS", "0,x")
    with pytest.raises(SystemExit, match="RCEKD_GPUS = '0,x'"):
        lease_gpu()
