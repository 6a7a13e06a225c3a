"""The cost of the paper's protocol, this code against a baseline checkout, measured in one run:
evaluation of the MF student (dim 20) and teacher (dim 400), RCE-KD's per-epoch preparation, one
LightGCN-2000 and one HSTU-8×4 training epoch, and the default `dvc repro` from a fresh clone.

Usage: python benchmarks/throughput.py --baseline DIR [--device cpu|cuda] [--only a,b,...] [--repeats 5]

DIR is a checkout of the code to compare against (for example `git worktree add ../baseline <commit>`).
Every measurement runs in its own process (`--worker`), importing `rcekd` from the code it measures
(PYTHONPATH), each code with its own params.yaml (so each evaluates with its own `train.eval_chunk`),
on CiteULike-t. The models are shared: a teacher (MF 400, 15 epochs) and a student (MF 20, 40 epochs
of BPR) are trained once, with this code, and a student distilled by RCE-KD (20 epochs) for the
preparation; their weights are loaded by both codes; the teacher cache is written by each code for itself. Figures:
- eval_student, eval_teacher: one full-ranking validation pass (median of --repeats after a warm-up);
- rcekd_prep: one RCE-KD `prepare_epoch` on the RCE-KD student (median of --repeats after one);
- lightgcn_epoch, hstu_epoch, hstu_student_epoch: one training epoch's seconds (the history's
  train_seconds: steps only) of the paper's teacher sizes (and HSTU's student, 1 x 2) from a fresh model;
- pipeline: `dvc repro` in a fresh clone of the code's commit, the sum of its stages' wall times
  (each stage from DVC's "Running stage" line to the next).
Each item ends with a line `ratio <name> <new/old>`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ITEMS = ("eval_student", "eval_teacher", "rcekd_prep", "lightgcn_epoch", "hstu_epoch", "hstu_student_epoch", "pipeline")
TARGETS = {"eval_student": 0.5, "eval_teacher": 0.6, "rcekd_prep": 0.5, "lightgcn_epoch": 0.5, "hstu_epoch": 0.5, "hstu_student_epoch": 1.0,
           "pipeline": 0.6}  # hstu_student_epoch: no issue's target; 1.0 = not slower


def worker(name: str, code: Path, work: Path, device_name: str, repeats: int) -> dict:
    """One measurement with the code on sys.path (run in its own process), set up as its `rcekd` command
    sets up a process (the allocator setting of stages/cli.py, where the code has it)."""
    try:
        from stages.cli import keep_freed_memory
    except ImportError:
        keep_freed_memory = None
    if keep_freed_memory is not None:
        keep_freed_memory()
    import torch
    import yaml

    from rcekd.backbones import BACKBONES
    from rcekd.data import load_splits
    from rcekd.sparse import UserItems
    from rcekd.train import deterministic, fit

    params = yaml.safe_load((code / "params.yaml").read_text())
    chunk = params["train"]["eval_chunk"]
    device = torch.device(device_name)
    deterministic(device)
    splits = load_splits(work / "citeulike")
    train = UserItems(splits.train, splits.n_users, splits.n_items, device)

    def mf(dim: int, state: str):
        model = BACKBONES["mf"](n_users=splits.n_users, n_items=splits.n_items, dim=dim)
        model.load_state_dict(torch.load(work / state))
        return model.bind(splits.train).to(device)

    def median_of(work_once) -> float:
        work_once()
        times = []
        for _ in range(repeats):
            if device.type == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
            work_once()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - started)
        return statistics.median(times)

    if name in ("eval_student", "eval_teacher"):
        from rcekd.evaluate import full_ranking

        model = mf(20, "student.pt") if name == "eval_student" else mf(400, "teacher.pt")
        valid = UserItems(splits.valid, splits.n_users, splits.n_items, device)
        result = {}
        seconds = median_of(lambda: result.update(full_ranking(model, valid, exclude=[train], chunk=chunk, device=device)))
        return {"seconds": seconds, "ndcg@20": result["ndcg@20"]}
    if name == "rcekd_prep":
        from rcekd.cache import TeacherCache, write_cache
        from rcekd.kd import KDContext
        from rcekd.kd.rcekd import RCEKD

        cache = work / f"cache-{code.name}"
        if not cache.exists():
            write_cache(mf(400, "teacher.pt"), splits, cache, topk=params["cache"]["topk"], checkpoint_sha256="benchmark",
                        chunk=params["cache"]["chunk"], device=device)
        teacher = TeacherCache(cache, splits=splits, device=device, chunk=chunk)
        ctx = KDContext(teacher=teacher, train=train, n_users=splits.n_users, n_items=splits.n_items, device=device, chunk=chunk)
        settings = {k: v for k, v in params["kd"]["rcekd"].items() if k not in ("weight", "reduction", "method")}
        method = RCEKD(ctx, **settings)
        student = mf(20, "student_rcekd.pt")
        generator = torch.Generator(device=device).manual_seed(0)
        stats = {}
        seconds = median_of(lambda: stats.update(method.prepare_epoch(student, generator)))
        return {"seconds": seconds, **stats}
    if name in ("lightgcn_epoch", "hstu_epoch", "hstu_student_epoch"):
        backbone = name.split("_")[0]
        spec = params["backbones"][backbone]["student" if "student" in name else "teacher"]
        torch.manual_seed(0)
        model = BACKBONES[backbone](n_users=splits.n_users, n_items=splits.n_items, **spec["model"])
        result = fit(
            model, splits, lr=params["train"]["lr"], weight_decay=spec["weight_decay"],
            batch_size=spec.get("batch_size", params["train"]["batch_size"]), max_epochs=1, patience=1, seed=0,
            device=device, eval_chunk=chunk, log=lambda message: None,
        )
        row = result.history[0]
        return {"seconds": row["train_seconds"], "loss": row["loss"]}
    raise SystemExit(f"unknown item {name!r}")


def run_worker(name: str, code: Path, work: Path, args) -> dict:
    env = {**os.environ, "PYTHONPATH": str(code)}
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", name, "--code", str(code), "--work", str(work),
               "--device", args.device, "--repeats", str(args.repeats)]
    done = subprocess.run(command, cwd=code, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{name} ({code}) failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def pipeline(code: Path, work: Path) -> dict:
    """`dvc repro` in a fresh clone of the code's commit; stage wall times from DVC's output."""
    commit = subprocess.run(["git", "-C", str(code), "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(code), "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True).stdout
    if dirty.strip():
        print(f"  note: {code} has uncommitted changes; the clone runs its commit {commit[:10]}", flush=True)
    clone = work / f"clone-{code.name}"
    shutil.rmtree(clone, ignore_errors=True)
    subprocess.run(["git", "clone", "--quiet", "--no-checkout", str(code), str(clone)], check=True)
    subprocess.run(["git", "-C", str(clone), "checkout", "--quiet", commit], check=True)
    env = {**os.environ, "PYTHONPATH": str(clone), "DVC_NO_ANALYTICS": "1", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    stages: dict[str, float] = {}
    current, since = None, None
    started = time.perf_counter()
    child = subprocess.Popen(["dvc", "repro"], cwd=clone, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = []
    for line in child.stdout:
        log.append(line)
        found = re.match(r"Running stage '([^']+)'", line.strip())
        if found:
            now = time.perf_counter()
            if current is not None:
                stages[current] = now - since
            current, since = found.group(1), now
    if child.wait() != 0:
        sys.exit(f"dvc repro in {clone} failed:\n{''.join(log[-40:])}")
    if current is not None:
        stages[current] = time.perf_counter() - since
    metrics = {}
    for run in ("teacher_mf", "student_mf/seed_0", "mf_to_mf/ce/seed_0", "mf_to_mf/rcekd/seed_0"):
        path = clone / "artifacts/metrics/citeulike" / f"{run}.json"
        if path.exists():
            values = json.loads(path.read_text())
            metrics[run] = {"test_ndcg@20": values["test"]["ndcg@20"], "best_epoch": values["best_epoch"]}
    return {"seconds": sum(stages.values()), "wall": time.perf_counter() - started, "stages": stages, "metrics": metrics}


def setup(work: Path, device: str) -> None:
    """Preprocess CiteULike-t and train the shared teacher and student once, with this code."""
    import torch

    from rcekd.backbones import BACKBONES
    from rcekd.data import load_splits, preprocess
    from rcekd.train import fit

    preprocess(ROOT / "data/raw/citeulike-t/users.dat", work / "citeulike", source="users_dat", min_user=5, min_item=0,
               train=0.8, valid=0.1)
    splits = load_splits(work / "citeulike")
    for name, dim, decay, epochs in (("teacher.pt", 400, 1e-3, 15), ("student.pt", 20, 1e-5, 40)):
        model = BACKBONES["mf"](n_users=splits.n_users, n_items=splits.n_items, dim=dim)
        result = fit(model, splits, lr=1e-3, weight_decay=decay, batch_size=2048, max_epochs=epochs, patience=epochs, seed=0,
                     device=torch.device(device), log=lambda message: None)
        model.load_state_dict(result.best_state)
        torch.save({k: v.cpu() for k, v in model.state_dict().items()}, work / name)
        print(f"  setup: {name} (MF {dim}, {epochs} epochs), valid NDCG@20 {result.best_valid['ndcg@20']:.4f}", flush=True)
    # RCE-KD's preparation is measured on a student that RCE-KD trained (its ranking decides the work)
    from rcekd.cache import TeacherCache, write_cache
    from rcekd.kd import KDContext
    from rcekd.kd.rcekd import RCEKD
    from rcekd.sparse import UserItems

    teacher = BACKBONES["mf"](n_users=splits.n_users, n_items=splits.n_items, dim=400)
    teacher.load_state_dict(torch.load(work / "teacher.pt"))
    write_cache(teacher.bind(splits.train), splits, work / "cache-setup", topk=100, checkpoint_sha256="benchmark", chunk=1024,
                device=torch.device(device))
    ctx = KDContext(teacher=TeacherCache(work / "cache-setup", splits=splits, device=torch.device(device)),
                    train=UserItems(splits.train, splits.n_users, splits.n_items, device), n_users=splits.n_users,
                    n_items=splits.n_items, device=torch.device(device))
    model = BACKBONES["mf"](n_users=splits.n_users, n_items=splits.n_items, dim=20)
    result = fit(model, splits, kd=RCEKD(ctx, k=50, l=50, beta=3.0), kd_weight=10.0, lr=1e-3, weight_decay=1e-5, batch_size=2048,
                 max_epochs=20, patience=20, seed=0, device=torch.device(device), log=lambda message: None)
    torch.save({k: v.cpu() for k, v in model.state_dict().items()}, work / "student_rcekd.pt")
    print(f"  setup: student_rcekd.pt (MF 20, 20 epochs of RCE-KD), valid NDCG@20 {result.history[-1]['valid_ndcg@20']:.4f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", type=Path, help="checkout of the code to compare against (the 'old' code)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--only", default=",".join(ITEMS), help=f"comma-separated items of {', '.join(ITEMS)}")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--work", type=Path, help="keep the temporary files here (default: a temporary directory)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--code", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.code, args.work, args.device, args.repeats)))
        return
    if args.baseline is None or not (args.baseline / "rcekd").is_dir():
        parser.error(f"--baseline {args.baseline}: expected a checkout of rcekd (a directory with rcekd/)")
    items = [item.strip() for item in args.only.split(",") if item.strip()]
    unknown = sorted(set(items) - set(ITEMS))
    if unknown:
        parser.error(f"--only: unknown item(s) {', '.join(unknown)}; expected some of {', '.join(ITEMS)}")
    import torch

    work = args.work or Path(tempfile.mkdtemp(prefix="rcekd-throughput-"))
    work.mkdir(parents=True, exist_ok=True)
    codes = {"old": args.baseline.resolve(), "new": ROOT}
    print(f"throughput on {args.device}; torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"old = {codes['old']}, new = {codes['new']}; {time.strftime('%Y-%m-%d %H:%M')}", flush=True)
    if not (work / "student_rcekd.pt").exists():
        setup(work, args.device)
    for item in items:
        results = {}
        for label, code in codes.items():
            results[label] = pipeline(code, work) if item == "pipeline" else run_worker(item, code, work, args)
            extra = {k: (round(v, 5) if isinstance(v, float) else v) for k, v in results[label].items() if k != "seconds"}
            print(f"  {item:15s} {label}: {results[label]['seconds']:8.3f} s  {extra}", flush=True)
        ratio = results["new"]["seconds"] / results["old"]["seconds"]
        print(f"ratio {item} {ratio:.3f}  (target <= {TARGETS[item]}: {'met' if ratio <= TARGETS[item] else 'NOT met'})", flush=True)


if __name__ == "__main__":
    main()
