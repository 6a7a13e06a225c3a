"""Backbones: every one maps a batch of users to user vectors and exposes an item table (`encode`),
and trains through `training_batches` / `batch_loss` (see base.py)."""

from rcekd.backbones.hstu import HSTU
from rcekd.backbones.lightgcn import LightGCN
from rcekd.backbones.mf import MF
from rcekd.backbones.sasrec import SASRec

BACKBONES = {
    "mf": MF,
    "lightgcn": LightGCN,
    "hstu": HSTU,
    "sasrec": SASRec,
}
