"""Backbones: every one maps a batch of users to user vectors and exposes an item table (`encode`)."""

from rcekd.backbones.mf import MF

BACKBONES = {
    "mf": MF,
}
