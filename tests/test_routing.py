"""Routing maths by hand (modlm/routing.py) and a fixed fake router (paper Sec 3.4).

Legend: B batch, T time, D width, K routed tokens per sequence.
"""

from __future__ import annotations

import math

import pytest
import torch

from modlm import routing
from modlm.block import RoutedBlock
from modlm.model import MoDLM

# ---- capacity_k ------------------------------------------------------------------------------

@pytest.mark.parametrize("seq_len, capacity, expected", [
    (2048, 0.125, 256),   # paper Sec 3.4: top 256 of 2048
    (16, 0.125, 2),
    (24, 0.125, 3),
    (7, 0.5, 3),          # floor(3.5)
    (7, 0.125, 1),        # floor(0.875) = 0, but at least one token
    (1, 0.01, 1),
    (100, 0.29, 29),      # 0.29 * 100 == 28.999999999999996 in floating point
    (100, 0.57, 57),      # 0.57 * 100 == 56.99999999999999
    (7, 1.0, 7),
    (37, 0.999, 36),
])
def test_capacity_k(seq_len, capacity, expected):
    assert routing.capacity_k(seq_len, capacity) == expected


@pytest.mark.parametrize("seq_len, capacity, match", [
    (0, 0.5, "sequence length"),
    (-3, 0.5, "sequence length"),
    (7, 0.0, "capacity"),
    (7, -0.1, "capacity"),
    (7, 1.5, "capacity"),
    (7, math.nan, "capacity"),
])
def test_capacity_k_rejects_bad_inputs(seq_len, capacity, match):
    with pytest.raises(ValueError, match=match):
        routing.capacity_k(seq_len, capacity)


# ---- topk_in_time_order ----------------------------------------------------------------------

def test_topk_in_time_order_by_hand():
    scores_BT = torch.tensor([
        [0.1, 0.9, 0.3, 0.8, 0.2, 0.7, 0.0],
        # Every score of this row is below every score of row 0: a top-k across the batch would
        # take nothing from it; per sequence it still gets exactly k.
        [-0.5, -0.4, -0.3, -0.2, -0.1, -1.0, -0.6],
        # Largest at the end and start: the output must be re-sorted by position.
        [5.0, 4.0, -3.0, -2.0, -1.0, 0.0, 6.0],
    ])
    idx_BK = routing.topk_in_time_order(scores_BT, 3)
    assert idx_BK.dtype == torch.int64
    assert torch.equal(idx_BK, torch.tensor([[1, 3, 5], [2, 3, 4], [0, 1, 6]]))

    assert torch.equal(routing.topk_in_time_order(scores_BT, 1), torch.tensor([[1], [4], [6]]))
    full = routing.topk_in_time_order(scores_BT, 7)
    assert torch.equal(full, torch.arange(7).expand(3, 7))


def test_topk_in_time_order_is_per_row():
    """Permuting the batch permutes the result: no information crosses rows."""
    g = torch.Generator().manual_seed(3)
    scores_BT = torch.randn(5, 16, generator=g)
    scores_BT[2] -= 100.0  # one row far below the others
    idx_BK = routing.topk_in_time_order(scores_BT, 4)
    for b in range(5):
        alone = routing.topk_in_time_order(scores_BT[b:b + 1], 4)
        assert torch.equal(idx_BK[b:b + 1], alone)
        expected = torch.sort(torch.argsort(scores_BT[b], descending=True)[:4]).values
        assert torch.equal(idx_BK[b], expected)
    assert (idx_BK.diff(dim=1) > 0).all()


# ---- indices_from_mask / mask_from_indices ---------------------------------------------------

MASK_BT = torch.tensor([
    [False, True, False, True, True, False, False],    # 3 routed
    [False, False, False, False, False, False, False],  # none routed
    [True, False, False, False, False, False, True],    # 2 routed
])


def test_indices_from_mask_by_hand():
    idx_BK, valid_BK = routing.indices_from_mask(MASK_BT)
    # K = the largest count (3). Padding entries point at unrouted positions, after the valid ones.
    assert torch.equal(idx_BK, torch.tensor([[1, 3, 4], [0, 1, 2], [0, 6, 1]]))
    assert torch.equal(valid_BK, torch.tensor([[True, True, True],
                                               [False, False, False],
                                               [True, True, False]]))
    # Padding never points at a routed token (so it cannot duplicate one).
    assert not MASK_BT.gather(1, idx_BK)[~valid_BK].any()


