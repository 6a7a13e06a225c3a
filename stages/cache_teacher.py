"""Stage 3: write the teacher's scores once (memmap + top-K Parquet + validated metadata)."""

from __future__ import annotations

from pathlib import Path

import typer

from rcekd.cache import STORES, write_cache
from rcekd.checkpoint import load_checkpoint
from rcekd.data import load_splits
from rcekd.io import file_sha256
from rcekd.train import resolve_device
from stages.common import log, progress
from stages.params import PARAMS_OPTION, ParamsError, fail, load_params, section


def main(
    data: Path = typer.Option(..., help="Processed dataset directory (from preprocess)."),
    checkpoint: Path = typer.Option(..., help="Teacher checkpoint (from train_teacher)."),
    out: Path = typer.Option(..., help="Output cache directory."),
    params: Path = PARAMS_OPTION,
) -> None:
    """Score all users × items with the teacher, chunk by chunk (params: device, cache).

    cache.store: float32 (the full score matrix), float16 (half the disk and reads) or factors (the
    teacher's user vectors and item table; scores are recomputed on read).

    An HSTU teacher's scores are the logits it was trained on (cosine / temperature) unless
    cache.hstu_logit is `cosine` (the authors' code)."""
    try:
        all_params = load_params(params)
        topk = section(all_params, "cache.topk", params)  # integers >= 1: checked by load_params
        chunk = section(all_params, "cache.chunk", params)
        store = section(all_params, "cache.store", params)
        if store not in STORES:
            raise ParamsError(f"{params}: cache.store = {store!r}; expected one of {', '.join(STORES)}")
        logit = section(all_params, "cache.hstu_logit", params)
        if logit not in ("trained", "cosine"):
            raise ParamsError(f"{params}: cache.hstu_logit = {logit!r}; expected 'trained' (cosine / temperature) or 'cosine'")
        device = resolve_device(section(all_params, "device", params))
        splits = load_splits(data)
        teacher, meta = load_checkpoint(checkpoint, splits=splits, device=device)
        if logit == "cosine" and hasattr(teacher, "use_raw_cosine"):
            teacher.use_raw_cosine()
    except (ParamsError, ValueError, FileNotFoundError) as err:
        fail(err)
    if topk > splits.n_items:
        fail(ParamsError(f"{params}: cache.topk = {topk} exceeds the {splits.n_items} items of {splits.name}"))
    what = "factors" if store == "factors" else f"{store} scores ({splits.n_users * splits.n_items * (2 if store == 'float16' else 4) / 1e9:.2f} GB)"
    log(f"cache_teacher: {splits.n_users} x {splits.n_items}, stored as {what} + top-{topk} lists")
    write_cache(
        teacher, splits, out, topk=topk, checkpoint_sha256=file_sha256(checkpoint), chunk=chunk, device=device,
        store=store, progress=progress("cache_teacher"),
    )
    log(f"cache_teacher: wrote {out}")
