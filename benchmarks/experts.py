"""The projectors of the feature-level methods (MKD, DE, HTD), at CiteULike's sizes: seconds per
forward + backward of one training step's projector work, each computed two or three ways in this run.

1. Experts (DE: 30, MKD: 5; d_S 20 → (d_S + d_T) / 2 → d_T) over a batch's entities: one expert at a
   time, as their definition reads, against `mixture_of_experts` (the experts side by side, two matrix
   products).
2. MKD's CPD2 over the teacher's top-N items of a batch's users (every user's top-N drawn with a
   popularity skew, so that items repeat as a teacher's do): (a) g's d_T-wide output for every item,
   then the dot products; (b) g's hidden units only (f(u)·g(i) = (Wᵀf(u) · h_i + b·f(u)) / M) for
   every item, their [B, N, M·h] rows gathered at once; (c) as rcekd/kd/mkd.py computes it: the hidden
   units of the items in some user's top-N only, `pair_scores` gathering them in blocks of users.
All forms of one item compute the same numbers (checked here); the figures are medians of --repeats runs.
Deterministic algorithms stay off (training turns them on): autograd's backward of (a) and (b) is then
its faster, non-deterministic one, so their ratios to (c) understate what training saves.

Usage: python benchmarks/experts.py [--teacher-dim 400] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from rcekd.kd import common
from rcekd.kd.common import mixture_of_experts, pair_scores
from rcekd.kd.de import Experts
from rcekd.kd.mkd import Projector

USERS, ITEMS, BATCH_USERS, BATCH_ITEMS, ROWS, TOP_N, D_S = 5219, 25181, 1500, 3500, 2048, 50, 20


def seconds(step, repeats: int) -> float:
    step()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher-dim", type=int, default=400)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    d_t = args.teacher_dim
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; d_S {D_S}, d_T {d_t}")

    for name, m, entities in (("DE", 30, BATCH_USERS + BATCH_ITEMS), ("MKD NKD", 5, BATCH_USERS + BATCH_ITEMS)):
        side = Experts(D_S, d_t, m)
        x = torch.randn(entities, D_S, requires_grad=True)
        choice = torch.softmax(torch.randn(entities, m), 1)
        one_by_one = lambda: (choice[..., None] * torch.stack([e(x) for e in side.experts], 1)).sum(1)  # noqa: E731
        wide = lambda: mixture_of_experts(side.experts, x, choice)  # noqa: E731
        torch.testing.assert_close(one_by_one(), wide(), rtol=1e-4, atol=1e-5)
        slow, fast = (seconds(lambda f=f: f().square().sum().backward(), args.repeats) for f in (one_by_one, wide))
        print(f"{name}: {m} experts over {entities} entities: one by one {slow:.3f} s, side by side {fast:.3f} s "
              f"per step ({slow / fast:.1f}x)")

    f, g = Projector(D_S, d_t, 5), Projector(D_S, d_t, 5)
    users, table = torch.randn(BATCH_USERS, D_S), torch.randn(ITEMS, D_S)
    popularity = torch.arange(1, ITEMS + 1, dtype=torch.float32) ** -1.3  # ~14k distinct, as the MF teacher's 14,742
    every_top = torch.multinomial(popularity.expand(USERS, -1), TOP_N)  # [U, N], distinct per user
    top_items, top_at = torch.unique(every_top, return_inverse=True)
    top = every_top[:BATCH_USERS]  # [B, N]

    def full_output() -> torch.Tensor:  # g on every item, then the dot products
        return torch.einsum("bd,bnd->bn", f(users), g(table)[top])

    def hidden_units(top_items_only: bool) -> torch.Tensor:
        weight, bias = g.output_layer()
        f_u = f(users)
        a, c = f_u @ weight, f_u @ bias
        if top_items_only:  # rcekd/kd/mkd.py's form
            return (pair_scores(a, g.hidden(table[top_items]), top_at[:BATCH_USERS]) + c[:, None]) / len(g.experts)
        return (torch.einsum("bd,bnd->bn", a, g.hidden(table)[top]) + c[:, None]) / len(g.experts)

    forms = {"g's output, every item": full_output, "hidden units, every item": lambda: hidden_units(False),
             "hidden units of the top-N items, in blocks": lambda: hidden_units(True)}
    reference = full_output()
    times = {}
    for name, form in forms.items():
        torch.testing.assert_close(form(), reference, rtol=1e-4, atol=1e-5)
        times[name] = seconds(lambda s=form: s().square().sum().backward(), args.repeats)
    fast = times["hidden units of the top-N items, in blocks"]
    print(f"MKD CPD2, top-{TOP_N} of {BATCH_USERS} users ({len(top_items)} items in some user's top-{TOP_N}, of {ITEMS}), "
          f"blocks of {common.CHUNK_ELEMENTS} gathered values:")
    for name, value in times.items():
        print(f"  {name}: {value:.3f} s per step ({value / fast:.1f}x the last)")


if __name__ == "__main__":
    main()
