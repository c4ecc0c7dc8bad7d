"""CUDA checks: the same model on a GPU, in float32 and under bfloat16 autocast.

Marked `gpu` and skipped where no CUDA device exists (the CPU-only CI); they run on GPU
machines with `pytest -m gpu`.
"""

from __future__ import annotations

import pytest
import torch

from modlm.config import ModelConfig
from modlm.model import MoDLM
from modlm.runtime import autocast

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(),
                       reason="needs a CUDA device; runs on GPU machines (pytest -m gpu)"),
]


def small_model() -> tuple[ModelConfig, MoDLM]:
    cfg = ModelConfig(vocab_size=99, d_model=64, n_layers=4, n_heads=4, d_mlp=96, max_seq_len=64)
    torch.manual_seed(0)
    return cfg, MoDLM(cfg)


@pytest.mark.parametrize("mode", ["topk", "router", "predictor"])
def test_cuda_float32_matches_cpu(mode):
    cfg, model = small_model()
    idx = torch.randint(0, cfg.vocab_size, (3, 64))
    cpu = model(idx, idx, mode=mode)
    gpu = model.cuda()(idx.cuda(), idx.cuda(), mode=mode)
    for a, b in zip(cpu.routing, gpu.routing):
        assert torch.equal(a.mask_BT, b.mask_BT.cpu())
    torch.testing.assert_close(gpu.logits_BTV.cpu(), cpu.logits_BTV, rtol=1e-3, atol=1e-3)


def test_cuda_bfloat16_autocast_trains_with_float32_routing():
    cfg, model = small_model()
    model = model.cuda()
    idx = torch.randint(0, cfg.vocab_size, (4, 64), device="cuda")
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(20):
        with autocast(torch.device("cuda"), "bfloat16"):
            out = model(idx, idx)
        assert out.logits_BTV.dtype == torch.bfloat16
        assert all(s.weights_BT.dtype == torch.float32 for s in out.routing)  # router in fp32
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(out.lm_loss.item())
    assert losses[-1] < losses[0] - 0.5
