"""The trainer: schedule, parameter groups, run folder, FLOP budgets, exact resume, failures."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from support import snapshot

from modlm import flops
from modlm.checkpoint import CheckpointError, latest_checkpoint, list_checkpoints, load_checkpoint
from modlm.config import ConfigError, ModelConfig, apply_overrides
from modlm.data import DataConfig, TrainSampler, prepare_data
from modlm.model import MoDLM
from modlm.optim import build_optimizer, lr_at, parameter_groups
from modlm.train import TrainConfig, TrainingError, load_run_config, train, train_preset

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    # A repetitive but not trivial text: enough for windows, learnable in a few steps.
    words = ["the", "router", "picks", "tokens", "and", "blocks", "skip", "others", "quickly"]
    lines = [" ".join(words[(i * j) % len(words)] for j in range(1, 12)) for i in range(400)]
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(lines))
    return path


def tiny_cfg(tmp_path: Path, corpus: Path, **kw) -> TrainConfig:
    model = ModelConfig(vocab_size=256, d_model=32, n_layers=3, n_heads=2, d_mlp=37,
                        max_seq_len=32)
    data = DataConfig(corpus=str(corpus), seq_len=32, cache_dir=str(tmp_path / "cache"),
                      val_fraction=0.1)
    base = dict(model=model, data=data, steps=8, batch_size=4, lr=3e-3, warmup_steps=2,
                eval_every=4, eval_batches=2, checkpoint_every=4, log_every=1, device="cpu",
                out_dir=str(tmp_path / "runs"), run_name="run")
    base.update(kw)
    return TrainConfig(**base)


def metric_lines(run_dir: Path) -> list[tuple[int, bool]]:
    """(step, is_eval) of every metrics line, duplicates kept."""
    return [(r["step"], "eval" in r) for r in
            (json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines())]


def step_losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r and "eval" not in r}


# ---- schedule and optimizer ---------------------------------------------------------------------

def test_lr_schedule_warmup_then_cosine_over_exactly_the_run():
    total, peak, warm = 100, 1e-3, 10
    lrs = [lr_at(s, total, peak, warm, 0.1) for s in range(total)]
    assert lrs[0] == pytest.approx(peak / warm) and lrs[warm - 1] == pytest.approx(peak)
    assert all(a < b for a, b in zip(lrs[:warm], lrs[1:warm]))          # rising warm-up
    assert all(a >= b for a, b in zip(lrs[warm:], lrs[warm + 1:]))      # decaying after
    assert lrs[warm] == pytest.approx(peak)
    # the cosine reaches its floor at the run's end, not before and not after
    assert lr_at(total, total, peak, warm, 0.1) == pytest.approx(0.1 * peak)
    assert lrs[-1] > 0.1 * peak
    mid = warm + (total - warm) // 2
    assert lrs[mid] == pytest.approx(0.1 * peak + 0.45 * peak, rel=1e-6)


def test_parameter_groups_decay_only_matrices():
    model = MoDLM(ModelConfig(vocab_size=99, d_model=32, n_layers=2, n_heads=2, d_mlp=37,
                              max_seq_len=16))
    decay, no_decay = parameter_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    kept = {names[id(p)] for p in no_decay["params"]}
    assert "embed.weight" in kept and "blocks.1.router.weight" in kept
    assert all("norm" not in n for n in decayed)
    assert "blocks.0.attn.qkv.weight" in decayed and "blocks.1.predictor.fc.weight" in decayed
    total = len(decay["params"]) + len(no_decay["params"])
    assert total == len(list(model.parameters()))  # tied weight once
    all_decay, none = parameter_groups(model, 0.1, decay_all=True)
    assert len(all_decay["params"]) == total and not none["params"]


# ---- config ------------------------------------------------------------------------------

def test_train_config_errors_and_overrides():
    with pytest.raises(ConfigError, match="set the training length one way"):
        TrainConfig()
    with pytest.raises(ConfigError, match=r"got \['steps', 'flops'\]"):
        TrainConfig(steps=3, flops=1e12)
    with pytest.raises(ConfigError, match="lr must be a finite number, got True"):
        TrainConfig(steps=1, lr=True)
    with pytest.raises(ConfigError, match="betas must be two numbers"):
        TrainConfig(steps=1, betas=(0.9,))
    with pytest.raises(ConfigError, match="float16 is ~100x slower"):
        TrainConfig(steps=1, dtype="float16")
    with pytest.raises(ConfigError, match="data.seq_len .* exceeds model.max_seq_len"):
        TrainConfig(steps=1, data=DataConfig(seq_len=512), model=ModelConfig(max_seq_len=256))
    cfg = apply_overrides(train_preset("tiny"), {"model.routing.capacity": "0.25", "lr": "1e-3",
                                                 "data.tokenizer": "bpe", "betas": "[0.9, 0.99]"})
    assert cfg.model.routing.capacity == 0.25 and cfg.lr == 1e-3
    assert cfg.data.tokenizer == "bpe" and cfg.betas == (0.9, 0.99)
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_preset_length_is_replaced_by_a_flop_or_token_budget():
    """`--preset small-dense --set flops=X` and `--preset small --set flops=X` are isoFLOP."""
    from modlm.train import configure, total_steps
    dense = configure("small-dense", {"flops": "2.4e13"})
    mod = configure("small", {"flops": "2.4e13"})
    assert dense.steps is None and mod.steps is None
    per_seq = {c.preset: flops.training_flops(c.model, c.data.seq_len) for c in (dense, mod)}
    steps = {c.preset: total_steps(c, 1) for c in (dense, mod)}
    for c in (dense, mod):
        spent = steps[c.preset] * c.batch_size * per_seq[c.preset]
        assert 2.4e13 - c.batch_size * per_seq[c.preset] < spent <= 2.4e13
    assert steps["small"] > 1.6 * steps["small-dense"]
    assert configure("small", {"tokens": "4096"}).tokens == 4096
    assert configure("small", {}).steps == train_preset("small").steps
    assert train_preset("gpt2-small").data.tokenizer == "gpt2"
    assert train_preset("gpt2-small-dense").data.tokenizer == "gpt2"
    assert train_preset("small").data.tokenizer == "bytes"


def test_flop_budget_sets_the_steps(tmp_path, corpus):
    cfg = tiny_cfg(tmp_path, corpus, steps=None, flops=3e9)
    from modlm.train import total_steps
    expected = flops.steps_for_budget(cfg.model, 3e9, cfg.batch_size, cfg.data.seq_len)
    assert total_steps(cfg, 1) == expected
    dense = dataclasses.replace(cfg, model=dataclasses.replace(
        cfg.model, routing=dataclasses.replace(cfg.model.routing, router="none")))
    assert total_steps(dense, 1) < expected  # same budget, fewer (dearer) dense steps
    assert total_steps(tiny_cfg(tmp_path, corpus, steps=None, tokens=1000), 1) == math.ceil(
        1000 / (4 * 32))


# ---- a run -------------------------------------------------------------------------------------

def test_run_writes_its_folder_and_loss_falls(tmp_path, corpus):
    cfg = tiny_cfg(tmp_path, corpus, steps=30, eval_every=15, checkpoint_every=15, lr=1e-2)
    result = train(cfg)
    run = result.run_dir
    assert result.step == 30 and not result.interrupted
    assert TrainConfig.from_dict(json.loads((run / "config.json").read_text())) == cfg
    env = json.loads((run / "env.json").read_text())
    assert env["torch"] == torch.__version__ and env["dtype"] == "float32"
    assert (run / "tokenizer").is_dir()
    losses = step_losses(run)
    assert sorted(losses) == list(range(1, 31))
    assert sum(list(losses.values())[-5:]) / 5 < sum(list(losses.values())[:5]) / 5 - 0.3
    records = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "eval" in r]
    assert [r["step"] for r in evals] == [15, 30]
    for split in ("val", "pydoc"):
        modes = evals[-1]["eval"][split]
        assert set(modes) == {"topk", "router", "predictor"}
        for r in modes.values():
            assert r["bpb"] == pytest.approx(r["loss"] / math.log(2))  # bytes tokenizer
            assert [l["layer"] for l in r["layers"]] == [1]
    steps = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()
             if "eval" not in json.loads(l)]
    assert steps[-1]["flops"] == pytest.approx(30 * 4 * flops.training_flops(cfg.model, 32))
    assert steps[-1]["tokens"] == 30 * 4 * 32
    for key in ("router_accuracy", "predictor_accuracy"):  # one value per routed block
        assert len(steps[-1][key]) == 1 and 0.0 <= steps[-1][key][0] <= 1.0
    assert steps[-1]["lm_loss"] < steps[-1]["loss"]  # the auxiliary losses are part of the sum
    assert [c.step for c in list_checkpoints(run)] == [15, 30]


def test_same_seed_same_losses(tmp_path, corpus):
    a = train(tiny_cfg(tmp_path, corpus, steps=4, run_name="a"))
    b = train(tiny_cfg(tmp_path, corpus, steps=4, run_name="b"))
    c = train(tiny_cfg(tmp_path, corpus, steps=4, run_name="c", seed=1))
    assert step_losses(a.run_dir) == step_losses(b.run_dir)
    assert step_losses(a.run_dir) != step_losses(c.run_dir)


def test_resume_repeats_the_uninterrupted_losses(tmp_path, corpus):
    full = train(tiny_cfg(tmp_path, corpus, run_name="full"))
    part = train(tiny_cfg(tmp_path, corpus, run_name="part"))
    # Forget everything after step 4, as if the process had died there.
    shutil.rmtree(latest_checkpoint(part.run_dir))
    resumed = train(load_run_config(part.run_dir), resume=part.run_dir)
    assert resumed.step == 8
    assert step_losses(resumed.run_dir) == step_losses(full.run_dir)
    # the re-run steps replaced the old records rather than being logged twice
    assert metric_lines(resumed.run_dir) == metric_lines(full.run_dir)
    assert (resumed.run_dir / "env.json").exists()
    assert (resumed.run_dir / "env.resume-00000004.json").exists()


def test_resume_survives_a_half_written_metrics_line(tmp_path, corpus):
    run = train(tiny_cfg(tmp_path, corpus)).run_dir
    shutil.rmtree(latest_checkpoint(run))
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 9, "loss": 1.2')  # killed mid-write
    resumed = train(load_run_config(run), resume=run)
    assert sorted(step_losses(resumed.run_dir)) == list(range(1, 9))


def test_resume_of_a_run_killed_before_its_first_checkpoint_starts_it_again(tmp_path, corpus,
                                                                             capsys):
    full = train(tiny_cfg(tmp_path, corpus, run_name="full"))
    early = train(tiny_cfg(tmp_path, corpus, run_name="early")).run_dir
    shutil.rmtree(early / "checkpoints")        # as if killed before its first checkpoint
    with pytest.raises(ConfigError, match="already exists.*--resume"):   # a fresh start
        train(tiny_cfg(tmp_path, corpus, run_name="early"))
    capsys.readouterr()
    resumed = train(load_run_config(early), resume=early)
    assert "has no checkpoint yet (stopped before its first); starting it again from step 0" \
        in capsys.readouterr().out
    assert resumed.step == 8
    assert step_losses(early) == step_losses(full.run_dir)
    assert metric_lines(early) == metric_lines(full.run_dir)   # the old records replaced
    assert [c.step for c in list_checkpoints(early)] == [4, 8]


def test_resume_falls_back_past_a_damaged_newest_checkpoint_and_keeps_it(tmp_path, corpus,
                                                                         capsys):
    full = train(tiny_cfg(tmp_path, corpus, run_name="full"))
    run = train(tiny_cfg(tmp_path, corpus, run_name="part")).run_dir
    newest = latest_checkpoint(run)
    weights = newest / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0xFF                                # one flipped byte in the weights
    weights.write_bytes(bytes(data))
    damaged = snapshot(newest)
    capsys.readouterr()
    resumed = train(load_run_config(run), resume=run)
    out = capsys.readouterr().out
    kept = run / "checkpoints" / "damaged-step_00000008"
    assert "checkpoint step 8 is damaged" in out and str(kept) in out
    assert snapshot(kept) == damaged                # left as it was, for inspection
    assert resumed.step == 8
    assert (run / "env.resume-00000004.json").is_file()      # resumed from step 4, not 0
    assert "no checkpoint yet" not in out
    assert step_losses(run) == step_losses(full.run_dir)
    assert [c.step for c in list_checkpoints(run)] == [4, 8]
    load_checkpoint(latest_checkpoint(run))         # the new step 8 verifies
    # every checkpoint damaged: a clear error, and the next resume starts from step 0
    for info in list_checkpoints(run):
        (info.path / "state.pt").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="no checkpoint of .* verifies.*starts the run from "
                                        "step 0"):
        train(load_run_config(run), resume=run)
    assert list_checkpoints(run) == []
    assert train(load_run_config(run), resume=run).step == 8
    assert step_losses(run) == step_losses(full.run_dir)


_HOLD_LOCK = """
import sys, time
from modlm.atomic import FolderLock
FolderLock(sys.argv[1]).acquire()
print("locked", flush=True)
time.sleep(600)
"""


def test_one_writer_per_run_folder_and_a_killed_writers_lock_is_taken_over(tmp_path, corpus,
                                                                           capsys):
    run = train(tiny_cfg(tmp_path, corpus, steps=4)).run_dir
    assert not (run / ".lock").exists()             # released when the run ended
    holder = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(run)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = snapshot(run)
        cfg = dataclasses.replace(load_run_config(run), steps=8)
        with pytest.raises(ConfigError, match=f"being written by another process \\(pid "
                                              f"{holder.pid} .*wait for it to finish or stop it"):
            train(cfg, resume=run)
        assert snapshot(run) == before              # nothing read-modify-written
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (run / ".lock").exists()                 # the killed holder's record stays
    capsys.readouterr()
    assert train(cfg, resume=run).step == 8
    assert f"took over the lock of {run} from a writer that ended without releasing it (pid " \
           f"{holder.pid}" in capsys.readouterr().out
    assert not (run / ".lock").exists()


def test_resume_refuses_a_checkpoint_folder(tmp_path, corpus):
    run = train(tiny_cfg(tmp_path, corpus, steps=4)).run_dir
    before = sorted(p.name for p in latest_checkpoint(run).iterdir())
    with pytest.raises(ConfigError, match="its run folder is .*run"):
        train(load_run_config(run), resume=latest_checkpoint(run))
    assert sorted(p.name for p in latest_checkpoint(run).iterdir()) == before


def test_existing_run_folder_is_not_overwritten(tmp_path, corpus):
    train(tiny_cfg(tmp_path, corpus, steps=2))
    with pytest.raises(ConfigError, match="already exists.*--resume"):
        train(tiny_cfg(tmp_path, corpus, steps=2))


def test_nonfinite_loss_stops_and_keeps_the_last_checkpoint(tmp_path, corpus, monkeypatch):
    import modlm.train as train_mod

    class Exploding(MoDLM):
        calls = 0

        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            if self.training:
                Exploding.calls += 1
                if Exploding.calls >= 6 and out.loss is not None:
                    return dataclasses.replace(out, loss=out.loss * float("nan"))
            return out

    monkeypatch.setattr(train_mod, "MoDLM", Exploding)
    cfg = tiny_cfg(tmp_path, corpus, checkpoint_every=4)
    with pytest.raises(TrainingError, match="non-finite loss .* step 6.*step_00000004"):
        train(cfg)
    run = Path(cfg.out_dir) / "run"
    assert [c.step for c in list_checkpoints(run)] == [4]

    Exploding.calls = 0
    skipping = train(tiny_cfg(tmp_path, corpus, run_name="skip", on_nonfinite="skip"))
    records = [json.loads(l) for l in (skipping.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r.get("skipped")] == [6, 7, 8]
    assert skipping.step == 8
    # skipped steps still reach the end-of-step work: the final evaluation and checkpoint
    assert [r["step"] for r in records if "eval" in r] == [4, 8]
    assert [c.step for c in list_checkpoints(skipping.run_dir)] == [4, 8]


@pytest.mark.slow
def test_sigkill_then_resume_matches_uninterrupted(tmp_path, corpus):
    """Kill -9 the training process between checkpoints; --resume repeats the same losses."""
    def argv(name):
        return [sys.executable, "-m", "modlm", "train", "--preset", "tiny",
                "--set", f"data.corpus={corpus}", "--set", f"data.cache_dir={tmp_path / 'cache'}",
                "--set", "steps=40", "--set", "checkpoint_every=5", "--set", "eval_every=40",
                "--set", "log_every=1", "--set", "device=cpu",
                "--set", f"out_dir={tmp_path / 'runs'}", "--set", f"run_name={name}"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run(argv("full"), check=True, env=env, capture_output=True, timeout=600)
    proc = subprocess.Popen(argv("killed"), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    run = tmp_path / "runs" / "killed"
    deadline = time.time() + 300
    while time.time() < deadline:
        done = [c.step for c in list_checkpoints(run)] if run.exists() else []
        if any(s >= 10 for s in done):
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = max(c.step for c in list_checkpoints(run))
    assert killed_at < 40
    subprocess.run([sys.executable, "-m", "modlm", "train", "--resume", str(run)], check=True,
                   env=env, capture_output=True, timeout=600)
    assert step_losses(run) == step_losses(tmp_path / "runs" / "full")
    assert metric_lines(run) == metric_lines(tmp_path / "runs" / "full")


@pytest.mark.slow
def test_sigint_saves_a_checkpoint_and_exits_cleanly(tmp_path, corpus):
    proc = subprocess.Popen(
        [sys.executable, "-m", "modlm", "train", "--preset", "tiny",
         "--set", f"data.corpus={corpus}", "--set", f"data.cache_dir={tmp_path / 'cache'}",
         "--set", "steps=100000", "--set", "checkpoint_every=100000", "--set", "log_every=1",
         "--set", "device=cpu", "--set", f"out_dir={tmp_path / 'runs'}",
         "--set", "run_name=int"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "runs" / "int" / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (metrics.exists() and metrics.stat().st_size > 0):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert "interrupted; continue with --resume" in out
    ckpts = list_checkpoints(tmp_path / "runs" / "int")
    assert len(ckpts) == 1 and 0 < ckpts[0].step < 100000


def test_bpe_tokenizer_sets_the_model_vocabulary_and_eval_cli_reads_the_run(tmp_path, corpus,
                                                                           capsys):
    from modlm.cli import main
    from modlm.tokenizer import load_tokenizer
    cfg = tiny_cfg(tmp_path, corpus, steps=2, eval_every=2, checkpoint_every=2,
                   data=DataConfig(corpus=str(corpus), seq_len=32, tokenizer="bpe",
                                   bpe_vocab_size=300, cache_dir=str(tmp_path / "cache"),
                                   val_fraction=0.2))
    run = train(cfg).run_dir
    saved = load_run_config(run)
    assert saved.model.vocab_size == load_tokenizer(run / "tokenizer").vocab_size
    assert saved.model.vocab_size != cfg.model.vocab_size
    capsys.readouterr()
    # A checkpoint's recorded corpus is never read by itself: the user names it.
    assert main(["eval", str(run), "--mode", "router", "--batches", "1", "--device", "cpu"]) == 2
    assert "--corpus" in capsys.readouterr().err
    assert main(["eval", str(run), "--corpus", str(corpus), "--mode", "router", "--batches", "1",
                 "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    rows = [l.split() for l in out.splitlines() if l.startswith(("val ", "pydoc "))]
    assert [(r[0], r[1]) for r in rows] == [("val", "router"), ("pydoc", "router")]
    other = tmp_path / "other.txt"
    other.write_text("a different text entirely, " * 50)
    assert main(["eval", str(run), "--data", str(other), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert sum(str(other) in l for l in out.splitlines()) == 3  # topk, router, predictor
    assert main(["eval", str(tmp_path / "nope"), "--device", "cpu"]) == 2
    assert "modlm: error:" in capsys.readouterr().err


def test_grad_accumulation_equals_the_larger_batch(tmp_path, corpus):
    """Two micro-steps of b sequences make the same update as one batch of those 2b sequences."""
    cfg = tiny_cfg(tmp_path, corpus, steps=1, batch_size=2, grad_accum=2, eval_every=1,
                   checkpoint_every=1)
    run = train(cfg).run_dir
    assert load_checkpoint(latest_checkpoint(run)).state["trainer"]["sampler"]["step"] == 2

    # The same step by hand: both micro-batches as one batch, one backward, one AdamW step.
    sampler = TrainSampler(prepare_data(cfg.data).train, batch_size=2, seq_len=32,
                           seed=cfg.data.seed)
    windows = torch.cat([sampler.next_batch(), sampler.next_batch()])
    torch.manual_seed(cfg.seed)
    model = MoDLM(cfg.model)
    opt = build_optimizer(model, lr=lr_at(0, 1, cfg.lr, cfg.warmup_steps, cfg.min_lr_ratio),
                          weight_decay=cfg.weight_decay, betas=cfg.betas, eps=cfg.eps)
    out = model(windows[:, :-1], windows[:, 1:])
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    opt.step()
    saved = load_file(latest_checkpoint(run) / "model.safetensors")
    for name, p in model.state_dict().items():
        if name in saved:
            torch.testing.assert_close(saved[name], p, rtol=1e-5, atol=1e-6)
    assert step_losses(run)[1] == pytest.approx(out.loss.item(), rel=1e-5)


def test_bfloat16_autocast_trains(tmp_path, corpus):
    result = train(tiny_cfg(tmp_path, corpus, steps=3, dtype="bfloat16"))
    losses = step_losses(result.run_dir)
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses.values())
    assert json.loads((result.run_dir / "env.json").read_text())["dtype"] == "bfloat16"


def test_progress_line_on_a_terminal_only(monkeypatch, capsys):
    from modlm.train import _Progress
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    bar = _Progress(total=10, enabled=True)
    bar.update(step=3, start_step=0, loss=1.2345, tok_s=1234.0)
    err = capsys.readouterr().err
    assert err.startswith("\rstep 3/10") and "loss 1.2345" in err and "1,234 tok/s" in err
    assert "ETA" in err
    monkeypatch.setenv("CI", "true")
    quiet = _Progress(total=10, enabled=True)
    quiet.update(step=3, start_step=0, loss=1.0, tok_s=1.0)
    assert capsys.readouterr().err == ""


def test_tensorboard_events_are_written(tmp_path, corpus):
    pytest.importorskip("tensorboard", reason="tensorboard is in the test extra; "
                        "pip install 'modlm[test]' to run this")
    result = train(tiny_cfg(tmp_path, corpus, steps=2, tensorboard=True))
    events = list((result.run_dir / "tb").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0


@pytest.mark.slow
def test_torch_compile_trains_like_eager(tmp_path, corpus):
    eager = train(tiny_cfg(tmp_path, corpus, steps=3, run_name="eager"))
    compiled = train(tiny_cfg(tmp_path, corpus, steps=3, run_name="compiled", compile=True))
    a, b = step_losses(eager.run_dir), step_losses(compiled.run_dir)
    assert a.keys() == b.keys()
    for s in a:
        assert b[s] == pytest.approx(a[s], rel=1e-4)


@pytest.mark.parametrize("router, predictor", [("learned", True), ("learned", False),
                                               ("random", False), ("none", False),
                                               ("threshold", False)])
def test_step_records_average_every_micro_batch_and_leave_absent_losses_absent(
        tmp_path, corpus, monkeypatch, router, predictor):
    """Each step record's losses and per-block accuracies are the mean over the step's
    micro-batches (not the last one's), and a loss the model does not have is null, not 0.0."""
    import modlm.train as train_module
    seen: list[dict[str, float]] = []
    real = train_module._step_values

    def spy(out, varying=False):
        values = real(out, varying)
        seen.append({k: float(v) for k, v in values.items()})
        return values

    monkeypatch.setattr(train_module, "_step_values", spy)
    model = ModelConfig(vocab_size=256, d_model=32, n_layers=3, n_heads=2, d_mlp=37,
                        max_seq_len=32, routing={"router": router, "predictor": predictor,
                                                 "capacity": 0.25,
                                                 "aux_loss_weight": {"learned": 0.01,
                                                                     "threshold": 1.0}.get(
                                                     router, 0.0)})
    run = train(tiny_cfg(tmp_path, corpus, model=model, steps=2, grad_accum=3, eval_every=100,
                         checkpoint_every=100)).run_dir
    steps = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
             if "eval" not in r]
    assert [r["step"] for r in steps] == [1, 2] and len(seen) >= 6
    first = seen[:3]                       # the three micro-batches of step 1
    mean = {k: sum(m[k] for m in first) / 3 for k in first[0]}
    record = steps[0]
    assert record["loss"] == pytest.approx(mean["loss"])
    assert record["lm_loss"] == pytest.approx(mean["lm_loss"])
    assert (record["router_aux_loss"] is None) == (router not in ("learned", "threshold"))
    assert (record["predictor_loss"] is None) == (not predictor)
    # A threshold router's routed share varies in training: logged per block, as a mean.
    assert ("routed_fraction" in record) == (router == "threshold")
    if router == "threshold":
        shares = [mean[k] for k in sorted(mean) if k.startswith("routed_fraction.")]
        assert record["routed_fraction"] == pytest.approx(shares) and len(shares) == 1
    if router in ("learned", "threshold"):
        assert record["router_aux_loss"] == pytest.approx(mean["router_aux_loss"])
        accuracies = [mean[k] for k in sorted(mean) if k.startswith("router_accuracy.")]
        assert record["router_accuracy"] == pytest.approx(accuracies)
        # a mean over micro-batches, which differs from the last micro-batch's value
        assert any(abs(first[2][k] - mean[k]) > 1e-9
                   for k in mean if k.startswith(("router_accuracy", "lm_loss")))
    else:
        assert record["router_accuracy"] is None
    if predictor:
        assert record["predictor_loss"] == pytest.approx(mean["predictor_loss"])


def test_collectives_put_host_tensors_on_the_gpu_under_nccl_only():
    """NCCL reduces CUDA tensors only: a host-side stop flag or evaluation sum goes to this
    process's GPU for the collective (the training stop flag and the evaluation sums are host
    tensors); gloo reduces it where it is; one process reduces nothing."""
    from modlm import runtime
    d = runtime.Dist(rank=1, world_size=2, local_rank=1)
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 1)
    assert runtime.collective_device("nccl", cpu, d) == gpu
    assert runtime.collective_device("nccl", gpu, d) == gpu
    assert runtime.collective_device("gloo", cpu, d) == cpu
    t = torch.ones(3)
    assert runtime.all_reduce(t, runtime.Dist()) is t