def test_indices_from_mask_nothing_routed():
    idx_BK, valid_BK = routing.indices_from_mask(torch.zeros(2, 5, dtype=torch.bool))
    assert idx_BK.shape == (2, 0) and valid_BK.shape == (2, 0)


def test_mask_from_indices_without_valid():
    idx_BK = torch.tensor([[1, 3, 5], [0, 1, 6]])
    mask_BT = routing.mask_from_indices(idx_BK, 7)
    assert mask_BT.dtype == torch.bool
    assert torch.equal(mask_BT, torch.tensor([
        [False, True, False, True, False, True, False],
        [True, True, False, False, False, False, True],
    ]))


def test_mask_from_indices_with_valid_round_trips():
    idx_BK, valid_BK = routing.indices_from_mask(MASK_BT)
    assert torch.equal(routing.mask_from_indices(idx_BK, 7, valid_BK), MASK_BT)
    # Without the validity mask the padding would be counted: the knob matters.
    assert not torch.equal(routing.mask_from_indices(idx_BK, 7), MASK_BT)


# ---- gather / scatter ------------------------------------------------------------------------

def test_gather_tokens_by_hand():
    x_BTD = torch.arange(2 * 7 * 3, dtype=torch.float32).view(2, 7, 3)
    idx_BK = torch.tensor([[1, 3, 5], [0, 1, 6]])
    got = routing.gather_tokens(x_BTD, idx_BK)
    expected = torch.stack([x_BTD[0, [1, 3, 5]], x_BTD[1, [0, 1, 6]]])
    assert got.shape == (2, 3, 3)
    assert torch.equal(got, expected)
    assert torch.equal(got[1, 2], torch.tensor([39.0, 40.0, 41.0]))  # row (1, 6): 21 + 18


def test_scatter_add_tokens_exact_values():
    x_BTD = torch.tensor([
        [[1.0, -0.0], [2.0, 3.0], [4.0, 5.0], [6.0, 7.0], [-0.0, 8.0]],
        [[9.0, 1.0], [-0.0, -0.0], [0.5, 0.25], [3.0, 2.0], [1.0, 1.0]],
    ])
    x_before = x_BTD.clone()
    idx_BK = torch.tensor([[1, 3], [0, 4]])
    upd_BKD = torch.tensor([[[10.0, 20.0], [30.0, 40.0]], [[0.5, 1.5], [-1.0, -2.0]]])
    out = routing.scatter_add_tokens(x_BTD, idx_BK, upd_BKD)
    expected = torch.tensor([
        [[1.0, -0.0], [12.0, 23.0], [4.0, 5.0], [36.0, 47.0], [-0.0, 8.0]],
        [[9.5, 2.5], [-0.0, -0.0], [0.5, 0.25], [3.0, 2.0], [0.0, -1.0]],
    ])
    assert torch.equal(out, expected)
    assert torch.equal(x_BTD, x_before)  # out of place
    # Unselected rows are bit-for-bit the input, signed zeros included.
    for b, t in [(0, 0), (0, 2), (0, 4), (1, 1), (1, 2), (1, 3)]:
        assert torch.equal(out[b, t], x_BTD[b, t])
        assert torch.equal(torch.signbit(out[b, t]), torch.signbit(x_BTD[b, t]))
    assert torch.signbit(out[0, 0, 1]) and torch.signbit(out[1, 1]).all()


