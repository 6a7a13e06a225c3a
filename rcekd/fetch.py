"""Fetching published dataset files: download with resume and checksum, or take a local copy.

A file is written as `<name>.part` and renamed only after its checksum matched, so a final name is
never a partial file. An interrupted download resumes from the `.part` (HTTP Range) or restarts when
the server does not support ranges. Where no checksum is published, the md5 of the first download is
recorded in `checksums.json` beside the files and later fetches are verified against it.
"""

from __future__ import annotations

import hashlib
import http.client
import shutil
import tarfile
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from rcekd.io import read_json, write_json


@dataclass(frozen=True)
class Remote:
    name: str  # file name under the dataset directory
    url: str
    md5: str | None = None  # published checksum, if one is known


REMOTES: dict[str, list[Remote]] = {
    "gowalla_lightgcn": [
        Remote("train.txt", "https://raw.githubusercontent.com/kuandeng/LightGCN/master/Data/gowalla/train.txt"),
        Remote(
            "test.txt",
            "https://raw.githubusercontent.com/kuandeng/LightGCN/master/Data/gowalla/test.txt",
            "c04e2c4bcd2389f53ed8281816166149",
        ),
    ],
    "gowalla": [Remote("loc-gowalla_totalCheckins.txt.gz", "https://snap.stanford.edu/data/loc-gowalla_totalCheckins.txt.gz")],
}


def md5sum(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def download(url: str, target: Path, *, timeout: float = 60, progress: Callable[[int, int | None], None] = lambda d, t: None) -> None:
    """Download url to target.part (resuming it if present), then leave it there for verification."""
    part = target.with_name(target.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        resumed = have and response.status == 206
        total = response.headers.get("Content-Length")
        total = int(total) + (have if resumed else 0) if total else None
        with open(part, "ab" if resumed else "wb") as handle:
            done = have if resumed else 0
            try:
                while block := response.read(1 << 20):
                    handle.write(block)
                    done += len(block)
                    progress(done, total)
            except http.client.IncompleteRead as err:
                handle.write(err.partial)
                raise OSError(f"{url}: transfer interrupted after {done + len(err.partial)} bytes; run fetch again to resume") from None
    if total is not None and part.stat().st_size != total:
        raise OSError(f"{url}: transfer interrupted at {part.stat().st_size} of {total} bytes; run fetch again to resume")


def _local_copy(source: Path, name: str, part: Path) -> None:
    if source.is_dir():
        matches = sorted(source.rglob(name))
        if not matches:
            raise FileNotFoundError(f"{source}: no file named {name} in this directory")
        shutil.copyfile(matches[0], part)
    elif zipfile.is_zipfile(source):
        with zipfile.ZipFile(source) as archive:
            members = [m for m in archive.namelist() if Path(m).name == name]
            if not members:
                raise FileNotFoundError(f"{source}: no member named {name} in this archive")
            with archive.open(members[0]) as src, open(part, "wb") as dst:
                shutil.copyfileobj(src, dst)
    elif tarfile.is_tarfile(source):
        with tarfile.open(source) as archive:
            members = [m for m in archive.getmembers() if m.isfile() and Path(m.name).name == name]
            if not members:
                raise FileNotFoundError(f"{source}: no member named {name} in this archive")
            with archive.extractfile(members[0]) as src, open(part, "wb") as dst:
                shutil.copyfileobj(src, dst)
    else:
        raise ValueError(f"{source}: expected a directory, a .zip or a .tar(.gz) archive")


def fetch(
    dataset: str,
    out_dir: str | Path,
    *,
    local: str | Path | None = None,
    remotes: list[Remote] | None = None,
    progress: Callable[[str, int, int | None], None] = lambda name, done, total: None,
) -> list[Path]:
    """Put the dataset's files under out_dir, verified; returns their paths."""
    if remotes is None:
        if dataset not in REMOTES:
            raise ValueError(f"no download known for dataset {dataset!r}; fetchable: {sorted(REMOTES)} (or give --local)")
        remotes = REMOTES[dataset]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ledger_path = out_dir / "checksums.json"
    ledger = read_json(ledger_path) if ledger_path.exists() else {}
    paths = []
    for remote in remotes:
        target = out_dir / remote.name
        expected = remote.md5 or ledger.get(remote.name)
        if target.exists() and (expected is None or md5sum(target) == expected):
            paths.append(target)
            continue
        part = target.with_name(target.name + ".part")
        if local is not None:
            _local_copy(Path(local), remote.name, part)
        else:
            download(remote.url, target, progress=lambda done, total, n=remote.name: progress(n, done, total))
        actual = md5sum(part)
        if expected is not None and actual != expected:
            part.unlink()
            raise ValueError(f"{remote.name}: md5 {actual} does not match the expected {expected} ({remote.url}); the file was discarded")
        part.replace(target)
        ledger[remote.name] = actual
        write_json(ledger_path, ledger)
        paths.append(target)
    return paths
