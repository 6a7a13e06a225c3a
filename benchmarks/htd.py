"""HTD's topology loss (rcekd/kd/htd.py) at CiteULike's sizes: seconds per forward + backward of one
training step's L_TD in the CPU's form, against the dense form measured in this run (every entity pair's
cosines, [N, N], masked to same-group pairs: the form a GPU runs, and the CPU's before 2026-12-07).

The CPU's form runs the entity level group by group (Σ_g n_g² pairs instead of N²). Its gain depends on
how the selectors spread a batch's entities over the 2 × 30 groups, so three spreads are timed: uniform,
a skewed one (group sizes ∝ 1/rank) and a collapsed one (half the entities in one group). Both forms
compute the same loss and gradient (checked here); the figures are medians of --repeats runs.

Usage: python benchmarks/htd.py [--teacher-dim 200] [--repeats 5]
"""

from __future__ import annotations

import argparse

import torch
from experts import seconds  # benchmarks/experts.py: the median of timed runs after a warm-up

from rcekd.kd import htd

BATCH_USERS, BATCH_ITEMS, GROUPS, D_S = 1500, 3500, 30, 20


def form(by_group: bool, student: torch.Tensor, teacher: torch.Tensor, groups: torch.Tensor, n_groups: int) -> torch.Tensor:
    """rcekd's L_TD (choice second) with its entity level group by group (the CPU's form) or over all pairs."""
    htd.GROUP_BY_GROUP = {"cpu"} if by_group else set()
    return htd.topology(student, teacher, groups, n_groups, "second")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher-dim", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    n, n_groups = BATCH_USERS + BATCH_ITEMS, 2 * GROUPS
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {n} entities, {n_groups} groups, "
          f"d_S {D_S}, d_T {args.teacher_dim}")
    student, teacher = torch.randn(n, D_S, requires_grad=True), torch.randn(n, args.teacher_dim)
    rank = torch.arange(1, n_groups + 1, dtype=torch.float32)
    collapsed = torch.full((n_groups,), 0.5 / (n_groups - 1))
    collapsed[0] = 0.5
    for spread, weights in (("uniform", torch.ones(n_groups)), ("skewed 1/rank", 1 / rank), ("collapsed", collapsed)):
        groups = torch.multinomial(weights, n, replacement=True)
        grads = []
        for by_group in (False, True):
            student.grad = None
            loss = form(by_group, student, teacher, groups, n_groups)
            loss.backward()
            grads.append((loss.detach(), student.grad.clone()))
        torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-5)
        slow = seconds(lambda: form(False, student, teacher, groups, n_groups).backward(), args.repeats)
        fast = seconds(lambda: form(True, student, teacher, groups, n_groups).backward(), args.repeats)
        print(f"{spread}: dense [N, N] {slow:.3f} s, group by group {fast:.3f} s per step ({slow / fast:.1f}x)")


if __name__ == "__main__":
    main()