def test_scatter_add_tokens_valid_path_drops_padding():
    mask_BT = torch.tensor([[False, True, False, True, False],
                            [False, False, True, False, False]])
    idx_BK, valid_BK = routing.indices_from_mask(mask_BT)
    assert torch.equal(idx_BK, torch.tensor([[1, 3], [2, 0]]))  # (1, 0) is padding
    x_BTD = torch.tensor([
        [[1.0, 2.0], [3.0, 4.0], [5.0, 6.0], [7.0, 8.0], [9.0, 10.0]],
        [[-0.0, -0.0], [1.0, 1.0], [2.0, 2.0], [-0.0, 3.0], [4.0, 4.0]],
    ])
    # The padding entry carries a zero and a non-zero: adding either would change row (1, 0)
    # (-0.0 + 0.0 is +0.0, so even a zero update would flip the sign bit).
    upd_BKD = torch.tensor([[[1.0, 1.0], [2.0, 2.0]], [[0.25, 0.5], [0.0, 7.0]]])
    out = routing.scatter_add_tokens(x_BTD, idx_BK, upd_BKD, valid_BK)
    expected = x_BTD.clone()
    expected[0, 1] += 1.0
    expected[0, 3] += 2.0
    expected[1, 2] += torch.tensor([0.25, 0.5])
    assert torch.equal(out, expected)
    assert torch.equal(out[1, 0], x_BTD[1, 0])
    assert torch.signbit(out[1, 0]).all()
    assert torch.signbit(out[1, 3, 0])
    unrouted = ~mask_BT
    assert torch.equal(out[unrouted], x_BTD[unrouted])
    assert torch.equal(torch.signbit(out[unrouted]), torch.signbit(x_BTD[unrouted]))
    # The knob matters: without valid_BK the padding update lands on row (1, 0).
    assert not torch.equal(routing.scatter_add_tokens(x_BTD, idx_BK, upd_BKD)[1, 0], x_BTD[1, 0])


# ---- a fixed fake router ---------------------------------------------------------------------

def test_fixed_router_selects_known_tokens(make_cfg):
    """Router weight e_0 makes the score of a token its first feature, chosen by hand."""
    cfg = make_cfg(routing=dict(capacity=0.25))  # T = 8 -> k = 2
    block = RoutedBlock(cfg, layer=1)
    model = MoDLM(cfg)  # only for its rotary table
    with torch.no_grad():
        block.router.weight.zero_()
        block.router.weight[0] = 1.0
    x_BTD = torch.randn(2, 8, cfg.d_model)
    scores_BT = torch.tensor([[0.3, -1.0, 2.0, 0.1, 0.0, 1.5, -0.2, 0.4],
                              [5.0, 4.0, -3.0, 0.0, 0.0, 0.0, 0.0, 6.0]])
    x_BTD[..., 0] = scores_BT
    out, stats = block(x_BTD, model.rotary, "topk")
    expected_idx = torch.tensor([[2, 5], [0, 7]])
    expected_mask = routing.mask_from_indices(expected_idx, 8)
    assert torch.equal(stats.mask_BT, expected_mask)
    # Unrouted tokens untouched, routed tokens changed by exactly w * f(gathered tokens).
    assert torch.equal(out[~expected_mask], x_BTD[~expected_mask])
    x_BKD = torch.stack([x_BTD[0, [2, 5]], x_BTD[1, [0, 7]]])
    rot = model.rotary(expected_idx)  # true positions
    delta_BKD, _ = block.block.update(x_BKD, *(rot if isinstance(rot, tuple) else (rot,)))
    w_BK = torch.sigmoid(torch.tensor([[2.0, 1.5], [5.0, 6.0]]))
    got_BKD = torch.stack([out[0, [2, 5]], out[1, [0, 7]]])
    torch.testing.assert_close(got_BKD, x_BKD + w_BK[..., None] * delta_BKD, rtol=0, atol=1e-6)
    assert not torch.equal(got_BKD, x_BKD)


def test_fixed_router_in_model_routes_by_token_id(make_cfg):
    """Routing block 0 from embeddings whose first feature is the token id / 100."""
    cfg = make_cfg(routing=dict(layers=(0,), first_layer_dense=False, capacity=0.25))
    model = MoDLM(cfg)
    with torch.no_grad():
        model.embed.weight[:, 0] = torch.arange(cfg.vocab_size) / 100.0
        model.blocks[0].router.weight.zero_()
        model.blocks[0].router.weight[0] = 1.0
    idx_BT = torch.tensor([[10, 50, 3, 98, 7, 60, 1, 2],
                           [90, 80, 70, 5, 6, 4, 3, 95]])
    out = model(idx_BT)
    (stats,) = out.routing
    assert stats.k == 2
    expected = torch.zeros(2, 8, dtype=torch.bool)
    expected[0, [3, 5]] = True   # ids 98 and 60
    expected[1, [0, 7]] = True   # ids 90 and 95
    assert torch.equal(stats.mask_BT, expected)
    torch.testing.assert_close(stats.weights_BT, torch.sigmoid(idx_BT / 100.0), rtol=0, atol=1e-6)
