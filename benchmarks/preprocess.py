"""Preprocessing at Gowalla size: time and peak RSS, against the floor of merely parsing the raw files.

Each measurement runs in a fresh child process (peak RSS from getrusage of that child alone).
Usage: python benchmarks/preprocess.py [DIR]   (DIR: LightGCN-layout Gowalla, default ../shared/data/gowalla-lightgcn)
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEFAULT = Path(__file__).resolve().parents[2] / "shared" / "data" / "gowalla-lightgcn"

PEAK = "; import resource; print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"  # KiB on Linux
PARSE_ONLY = "from rcekd.sources import read_lightgcn; import sys; print(len(read_lightgcn(sys.argv[1])))" + PEAK
FULL = (
    "from rcekd.data import preprocess; import sys; "
    "print(preprocess(sys.argv[1], sys.argv[2], source='lightgcn', min_user=0, min_item=0, train=0.8, valid=0.1))"
) + PEAK


def measure(code: str, *args: str) -> tuple[float, float, str]:
    """(seconds, peak RSS in MiB, first output line) of `python -c code args` in a fresh process."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, check=True)
    seconds = time.perf_counter() - started
    *output, peak_kib = done.stdout.strip().splitlines()
    return seconds, int(peak_kib) / 1024, output[0]


def main() -> None:
    source = Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT
    with tempfile.TemporaryDirectory() as tmp:
        full_s, full_mb, stats = measure(FULL, str(source), f"{tmp}/out")
        parse_s, parse_mb, rows = measure(PARSE_ONLY, str(source))
    print(f"dataset: {source} -> {stats}")
    print(f"parse only (floor):  {parse_s:6.2f} s  peak RSS {parse_mb:7.0f} MiB  ({rows} rows)")
    print(f"full preprocess:     {full_s:6.2f} s  peak RSS {full_mb:7.0f} MiB")
    print(f"ratio full / parse:  {full_s / parse_s:6.2f}x time, {full_mb / parse_mb:5.2f}x peak RSS")


if __name__ == "__main__":
    main()
