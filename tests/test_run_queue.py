"""A record or a search run again after its session ended removes what its earlier run left in DVC's queue
(tasks Queued, or Running with no worker), and only those: `dvc queue status` and the commands faked."""

from __future__ import annotations

import itertools
import subprocess

import pytest

from stages import run_queue

STATUS = """Task     Name                                      Created       Status
d23a5b4  record-citeulike_mf-1205-003258-s0-cd     12:33 AM      Running
5c9e89d  record-citeulike_mf-1205-003258-s1-cd     12:33 AM      Queued
5615ecb  record-citeulike_mf-1205-003258-s2-cd     12:33 AM      Success
2221e0a  record-citeulike_mf_ablations-1205-013000-s0-rcekd  01:30 AM  Queued
c09274d  tune-sld-1204-205240-2                    Dec 04, 2026  Queued

Worker status: {workers} active, {idle} idle
"""


def fake_dvc(monkeypatch, workers: int, failures: int = 0, idle: int = 0, status: str | list[str] = STATUS) -> list[list[str]]:
    """`subprocess.run` answering `dvc queue status` with `status` (after `failures` failed calls; a list: its
    statuses in turn, round and round); records every call."""
    calls = []
    statuses = itertools.cycle([status] if isinstance(status, str) else status)

    def run(args, **kwargs):
        calls.append(list(args))
        if args[:3] != ["dvc", "queue", "status"]:
            return subprocess.CompletedProcess(args, 0, stdout="", stderr="")
        if len(calls) <= failures:
            return subprocess.CompletedProcess(args, 255, stdout="", stderr="ERROR: unexpected error")
        return subprocess.CompletedProcess(args, 0, stdout=next(statuses).format(workers=workers, idle=idle), stderr="")

    monkeypatch.setattr(run_queue.subprocess, "run", run)
    monkeypatch.setattr(run_queue.time, "sleep", lambda seconds: None)
    return calls


def test_an_earlier_runs_unfinished_tasks_are_removed(monkeypatch) -> None:
    calls = fake_dvc(monkeypatch, workers=0)
    dropped = run_queue.drop_unfinished("record-citeulike_mf")
    assert dropped == ["record-citeulike_mf-1205-003258-s0-cd", "record-citeulike_mf-1205-003258-s1-cd"]
    assert ["dvc", "queue", "kill", "--force", "record-citeulike_mf-1205-003258-s0-cd"] in calls
    assert ["dvc", "queue", "remove", *dropped] in calls


def test_nothing_is_touched_while_a_worker_lives(monkeypatch) -> None:
    calls = fake_dvc(monkeypatch, workers=1)
    assert run_queue.drop_unfinished("record-citeulike_mf") == []
    assert all(call[:3] == ["dvc", "queue", "status"] for call in calls)


def test_the_states_are_counted_from_the_same_status(monkeypatch) -> None:
    fake_dvc(monkeypatch, workers=2, idle=1)
    states = run_queue.queue_states()
    assert (states["Queued"], states["Running"], states["Success"], states["workers"], states["idle"]) == (3, 1, 1, 3, 1)


def test_an_idle_worker_is_stopped_only_when_nothing_waits_for_it(monkeypatch) -> None:
    """settle stops a lingering worker at once when it is idle and nothing is queued; a worker that is active,
    or that has queued tasks to take, is waited for, never stopped."""
    done = STATUS.split("\n")[0] + "\n5615ecb  tune-cd-1206-120000-1  12:33 AM  Success\n\nWorker status: {workers} active, {idle} idle\n"
    calls = fake_dvc(monkeypatch, workers=0, idle=1, status=done)
    run_queue.settle(timeout=10)
    assert calls.count(["dvc", "queue", "stop"]) == 1
    for workers, idle, status in ((1, 1, done), (0, 1, STATUS)):
        calls = fake_dvc(monkeypatch, workers=workers, idle=idle, status=status)
        run_queue.settle(timeout=10)
        assert ["dvc", "queue", "stop"] not in calls and len(calls) == 6  # asked at 0, 2, ..., 10 s: waited out


