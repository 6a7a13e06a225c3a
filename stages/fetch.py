"""Not a DVC stage: put a dataset's published files where params.yaml expects them."""

from __future__ import annotations

from pathlib import Path

import typer

from rcekd.fetch import REMOTES, Remote, fetch
from stages.common import log
from stages.params import PARAMS_OPTION, ParamsError, fail, load_params, section


def main(
    dataset: str = typer.Argument(..., help="A dataset name under `datasets` in params.yaml."),
    local: Path = typer.Option(None, help="Take the files from this directory or .zip/.tar.gz archive instead of downloading."),
    params: Path = PARAMS_OPTION,
) -> None:
    """Download a dataset's files (resumable, checksummed) or copy them from a local directory/archive."""
    try:
        spec = section(load_params(params), f"datasets.{dataset}", params)
        path = Path(spec["path"])
        out = path if spec.get("source") == "lightgcn" else path.parent
        last = [0]

        def progress(name: str, done: int, total: int | None) -> None:
            if done - last[0] >= 50 << 20 or done == total:
                last[0] = done
                log(f"fetch {name}: {done >> 20} MiB" + (f" of {total >> 20} MiB" if total else ""))

        remotes = None
        if dataset not in REMOTES and local is not None and spec.get("source") != "lightgcn":
            remotes = [Remote(path.name, url="")]  # no public download (Yelp): the user's own copy
        for file in fetch(dataset, out, local=local, remotes=remotes, progress=progress):
            log(f"fetch {dataset}: {file} ok")
    except (ParamsError, ValueError, FileNotFoundError, OSError) as err:
        fail(err)
