"""Routing analysis maths on hand-made masks, and collecting routing from a tiny model."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from modlm.experiments import analysis
from modlm.model import MoDLM
from tests.conftest import tiny_config


def layer(mask):
    return SimpleNamespace(mask_BT=torch.tensor(mask, dtype=torch.bool))


def test_blocks_used_counts_routed_blocks_per_token():
    routing = [layer([[1, 0, 1, 0, 0]]), layer([[1, 1, 0, 0, 0]]), layer([[1, 0, 0, 0, 1]])]
    assert analysis.blocks_used(routing).tolist() == [[3, 1, 1, 0, 1]]
    assert analysis.routing_mask(routing).shape == (3, 1, 5)


def test_routing_mask_refuses_a_dense_model():
    with pytest.raises(ValueError, match="no routed block"):
        analysis.routing_mask([])


def test_prediction_entropy_uniform_and_peaked():
    V = 7
    logits = torch.zeros(1, 2, V)
    logits[0, 1, 3] = 100.0
    ent = analysis.prediction_entropy(logits)
    assert ent[0, 0] == pytest.approx(math.log(V), abs=1e-6)
    assert ent[0, 1] == pytest.approx(0.0, abs=1e-6)


def test_pearson_and_spearman_by_hand():
    x = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert analysis.pearson(x, 2 * x + 1) == pytest.approx(1.0)
    assert analysis.pearson(x, -x) == pytest.approx(-1.0)
    assert math.isnan(analysis.pearson(x, torch.ones(4)))
    # Ties share the average rank: ranks of x are [1, 2.5, 2.5, 4], of y [1, 3, 2, 4];
    # rho = 4.5 / sqrt(4.5 * 5).
    xt, yt = torch.tensor([1, 2, 2, 3]), torch.tensor([10.0, 30.0, 20.0, 40.0])
    assert analysis.ranks(xt).tolist() == [1.0, 2.5, 2.5, 4.0]
    assert analysis.spearman(xt, yt) == pytest.approx(4.5 / math.sqrt(22.5))
    # Spearman sees only order: a monotone but non-linear relation is a perfect one.
    assert analysis.spearman(x, x ** 3) == pytest.approx(1.0)
    assert analysis.pearson(x, x ** 3) < 0.99
    with pytest.raises(ValueError, match="differ in length"):
        analysis.pearson(x, x[:3])


def test_ranks_of_a_permutation_with_ties():
    r = analysis.ranks(torch.tensor([3.0, 1.0, 3.0, 2.0, 3.0]))
    assert r.tolist() == [4.0, 1.0, 4.0, 2.0, 4.0]


def test_entropy_by_blocks_used():
    blocks = torch.tensor([[0, 2, 2, 1, 0]])
    ent = torch.tensor([[1.0, 3.0, 5.0, 2.0, 0.0]])
    buckets = analysis.entropy_by_blocks_used(blocks, ent, n_blocks=3)
    assert [b.blocks for b in buckets] == [0, 1, 2, 3]
    assert [b.tokens for b in buckets] == [2, 1, 2, 0]
    assert [b.mean_entropy for b in buckets[:3]] == [0.5, 2.0, 4.0]
    assert math.isnan(buckets[3].mean_entropy)


def test_weight_histogram_bins_and_clamps():
    w = torch.tensor([[0.0, 0.1, 0.49, 0.51, 1.0, 1.7, -0.2]])
    counts, edges = analysis.weight_histogram(w, bins=2)
    assert edges.tolist() == [0.0, 0.5, 1.0]
    assert counts.tolist() == [[4, 3]]  # -0.2 clamps into the first bin, 1.7 into the last
    with pytest.raises(ValueError):
        analysis.weight_histogram(w, bins=0)


def test_collect_routing_topk_routes_exactly_k_per_row_and_block():
    cfg = tiny_config()
    model = MoDLM(cfg)
    g = torch.Generator().manual_seed(1)
    windows = [torch.randint(0, cfg.vocab_size, (3, 16), generator=g) for _ in range(2)]
    rec = analysis.collect_routing(model, windows, "topk")
    L = len(cfg.routed_layers)
    assert rec.layers == cfg.routed_layers
    assert rec.mask_LBT.shape == (L, 6, 16) and rec.entropy_BT.shape == (6, 16)
    k = max(1, math.floor(cfg.routing.capacity * 16))
    assert (rec.mask_LBT.sum(-1) == k).all()
    assert int(rec.blocks_used_BT.sum()) == L * 6 * k
    s = analysis.summarise(rec, bins=10)
    assert s["tokens"] == 6 * 16
    assert s["routed_fraction_per_layer"] == pytest.approx([k / 16] * L)
    assert sum(s["weight_histogram"]["counts"][0]) == 6 * 16
    assert sum(b["tokens"] for b in s["entropy_by_blocks_used"]) == 6 * 16
    # The entropy *of* a token comes from the previous position: one fewer per row.
    assert sum(b["tokens"] for b in s["entropy_of_token_by_blocks_used"]) == 6 * 15
    assert -1 <= s["spearman_blocks_entropy_of_token"] <= 1
    assert model.training  # restored


def test_collect_routing_causal_mode_differs_from_topk():
    torch.manual_seed(3)
    model = MoDLM(tiny_config())
    x = torch.randint(0, 99, (4, 16))
    topk = analysis.collect_routing(model, [x], "topk")
    causal = analysis.collect_routing(model, [x], "router")
    # An untrained router routes about half the tokens causally, far from k = 2 of 16.
    assert not torch.equal(topk.mask_LBT, causal.mask_LBT)
    # The first routed block scores the same residual in both modes; later ones do not.
    assert torch.equal(topk.weights_LBT[0], causal.weights_LBT[0])
    assert not torch.equal(topk.weights_LBT[1], causal.weights_LBT[1])
