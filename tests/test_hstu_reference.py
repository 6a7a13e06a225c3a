"""HSTU's block and forward against an independent numpy reference written from the module docstring
(dim 4, 2 heads, length 3, seeded weights, eval mode, one left-padded and one doubly padded row):

  block: h = LayerNorm(x); U, V, Q, K = chunks (in that order) of SiLU(h W + b);
         per head and query i, over the keys j ≤ i that are not padding (n of them):
         A_ij = SiLU(q_i · k_j + rel_bias[head, i − j]) / n;
         y_i = x_i + W_o(U_i ⊙ LayerNorm(Σ_j A_ij v_j)) + b_o.
  forward: x_i = item_emb[s_i] + pos_emb[i − first real index] (0 at padding), the blocks, then x / ‖x‖.

Only real positions are compared: a padded query's output never reaches a real one (padded keys are
masked), so its value is not behaviour.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rcekd.backbones.hstu import HSTU, HSTUBlock

DIM, HEADS, LENGTH, N_ITEMS = 4, 2, 3, 5
PAD = N_ITEMS
REAL = np.array([[True, True, True], [False, True, True], [False, False, True]])  # row 1, 2: left-padded
EPS = 1e-5  # nn.LayerNorm's default


def seeded_(module: torch.nn.Module, seed: int) -> None:
    """Every parameter set to seeded numbers: LayerNorm scales near 1, the rest N(0, 0.6²)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            noise = torch.randn(param.shape, generator=gen, dtype=torch.float64)
            is_scale = "norm" in name and name.endswith("weight")
            param.copy_((1.0 + 0.3 * noise) if is_scale else 0.6 * noise)


def layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    mean = x.mean()
    var = ((x - mean) ** 2).mean()
    return (x - mean) / np.sqrt(var + EPS) * weight + bias


def silu(x: np.ndarray | float) -> np.ndarray | float:
    return x / (1.0 + np.exp(-x))


def block_params(block: HSTUBlock) -> dict[str, np.ndarray]:
    return {name: p.detach().double().numpy().copy() for name, p in block.named_parameters()}


def reference_block(x: np.ndarray, real: np.ndarray, p: dict[str, np.ndarray]) -> np.ndarray:
    """One sequence x [L, D] (real [L]) through the block formula, in loops, float64."""
    length, dim = x.shape
    width = dim // HEADS
    out = np.zeros_like(x)
    uvqk = [silu(p["uvqk.weight"] @ layer_norm(x[i], p["norm_in.weight"], p["norm_in.bias"]) + p["uvqk.bias"])
            for i in range(length)]
    u = [a[0:dim] for a in uvqk]
    v = [a[dim:2 * dim] for a in uvqk]
    q = [a[2 * dim:3 * dim] for a in uvqk]
    k = [a[3 * dim:4 * dim] for a in uvqk]
    for i in range(length):
        keys = [j for j in range(i + 1) if real[j]]
        mixed = np.zeros(dim)
        for h in range(HEADS):
            cols = slice(h * width, (h + 1) * width)
            for j in keys:
                a_ij = silu(q[i][cols] @ k[j][cols] + p["rel_bias"][h, i - j]) / len(keys)
                mixed[cols] += a_ij * v[j][cols]
        gated = u[i] * layer_norm(mixed, p["norm_attn.weight"], p["norm_attn.bias"])
        out[i] = x[i] + p["out.weight"] @ gated + p["out.bias"]
    return out


def assert_real_positions_close(got: torch.Tensor, expected: np.ndarray) -> None:
    got = got.detach().double().numpy()
    for b in range(len(REAL)):
        np.testing.assert_allclose(got[b][REAL[b]], expected[b][REAL[b]], rtol=1e-5, atol=1e-6, err_msg=f"row {b}")


def test_block_against_reference() -> None:
    """HSTUBlock.forward on a hand-built divisor (keys attended, ≥ 1, where causal ∧ key not padding;
    +inf elsewhere) and distance (i − j), with nonzero inputs at padded positions: they must not reach
    the real outputs."""
    torch.manual_seed(0)
    block = HSTUBlock(DIM, HEADS, max_len=LENGTH).eval()
    seeded_(block, seed=1)
    x = torch.randn(len(REAL), LENGTH, DIM, generator=torch.Generator().manual_seed(2))
    mask = torch.zeros(len(REAL), LENGTH, LENGTH, dtype=torch.bool)
    for b in range(len(REAL)):
        for i in range(LENGTH):
            for j in range(i + 1):
                mask[b, i, j] = bool(REAL[b, j])
    count = mask.sum(-1, keepdim=True).clamp(min=1).float()
    divisor = torch.where(mask, count, torch.tensor(float("inf")))
    distance = torch.tensor([[max(i - j, 0) for j in range(LENGTH)] for i in range(LENGTH)])
    with torch.no_grad():
        got = block(x, divisor, distance)
    p = block_params(block)
    expected = np.stack([reference_block(x[b].double().numpy(), REAL[b], p) for b in range(len(REAL))])
    assert_real_positions_close(got, expected)
    assert np.abs(expected - x.double().numpy()).max() > 0.1  # the block does change x


def sequences() -> torch.Tensor:
    rows = [[0, 3, 1], [PAD, 2, 4], [PAD, PAD, 3]]
    assert (np.array(rows) != PAD).tolist() == REAL.tolist()
    return torch.tensor(rows)


@pytest.mark.parametrize("blocks", [1, 2])
def test_forward_against_reference(blocks: int) -> None:
    """HSTU.forward: item + position embedding (positions counted from the row's first real item), the
    blocks, then L2 normalisation, against numpy; the padding row of item_emb is set nonzero too."""
    torch.manual_seed(0)
    model = HSTU(n_users=3, n_items=N_ITEMS, dim=DIM, blocks=blocks, heads=HEADS, max_len=LENGTH, dropout=0.0).eval()
    seeded_(model, seed=3)
    seq = sequences()
    with torch.no_grad():
        got = model(seq)
    item = model.item_emb.weight.detach().double().numpy()
    pos = model.pos_emb.weight.detach().double().numpy()
    params = [block_params(b) for b in model.blocks]
    expected = np.zeros((len(REAL), LENGTH, DIM))
    for b in range(len(REAL)):
        first = int(np.argmax(REAL[b]))
        x = np.stack([item[seq[b, i]] + pos[i - first] if REAL[b, i] else np.zeros(DIM) for i in range(LENGTH)])
        for p in params:
            x = reference_block(x, REAL[b], p)
        expected[b] = x / np.linalg.norm(x, axis=-1, keepdims=True)
    assert_real_positions_close(got, expected)
    norms = got.norm(dim=-1)[torch.from_numpy(REAL)]
    torch.testing.assert_close(norms, torch.ones_like(norms))

