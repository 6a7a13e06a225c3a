"""dvc.yaml's stages run as their own commands, without DVC, for a machine that has none (a lent GPU):
each stage's `cmd` rendered as DVC renders it (`${...}` from params, `foreach` and `matrix` items, the
stage names DVC gives them), run in a scratch workspace, several chains of stages at once.

The workspace is a folder holding the run's params.yaml and dvc.yaml and a link to the project's
data/raw; every command runs there (`python -m stages.cli`, this checkout's code), so its outputs
land under the workspace's own data/ and artifacts/, never over DVC's outputs in the project. A stage
counts as done once its command exited 0 (done.json): run again, the others run (training resumes from
its saved state); a workspace made with another dvc.yaml, or params.yaml other than in the sections no
stage reads (`records`, `tuning`: editing another record's settings keeps it), is started afresh."""

from __future__ import annotations

import itertools
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import yaml

from rcekd.io import read_json, write_json
from stages.common import log
from stages.worker import threads_per_job

REFERENCE = re.compile(r"\$\{\s*([^}\s]+)\s*\}")
ROOT = Path(__file__).resolve().parents[1]  # the checkout whose stages and rcekd the commands run


def lookup(values: dict, dotted: str) -> object:
    node = values
    for key in dotted.split("."):
        if not isinstance(node, dict) or key not in node:
            raise KeyError(f"dvc.yaml: ${{{dotted}}} names nothing in params.yaml")
        node = node[key]
    return node


def render(text: object, values: dict) -> object:
    """A value of dvc.yaml with its `${a.b}` references filled in: a whole-string reference keeps the
    value's type (a list for `foreach`), one inside text is written as text."""
    if not isinstance(text, str):
        return text
    whole = REFERENCE.fullmatch(text.strip())
    if whole:
        return lookup(values, whole.group(1))
    return REFERENCE.sub(lambda match: str(lookup(values, match.group(1))), text)


def stage_commands(stages: dict, params: dict) -> dict[str, str]:
    """Every stage's command by the name DVC gives it: `name`, `name@item` (foreach) or
    `name@v1-v2-...` (matrix, in the order of its keys)."""
    commands = {}
    for name, stage in stages.items():
        if "foreach" in stage:
            for item in render(stage["foreach"], params):
                commands[f"{name}@{item}"] = render(stage["do"]["cmd"], params | {"item": item})
        elif "matrix" in stage:
            axes = {key: render(values, params) for key, values in stage["matrix"].items()}
            for combination in itertools.product(*axes.values()):
                item = dict(zip(axes, combination))
                commands[f"{name}@{'-'.join(map(str, combination))}"] = render(stage["cmd"], params | {"item": item})
        else:
            commands[name] = render(stage["cmd"], params)
    return {name: " ".join(command.split()) for name, command in commands.items()}


def device_label(params: dict) -> str:
    """`direct:` and the device the runs use (params `device`: auto takes CUDA when available)."""
    import torch

    if params.get("device", "auto") != "cpu" and torch.cuda.is_available():
        return f"direct:{torch.cuda.get_device_name(0)}"
    return "direct:cpu"


UNREAD = ("records", "tuning")  # params.yaml's sections that no stage of dvc.yaml reads


def same_run(folder: Path, texts: dict[str, str]) -> bool:
    """Whether the workspace's params.yaml and dvc.yaml are `texts` (params.yaml: outside UNREAD)."""
    if any(not (folder / name).exists() for name in texts):
        return False
    read = {"params.yaml": lambda text: {k: v for k, v in (yaml.safe_load(text) or {}).items() if k not in UNREAD},
            "dvc.yaml": lambda text: text}
    return all(read[name]((folder / name).read_text()) == read[name](text) for name, text in texts.items())


class Workspace:
    """A scratch folder where dvc.yaml's stages run as their own commands, with `params` as params.yaml."""

    def __init__(self, folder: Path, params: dict, dvc_yaml: Path = Path("dvc.yaml")):
        self.folder = folder
        texts = {"params.yaml": yaml.safe_dump(params, sort_keys=False), "dvc.yaml": dvc_yaml.read_text()}
        if folder.exists() and not same_run(folder, texts):
            log(f"direct: {folder} was made with other params.yaml or dvc.yaml; starting it afresh")
            shutil.rmtree(folder)
        (folder / "logs").mkdir(parents=True, exist_ok=True)
        for name, text in texts.items():
            (folder / name).write_text(text)
        raw = folder / "data/raw"
        if not raw.exists():
            raw.parent.mkdir(parents=True, exist_ok=True)
            raw.symlink_to(Path("data/raw").resolve(), target_is_directory=True)
        self.commands = stage_commands(yaml.safe_load(dvc_yaml.read_text())["stages"], params)
        self.done_path = folder / "done.json"
        self.done = set(read_json(self.done_path)) if self.done_path.exists() else set()

    def argv(self, stage: str) -> list[str]:
        """The stage's command as this interpreter runs it (`rcekd X` → `python -m stages.cli X`)."""
        words = shlex.split(self.commands[stage])
        if words[0] != "rcekd":
            raise ValueError(f"dvc.yaml: stage {stage} runs {words[0]!r}, not rcekd")
        return [sys.executable, "-m", "stages.cli", *words[1:]]

    def run(self, chains: dict[str, list[str]], jobs: int, landed: Callable[[str], None]) -> list[str]:
        """Run each chain (name → stages, in order; the done ones skipped), `jobs` chains at once; `landed(name)`
        as soon as a chain's last stage is done. Returns the chains that failed (their logs named above)."""
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
               "PYTHONUNBUFFERED": "1"}
        env["RCEKD_THREADS"] = str(threads_per_job(jobs))  # as rcekd run-queue gives its workers
        waiting, running, failed = list(chains), {}, []

        def start(name: str) -> None:
            stage = next((stage for stage in chains[name] if stage not in self.done), None)
            if stage is None:
                landed(name)
                return
            log_path = self.folder / "logs" / f"{stage}.txt"
            handle = open(log_path, "a")
            log(f"direct: {stage} ({name}; log {log_path})")
            running[name] = (stage, subprocess.Popen(self.argv(stage), cwd=self.folder, env=env, stdout=handle,
                                                     stderr=subprocess.STDOUT), handle)

        while waiting or running:
            while waiting and len(running) < jobs:
                start(waiting.pop(0))
            time.sleep(0.5)
            for name, (stage, process, handle) in list(running.items()):
                if process.poll() is None:
                    continue
                handle.close()
                del running[name]
                if process.returncode != 0:
                    tail = (self.folder / "logs" / f"{stage}.txt").read_text().strip().splitlines()[-5:]
                    log(f"direct: {stage} failed (exit {process.returncode}):\n  " + "\n  ".join(tail))
                    failed.append(name)
                    continue
                self.done.add(stage)
                write_json(self.done_path, sorted(self.done))
                start(name)  # the chain's next stage, or its landing
        return failed
