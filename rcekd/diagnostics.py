"""What a distillation run does to the student's ranking, epoch by epoch, on a fixed sample of users:
the evidence behind the paper's Fig. 2, Fig. 5 and Fig. 10.

Per epoch (after its steps, on the student in eval mode):
  train NDCG@10 — all items ranked (training items included), the user's training items as targets (Fig. 5);
  s_u = |Q^T ∩ Q^S| / K — the teacher's and the student's top-K (training items excluded) (Fig. 10);
  for the first `rank_users` of the sample: the student's rank (1 = best, among non-training items) of
  each of the teacher's top-K items (Fig. 2).
The sample comes from its own generator seeded with the run's seed, so recording draws nothing from the
training generator: a run with diagnostics trains exactly as one without.

`write` keeps three moments: the first epoch ("start"), the best epoch ("end", the reported checkpoint)
and half-way to it ("middle"), plus the per-epoch means:
  epochs.csv   epoch, train_ndcg@10, s_u_mean
  s_u.csv      phase, epoch, s_u, users        (users of the sample at each value j/K)
  ranks.csv    phase, epoch, user, teacher_rank, student_rank
"""

from __future__ import annotations

import csv
from pathlib import Path

import torch
from torch import nn

from rcekd.cache import TeacherCache
from rcekd.evaluate import score_users
from rcekd.io import atomic_path
from rcekd.kd.common import rows_mask
from rcekd.metrics import ranking_metrics
from rcekd.sparse import UserItems


class RankingDiagnostics:
    """Call with (epoch, model) after each epoch (the loop's `on_epoch`); then `write(dir, best_epoch)`."""

    resume_attrs = ("epochs", "s_u", "ranks")  # kept between epochs

    def __init__(
        self,
        teacher: TeacherCache,
        train: UserItems,
        *,
        users: int,
        rank_users: int,
        k: int,
        seed: int,
        device: torch.device,
    ):
        if users < 1 or not 0 <= rank_users <= users or not 0 < k <= train.n_items:
            raise ValueError(
                f"diagnostics: users = {users} (expected >= 1), rank_users = {rank_users} (expected 0..users), "
                f"k = {k} (expected 1..{train.n_items})"
            )
        generator = torch.Generator().manual_seed(seed)
        has_train = (train.counts > 0).nonzero().squeeze(1).cpu()
        pick = torch.randperm(len(has_train), generator=generator)[:users]
        self.users = has_train[pick].sort().values.to(device)  # [n]
        self.k, self.rank_users = k, rank_users
        self.train_mask = rows_mask(train, self.users)  # [n, I]
        teacher_scores = teacher.rows_of(self.users).masked_fill(self.train_mask, float("-inf"))  # [n, I]
        self.teacher_top = teacher_scores.topk(k, dim=1).indices  # Q^T [n, K]
        self.epochs: list[dict] = []
        self.s_u: dict[int, torch.Tensor] = {}  # epoch → users at each overlap count 0..K [K + 1]
        self.ranks: dict[int, torch.Tensor] = {}  # epoch → student ranks of Q^T [rank_users, K]
        self.buffer: torch.Tensor | None = None  # the sample's scores, reused every epoch

    @torch.no_grad()
    def __call__(self, epoch: int, model: nn.Module) -> None:
        was_training = model.training
        model.eval()
        try:
            scores = self.buffer = score_users(model, self.users, exclude=[], out=self.buffer)  # [n, I], the evaluation's scorer
        finally:
            model.train(was_training)
        top10 = scores.topk(10, dim=1).indices
        train_ndcg = ranking_metrics(self.train_mask.gather(1, top10), self.train_mask.sum(1), (10,))["ndcg@10"]
        scores.masked_fill_(self.train_mask, float("-inf"))
        student_top = scores.topk(self.k, dim=1).indices  # Q^S [n, K]
        common = (self.teacher_top[:, :, None] == student_top[:, None, :]).any(2).sum(1)  # |Q^T ∩ Q^S| [n]
        self.s_u[epoch] = torch.bincount(common, minlength=self.k + 1).cpu()
        ranked = scores[: self.rank_users]
        ascending = ranked.sort(dim=1).values
        above = ranked.shape[1] - torch.searchsorted(ascending, ranked.gather(1, self.teacher_top[: self.rank_users]), right=True)
        self.ranks[epoch] = (above + 1).cpu()  # 1 = the student's best non-training item
        self.epochs.append(
            {"epoch": epoch, "train_ndcg@10": float(train_ndcg.mean()), "s_u_mean": float(common.float().mean()) / self.k}
        )

    def write(self, directory: str | Path, best_epoch: int) -> None:
        last = self.epochs[-1]["epoch"] if self.epochs else 0
        end = best_epoch if best_epoch in self.s_u else last
        phases = {"start": min(self.s_u, default=0), "middle": max(1, (end + 1) // 2), "end": end}
        with atomic_path(directory) as tmp:
            tmp.mkdir()
            _write_csv(tmp / "epochs.csv", self.epochs)
            _write_csv(tmp / "s_u.csv", [
                {"phase": phase, "epoch": epoch, "s_u": j / self.k, "users": int(count)}
                for phase, epoch in phases.items() if epoch in self.s_u
                for j, count in enumerate(self.s_u[epoch].tolist())
            ])
            users = self.users[: self.rank_users].tolist()
            _write_csv(tmp / "ranks.csv", [
                {"phase": phase, "epoch": epoch, "user": users[row], "teacher_rank": position + 1, "student_rank": int(rank)}
                for phase, epoch in phases.items() if phase != "middle" and epoch in self.ranks
                for row, ranks in enumerate(self.ranks[epoch].tolist())
                for position, rank in enumerate(ranks)
            ])


def _write_csv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]) if rows else [])
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
