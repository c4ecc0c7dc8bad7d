"""Two CPU processes under torchrun (gloo): DDP and FSDP2 match one process, and resume works.

Marked slow (each test launches torchrun); `.ci/run` runs them with `pytest -m slow`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from modlm.checkpoint import latest_checkpoint

pytestmark = pytest.mark.slow


@pytest.fixture
def corpus(number_corpus: Path) -> Path:
    return number_corpus


def run_train(tmp_path: Path, corpus: Path, name: str, nproc: int, *sets: str,
              resume: bool = False) -> Path:
    run = tmp_path / "runs" / name
    if resume:
        args = ["train", "--resume", str(run)]
    else:
        args = ["train", "--preset", "tiny"]
        for kv in (f"data.corpus={corpus}", f"data.cache_dir={tmp_path / 'cache'}",
                   f"out_dir={tmp_path / 'runs'}", f"run_name={name}", "device=cpu",
                   "log_every=1", "eval_batches=2", *sets):
            args += ["--set", kv]
    if nproc == 1:
        cmd = [sys.executable, "-m", "modlm", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={nproc}", "-m", "modlm", *args]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return run


def losses(run: Path) -> list[tuple[int, float]]:
    """(step, loss) of every step line, in file order, duplicates kept."""
    records = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in records if "eval" not in r]


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(latest_checkpoint(run) / "model.safetensors")


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_match_one_process_with_double_batch(tmp_path, corpus, strategy):
    common = ("steps=1", "eval_every=1", "checkpoint_every=1")
    single = run_train(tmp_path, corpus, "single", 1, "batch_size=4", *common)
    extra = ("fsdp=true",) if strategy == "fsdp" else ()
    double = run_train(tmp_path, corpus, strategy, 2, "batch_size=2", *common, *extra)
    assert losses(double)[0][1] == pytest.approx(losses(single)[0][1], rel=1e-6)
    w1, w2 = weights(single), weights(double)
    initial = run_train(tmp_path, corpus, "init", 1, "batch_size=4", "steps=1", "lr=1e-12")
    w0 = weights(initial)
    assert set(w1) == set(w2)
    for name in w1:
        torch.testing.assert_close(w2[name], w1[name], rtol=1e-5, atol=1e-6)
    # the step really moved the weights, so the comparison above had something to compare
    assert any(not torch.allclose(w1[n], w0[n], atol=1e-6) for n in w1)
    # only rank 0 wrote: one metrics line per step plus one eval line
    assert len((double / "metrics.jsonl").read_text().splitlines()) == 2


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_process_resume_repeats_the_losses(tmp_path, corpus, strategy):
    extra = ("fsdp=true",) if strategy == "fsdp" else ()
    sets = ("steps=6", "batch_size=2", "eval_every=3", "checkpoint_every=3", *extra)
    full = run_train(tmp_path, corpus, "full", 2, *sets)
    part = run_train(tmp_path, corpus, "part", 2, *sets)
    shutil.rmtree(latest_checkpoint(part))  # as if killed after the step-3 checkpoint
    run_train(tmp_path, corpus, "part", 2, resume=True)
    assert losses(part) == losses(full)


def test_fsdp_with_gradient_accumulation_matches_one_process(tmp_path, corpus):
    """2 processes x 1 sequence x 2 micro-steps (FSDP2) = 1 process x 2 sequences x 2 micro-steps:
    both draw the same 2 windows per micro-step from the sampler."""
    common = ("steps=2", "eval_every=2", "checkpoint_every=2", "grad_accum=2")
    single = run_train(tmp_path, corpus, "single", 1, "batch_size=2", *common)
    sharded = run_train(tmp_path, corpus, "fsdp", 2, "batch_size=1", "fsdp=true", *common)
    for (s1, l1), (s2, l2) in zip(losses(single), losses(sharded), strict=True):
        assert s1 == s2 and l2 == pytest.approx(l1, rel=1e-5)
    w1, w2 = weights(single), weights(sharded)
    for name in w1:
        torch.testing.assert_close(w2[name], w1[name], rtol=1e-5, atol=1e-6)
