"""Seconds per epoch of every distillation method against the student trained alone (the paper's
Table 2), against one full student ranking pass, evaluation against the machine's matmul + top-k
floor, and the cost of each teacher-cache store. Every figure is measured in this run.

Usage: python benchmarks/epochs.py [--dataset citeulike | gowalla_lightgcn] [--epochs 6]
           [--methods ce,rcekd,...] [--raw PATH] [--teacher-epochs 2] [--stores float32,float16,factors]

What it runs, in a temporary directory, each pipeline stage (`rcekd ...`) in a fresh process whose
peak RSS comes from wait4:
1. preprocess the dataset (params.yaml's settings; raw data from --raw, else the params path, else
   ../shared/data);
2. train the MF teacher (params: dim 400) for --teacher-epochs epochs and record its trajectory
   (HetComp's lists): an epoch's cost does not depend on how well the teacher is trained;
3. cache its scores in every store of --stores (time, peak RSS, disk);
4. train the student alone, and the student with each method, for --epochs epochs each (MF → MF,
   params.yaml's settings otherwise), with the float32 cache; then RCE-KD again with each other store;
5. in this process, with the student trained alone: one full student ranking pass (scores for all
   users and items, then top-K, K = kd.rcekd.k), the full-ranking evaluation, and its floor (a bare
   matmul + top-20 of the same vectors, chunk by chunk, nothing else).
A method's seconds per epoch are the median over epochs 2.. of its history's `train_seconds` (the
per-epoch preparation and the training steps; validation excluded), as the report's Table-2 column.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
SHARED_DIRS = {"citeulike": "citeulike-t/users.dat", "gowalla_lightgcn": "gowalla-lightgcn"}
# The paper's Table 2 (RTX 3090, seconds per epoch, MF student), for the ratios printed beside ours.
PAPER_SECONDS = {
    "citeulike": {"student": 4.25, "rcekd": 15.23, "rrd": 19.67},
    "gowalla_lightgcn": {"student": 27.33, "rcekd": 99.30, "rrd": 132.37},
}
ALL_METHODS = "ce,rcekd,rrd,cd,dcd,hetcomp,sld,unkd,tarec,full_ce"


def run_stage(args: list[str], label: str) -> tuple[float, float]:
    """Run `rcekd ARGS` in a fresh process; (seconds, its peak RSS in MiB). Fails loudly with its output."""
    started = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with tempfile.TemporaryFile("w+") as output:
        child = subprocess.Popen([sys.executable, "-m", "stages.cli", *args], cwd=ROOT, env=env, stdout=output, stderr=output)
        _, status, usage = os.wait4(child.pid, 0)
        seconds = time.perf_counter() - started
        if os.waitstatus_to_exitcode(status) != 0:
            output.seek(0)
            sys.exit(f"{label} failed:\n{output.read()[-3000:]}")
    print(f"  {label}: {seconds:.1f} s, peak RSS {usage.ru_maxrss / 1024:.0f} MiB", flush=True)
    return seconds, usage.ru_maxrss / 1024


def epoch_medians(history: Path) -> tuple[float, float, int]:
    """Median train_seconds and prep_seconds over epochs 2.. (all epochs if only one), and the epoch count."""
    with open(history) as handle:
        rows = list(csv.DictReader(handle))
    rows = rows[1:] or rows
    return (
        statistics.median(float(row["train_seconds"]) for row in rows),
        statistics.median(float(row["prep_seconds"]) for row in rows),
        len(rows),
    )


def median_seconds(work, repeats: int) -> float:
    work()  # warm-up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        work()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def write_params(path: Path, base: dict, dataset: str, raw: Path, *, epochs: int, device: str) -> Path:
    params = yaml.safe_load(yaml.safe_dump(base))
    params["dataset"], params["device"] = dataset, device
    params["datasets"][dataset]["path"] = str(raw)
    params["train"].update(max_epochs=epochs, patience=epochs + 1)
    params["trajectory"]["every"] = 1
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def raw_path(dataset: str, given: str | None, base: dict) -> Path:
    if given:
        return Path(given).resolve()
    configured = ROOT / base["datasets"][dataset]["path"]
    return configured if configured.exists() else SHARED / SHARED_DIRS[dataset]


def measure_ranking(work: Path, params: dict, repeats: int) -> dict[str, float]:
    """Ranking pass, evaluation and its floor, with the student trained alone, in this process."""
    from rcekd.cache import encode_all
    from rcekd.checkpoint import load_checkpoint
    from rcekd.data import load_splits
    from rcekd.evaluate import full_ranking, score_chunks
    from rcekd.sparse import UserItems
    from rcekd.train import deterministic, resolve_device

    device = resolve_device(params["device"])
    deterministic(device)
    chunk, k = params["train"]["eval_chunk"], params["kd"]["rcekd"]["k"]
    splits = load_splits(work / "data")
    train = UserItems(splits.train, splits.n_users, splits.n_items, device)
    valid = UserItems(splits.valid, splits.n_users, splits.n_items, device)
    student, _ = load_checkpoint(work / "student" / "checkpoint.pt", splits=splits, device=device)
    users, items = encode_all(student, splits.n_users, chunk=chunk, device=device)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def ranking_pass() -> None:
        for _, _, scores in score_chunks(student, splits.n_users, exclude=[train], chunk=chunk, device=device):
            scores.topk(k, dim=1)
        sync()

    def evaluation() -> None:
        full_ranking(student, valid, exclude=[train], chunk=chunk, device=device)
        sync()

    def floor() -> None:
        for start in range(0, splits.n_users, chunk):
            (users[start : start + chunk] @ items.T).topk(20, dim=1)
        sync()

    return {name: median_seconds(work_, repeats) for name, work_ in (("pass", ranking_pass), ("eval", evaluation), ("floor", floor))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="citeulike", choices=sorted(SHARED_DIRS))
    parser.add_argument("--raw", help="the raw data (file or directory) of --dataset")
    parser.add_argument("--epochs", type=int, default=6, help="epochs of each student run (the median skips the first)")
    parser.add_argument("--teacher-epochs", type=int, default=2)
    parser.add_argument("--methods", default=ALL_METHODS, help=f"comma-separated kd sections (default {ALL_METHODS})")
    parser.add_argument("--stores", default="float32,float16,factors", help="cache stores to write; float32 is always first")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--repeats", type=int, default=5, help="repeats of the in-process timings (median)")
    parser.add_argument("--workdir", help="keep the artifacts in this folder (created if missing) instead of a temporary directory")
    options = parser.parse_args()
    base = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw = raw_path(options.dataset, options.raw, base)
    stores = ["float32"] + [s for s in options.stores.split(",") if s and s != "float32"]
    methods = [m for m in options.methods.split(",") if m]
    with contextlib.nullcontext(options.workdir) if options.workdir else tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        params = write_params(work / "params.yaml", base, options.dataset, raw, epochs=options.epochs, device=options.device)
        teacher_params = write_params(work / "teacher.yaml", base, options.dataset, raw, epochs=options.teacher_epochs, device=options.device)
        common = ["--data", str(work / "data")]
        print(f"{options.dataset} from {raw}; torch {torch.__version__}, {torch.get_num_threads()} threads; "
              f"device {options.device}; {time.strftime('%Y-%m-%d %H:%M')}", flush=True)
        run_stage(["preprocess", "--dataset", options.dataset, "--out", str(work / "data"), "--stats", str(work / "stats.json"), "--params", str(params)], "preprocess")
        teacher = work / "teacher"
        run_stage(["train", "--backbone", "mf", "--role", "teacher", *common, "--out", str(teacher / "checkpoint.pt"),
                   "--history", str(teacher / "history.csv"), "--trajectory", str(teacher / "trajectory.parquet"),
                   "--params", str(teacher_params)], f"teacher ({options.teacher_epochs} epochs)")
        caches = {}
        for store in stores:
            store_params = work / f"cache_{store}.yaml"
            values = yaml.safe_load(params.read_text())
            values["cache"]["store"] = store
            store_params.write_text(yaml.safe_dump(values, sort_keys=False))
            out = work / f"cache_{store}"
            seconds, peak = run_stage(["cache-teacher", *common, "--checkpoint", str(teacher / "checkpoint.pt"), "--out", str(out),
                                       "--params", str(store_params)], f"cache {store}")
            disk = sum(f.stat().st_size for f in out.iterdir()) / 2**20
            caches[store] = {"params": store_params, "dir": out, "write_s": seconds, "peak": peak, "disk": disk}

        run_stage(["train", "--backbone", "mf", "--role", "student", *common, "--out", str(work / "student" / "checkpoint.pt"),
                   "--history", str(work / "student" / "history.csv"), "--params", str(params)], "student alone")
        student_s, _, epochs = epoch_medians(work / "student" / "history.csv")
        runs = {}
        jobs = [(method, "float32") for method in methods] + [("rcekd", store) for store in stores[1:] if "rcekd" in methods]
        for method, store in jobs:
            out = work / f"{method}_{store}"
            _, peak = run_stage(["distill", "--method", method, "--student", "mf", *common, "--cache", str(caches[store]["dir"]),
                                 "--trajectory", str(teacher / "trajectory.parquet"), "--out", str(out / "checkpoint.pt"),
                                 "--history", str(out / "history.csv"), "--params", str(caches[store]["params"])],
                                f"distill {method} ({store} cache)")
            runs[method, store] = (*epoch_medians(out / "history.csv")[:2], peak)
        timings = measure_ranking(work, yaml.safe_load(params.read_text()), options.repeats)

    paper = PAPER_SECONDS[options.dataset]
    rank_s = timings["pass"]
    print(f"\nstudent alone (MF dim {base['backbones']['mf']['student']['model']['dim']}): {student_s:.3f} s/epoch "
          f"(median of {epochs} epochs; paper {paper['student']} s on an RTX 3090)")
    print(f"one full student ranking pass (all users x items, top-{base['kd']['rcekd']['k']}): {rank_s:.3f} s")
    print(f"\n{'method':10s} {'s/epoch':>8s} {'prep s':>7s} {'x student':>9s} {'extra s':>8s} {'extra/pass':>10s} {'paper x':>8s} {'peak RSS':>9s}")
    for (method, store), (seconds, prep, peak) in runs.items():
        if store != "float32":
            continue
        extra = seconds - student_s
        paper_ratio = f"{paper[method] / paper['student']:.1f}" if method in paper else "-"
        print(f"{method:10s} {seconds:8.3f} {prep:7.3f} {seconds / student_s:9.1f} {extra:8.3f} {extra / rank_s:10.2f} "
              f"{paper_ratio:>8s} {peak:7.0f} M")
    if ("rcekd", "float32") in runs:
        extra = runs["rcekd", "float32"][0] - student_s
        verdict = "within" if extra <= 1.5 * rank_s else "NOT within"
        print(f"RCE-KD extra {extra:.3f} s = {extra / rank_s:.2f} x the ranking pass: {verdict} the 1.5 x target")
    print(f"\nevaluation (full ranking, R/N@10/20): {timings['eval']:.3f} s; floor (matmul + top-20): {timings['floor']:.3f} s; "
          f"ratio {timings['eval'] / timings['floor']:.2f}")
    print(f"\n{'store':8s} {'write s':>8s} {'peak RSS':>9s} {'disk MiB':>9s} {'rcekd s/epoch':>14s} {'rcekd prep s':>13s} {'rcekd peak RSS':>15s}")
    for store, info in caches.items():
        seconds, prep, peak = runs.get(("rcekd", store), (float("nan"),) * 3)
        print(f"{store:8s} {info['write_s']:8.1f} {info['peak']:7.0f} M {info['disk']:9.0f} {seconds:14.3f} {prep:13.3f} {peak:13.0f} M")


if __name__ == "__main__":
    main()
