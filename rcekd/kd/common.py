"""Pieces shared by distillation methods: what a method is given, and the soft-label CE."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from rcekd.cache import TeacherCache
from rcekd.sparse import UserItems


@dataclass(frozen=True)
class KDContext:
    """Everything a method may read: the teacher cache and the training items, on one device."""

    teacher: TeacherCache
    train: UserItems
    n_users: int
    n_items: int
    device: torch.device
    chunk: int = 1024


def soft_ce(
    teacher_logits: torch.Tensor,
    student_logits: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    tau: float = 1.0,
) -> torch.Tensor:
    """Per-row CE on a set: −Σ_i σ(t/τ)_i · log σ(s/τ)_i over the row's items where mask is True.

    teacher_logits, student_logits, mask: [B, N]. Returns [B]. Rows with an empty set give 0.
    """
    if mask is None:
        return -(F.softmax(teacher_logits / tau, dim=-1) * F.log_softmax(student_logits / tau, dim=-1)).sum(-1)
    empty = ~mask.any(-1)  # [B]
    mask = mask | empty[:, None]  # keep every row finite; empty rows are zeroed at the end
    target = F.softmax(teacher_logits.masked_fill(~mask, float("-inf")) / tau, dim=-1)
    log_pred = F.log_softmax(student_logits.masked_fill(~mask, float("-inf")) / tau, dim=-1)
    terms = torch.where(mask, target * log_pred, torch.zeros_like(log_pred))  # 0 · (−inf) off the set
    return (-terms.sum(-1)).masked_fill(empty, 0.0)


def pair_scores(user_vecs: torch.Tensor, item_table: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
    """Scores of each user against its own item list: [B, D] × items [B, N] → [B, N]."""
    return torch.einsum("bd,bnd->bn", user_vecs, item_table[items])
