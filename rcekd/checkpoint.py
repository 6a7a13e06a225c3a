"""Checkpoints carry the arguments that rebuild their model, and what they were trained on."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from rcekd.backbones import BACKBONES
from rcekd.data import Splits
from rcekd.io import atomic_path

FORMAT_VERSION = 1


def save_checkpoint(path: str | Path, *, backbone: str, kwargs: dict, state: dict, meta: dict) -> None:
    payload = {"format_version": FORMAT_VERSION, "backbone": backbone, "kwargs": kwargs, "state": state, "meta": meta}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load_checkpoint(
    path: str | Path,
    *,
    splits: Splits | None = None,
    split_fingerprint: str | None = None,
    device: torch.device | str = "cpu",
) -> tuple[nn.Module, dict]:
    """Rebuild the model of a checkpoint, bound to `splits`' training pairs when given (the graph of
    LightGCN, the sequences of HSTU); refuse one made for another split."""
    if splits is not None:
        split_fingerprint = splits.fingerprint
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: checkpoint not found")
    try:
        payload = torch.load(path, map_location=device, weights_only=True)
    except Exception as err:  # a truncated or foreign file
        raise ValueError(f"{path}: not a readable rcekd checkpoint ({type(err).__name__}: {err})") from None
    if not isinstance(payload, dict) or payload.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: not an rcekd checkpoint of format version {FORMAT_VERSION}")
    if payload["backbone"] not in BACKBONES:
        raise ValueError(f"{path}: unknown backbone {payload['backbone']!r}; known: {sorted(BACKBONES)}")
    meta = payload["meta"]
    if split_fingerprint is not None and meta.get("split_fingerprint") != split_fingerprint:
        raise ValueError(
            f"{path}: trained on split {meta.get('split_fingerprint')}, but the dataset given has split {split_fingerprint}"
        )
    model = BACKBONES[payload["backbone"]](**payload["kwargs"])
    model.load_state_dict(payload["state"])
    if splits is not None:
        model.bind(splits.train)
    return model.to(device), meta