class FakeRunner:
    """`dvc exp run --run-all` that runs for `polls` timeouts of its waits, then exits 0."""

    def __init__(self, polls: int):
        self.polls = polls

    def wait(self, timeout: float) -> int:
        if self.polls:
            self.polls -= 1
            raise subprocess.TimeoutExpired("dvc", timeout)
        return 0


RUNNING_TWO = STATUS.replace("Queued\n", "Running\n", 1)  # tasks s0 and s1 running, two still queued


@pytest.mark.parametrize(("status", "workers", "idle", "restarts"),
                         [(STATUS, 1, 0, 2), (STATUS, 1, 1, 0), (STATUS, 2, 0, 0), (RUNNING_TWO, 0, 0, 0)])
def test_a_worker_gone_with_tasks_queued_is_started_again(monkeypatch, status, workers, idle, restarts) -> None:
    """While the run goes on, a worker that exited with tasks queued (1 of 2 alive, 1 task running) is started
    again once two polls in a row found it missing (here 4 polls: twice); never while all are alive, idle
    ones included, nor while as many tasks run as workers are wanted, whatever the pings say."""
    calls = fake_dvc(monkeypatch, workers=workers, idle=idle, status=status)
    monkeypatch.setattr(run_queue.subprocess, "Popen", lambda args, env: calls.append(list(args)) or FakeRunner(polls=4))
    assert run_queue.run_workers(2, env={}) == 0
    assert calls[0] == ["dvc", "exp", "run", "--run-all", "--jobs", "2"]
    assert calls.count(["dvc", "queue", "start", "--jobs", "2"]) == restarts


def test_a_worker_missing_for_one_poll_only_is_not_started(monkeypatch) -> None:
    """A slot left empty for one poll (a task just ended, the next not yet taken) starts nothing."""
    calls = fake_dvc(monkeypatch, workers=1, status=[STATUS, RUNNING_TWO])
    monkeypatch.setattr(run_queue.subprocess, "Popen", lambda args, env: FakeRunner(polls=4))
    assert run_queue.run_workers(2, env={}) == 0
    assert ["dvc", "queue", "start", "--jobs", "2"] not in calls


def test_a_failing_status_is_asked_again_then_reported(monkeypatch) -> None:
    calls = fake_dvc(monkeypatch, workers=0, failures=2)
    assert run_queue.queue_states()["Queued"] == 3 and len(calls) == 3
    fake_dvc(monkeypatch, workers=0, failures=10)
    with pytest.raises(SystemExit, match=r"dvc queue status` failed 10 times \(exit 255\):\nERROR: unexpected error"):
        run_queue.queue_states()


def test_the_workers_keep_training_states_outside_the_experiments_copies(monkeypatch, tmp_path) -> None:
    """run-queue hands its workers RCEKD_RESUME_DIR (the repository's .resume/, unless set), so that an experiment
    queued again after a killed session resumes from its state instead of starting over (tests/test_resume.py)."""
    envs = []

    def run(args, **kwargs):
        queued = "" if envs else "5c9e89d  tune-sld-1204-205240-2  Dec 04, 2026  Queued\n"
        return subprocess.CompletedProcess(args, 0, stdout=queued + "Worker status: 0 active, 0 idle\n", stderr="")

    monkeypatch.setattr(run_queue.subprocess, "run", run)
    monkeypatch.setattr(run_queue.subprocess, "Popen", lambda args, env: envs.append(env) or FakeRunner(polls=0))
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RCEKD_RESUME_DIR", raising=False)
    run_queue.main(jobs=2, threads=1, gpus="")
    assert [env["RCEKD_RESUME_DIR"] for env in envs] == [str(tmp_path.resolve() / ".resume")]
    monkeypatch.setenv("RCEKD_RESUME_DIR", "/elsewhere")
    envs.clear()
    run_queue.main(jobs=2, threads=1, gpus="")
    assert [env["RCEKD_RESUME_DIR"] for env in envs] == ["/elsewhere"]
