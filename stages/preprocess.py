"""Stage 1: raw interactions → filtered, split, re-indexed Parquet plus a stats JSON."""

from __future__ import annotations

from pathlib import Path

import typer

from rcekd.data import preprocess
from rcekd.sources import SOURCES
from rcekd.io import write_json
from stages.common import log
from stages.params import PARAMS_OPTION, ParamsError, fail, kwargs_for, load_params, section


def main(
    dataset: str = typer.Option(..., help="A dataset name under `datasets` in params.yaml."),
    out: Path = typer.Option(..., help="Output directory for the processed dataset."),
    stats: Path = typer.Option(..., help="Output JSON with the dataset's statistics (a DVC metrics file)."),
    params: Path = PARAMS_OPTION,
) -> None:
    """Parse a raw dataset, apply the core filter and the split (params split: per-user chronological, MKD's holdout, or leave-one-out)."""
    try:
        all_params = load_params(params)
        spec = dict(section(all_params, f"datasets.{dataset}", params))
        split = section(all_params, "split", params)
        source = spec.pop("source", None)
        if source not in SOURCES:
            raise ParamsError(f"{params}: datasets.{dataset}.source = {source!r}; expected one of {sorted(SOURCES)}")
        if not isinstance(spec.get("path"), str):
            raise ParamsError(f"{params}: datasets.{dataset}.path = {spec.get('path')!r}; expected the path of the raw file or directory")
        allowed = {"path", "min_user", "min_item", "options", "valid_share", "split_seed"}
        unknown = set(spec) - allowed
        if unknown:
            raise ParamsError(f"{params}: unknown parameter(s) {sorted(unknown)} in datasets.{dataset} (valid: source, {', '.join(sorted(allowed))})")
        for key in ("min_user", "min_item"):
            if not isinstance(spec.get(key), int) or spec[key] < 0:
                raise ParamsError(f"{params}: datasets.{dataset}.{key} = {spec.get(key)!r}; expected an integer >= 0")
        options = spec.get("options") or {}
        kwargs_for(SOURCES[source], options, f"datasets.{dataset}.options", skip=())
        share = spec.get("valid_share", 1 / 9)
        if not isinstance(share, (int, float)) or not 0 <= share < 1:
            raise ParamsError(f"{params}: datasets.{dataset}.valid_share = {share!r}; expected a number in [0, 1)")
        log(f"preprocess {dataset}: reading {spec['path']}")
        result = preprocess(
            spec["path"], out, source=source, min_user=spec["min_user"], min_item=spec["min_item"],
            train=split["train"], valid=split["valid"], source_options=options, valid_share=share,
            seed=int(spec.get("split_seed", 0)), mode=split.get("mode", "chronological"),
            holdout=split.get("holdout", 0.1), valid_users=split.get("valid_users", 0.1), split_seed=split.get("seed", 0),
        )
    except (ParamsError, ValueError, FileNotFoundError) as err:
        fail(err)
    write_json(stats, result)
    log(
        f"preprocess {dataset}: {result['users']} users, {result['items']} items, {result['interactions']} interactions; "
        f"train/valid/test {result['train']}/{result['valid']}/{result['test']}"
    )
