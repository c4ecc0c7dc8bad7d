"""Checkpoints: exact round trips, tied weights, pruning, atomic saves, verified and safe loads."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import safetensors.torch
import torch

from modlm.checkpoint import (
    CheckpointError,
    best_checkpoint,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    load_model,
    model_config_hash,
    resolve_checkpoint,
    save_checkpoint,
)
from modlm.config import ModelConfig
from modlm.model import MoDLM
from modlm.tokenizer import ByteTokenizer

CFG = ModelConfig(vocab_size=256, d_model=32, n_layers=3, n_heads=2, d_mlp=37, max_seq_len=16)


def _save(run_dir: Path, step: int, model: MoDLM | None = None, *, cfg: ModelConfig = CFG,
          val_loss: float | None = None, keep_last: int | None = 3, optimizer_state=None,
          trainer_state=None, run_config=None) -> Path:
    return save_checkpoint(
        run_dir, step=step, model=model if model is not None else MoDLM(cfg),
        optimizer_state=optimizer_state,
        trainer_state=trainer_state if trainer_state is not None else {"step": step},
        model_cfg=cfg, tokenizer=ByteTokenizer(), run_config=run_config, val_loss=val_loss,
        keep_last=keep_last)


def _steps(run_dir: Path) -> list[int]:
    return [i.step for i in list_checkpoints(run_dir)]


def _tree(root: Path) -> dict[str, str]:
    """Every file and folder under `root` with the sha256 of its bytes."""
    return {p.relative_to(root).as_posix():
            hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "<dir>"
            for p in sorted(root.rglob("*"))}


def _fix_meta(ckpt: Path, rel: str) -> None:
    """Record the current size and sha256 of `rel` in meta.json (a consistent, crafted file)."""
    meta = json.loads((ckpt / "meta.json").read_text())
    data = (ckpt / rel).read_bytes()
    meta["files"][rel] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (ckpt / "meta.json").write_text(json.dumps(meta))


def test_round_trip_gives_identical_weights_and_logits(tmp_path):
    model = MoDLM(CFG)
    run_config = {"train": {"lr": 3e-4, "batch_size": 5}, "data": {"corpus": "builtin"}}
    path = _save(tmp_path, 120, model, val_loss=2.5, run_config=run_config)
    assert path == tmp_path / "checkpoints" / "step_00000120"

    loaded_model, loaded = load_model(tmp_path)
    assert loaded.step == 120 and loaded.val_loss == 2.5
    assert loaded.model_cfg == CFG and loaded.run_config == run_config
    assert loaded.tokenizer.identity == ByteTokenizer().identity
    assert not loaded_model.training
    original = model.state_dict()
    restored = loaded_model.state_dict()
    assert original.keys() == restored.keys()
    for name, tensor in original.items():
        assert torch.equal(tensor, restored[name]), name
    idx = torch.randint(0, CFG.vocab_size, (3, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for mode in ("topk", "router", "predictor"):
            assert torch.equal(model.eval()(idx, mode=mode).logits_BTV,
                               loaded_model(idx, mode=mode).logits_BTV), mode

    meta = loaded.meta
    assert meta["model_config_hash"] == model_config_hash(CFG)
    assert meta["tokenizer_identity"] == "bytes:utf-8"
    for rel in ("model.safetensors", "state.pt"):
        data = (path / rel).read_bytes()
        assert meta["files"][rel] == {"size": len(data),
                                      "sha256": hashlib.sha256(data).hexdigest()}
    config = json.loads((path / "config.json").read_text())
    assert config == {"model": CFG.to_dict(), **run_config}


def test_model_config_hash_changes_with_any_field():
    same = ModelConfig(**{**CFG.to_dict(), "routing": CFG.routing})
    assert model_config_hash(same) == model_config_hash(CFG)
    assert len(model_config_hash(CFG)) == 64
    for changed in (dict(d_mlp=39), dict(tie_embeddings=False), dict(rope_theta=500.0)):
        assert model_config_hash(ModelConfig(**{**CFG.to_dict(), **changed})) \
            != model_config_hash(CFG), changed


def test_optimizer_and_rng_state_round_trip(tmp_path):
    torch.manual_seed(3)
    model = MoDLM(CFG)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    idx = torch.randint(0, CFG.vocab_size, (2, 16))

    def train_step(m, o):
        o.zero_grad()
        m(idx[:, :-1], idx[:, 1:]).loss.backward()
        o.step()

    train_step(model, opt)
    gen = torch.Generator().manual_seed(11)
    trainer = {"step": 1, "tokens": 30, "flops": 1.5e9, "scheduler": {"last_epoch": 1},
               "lr": 1e-2, "rng": torch.get_rng_state(), "generator": gen.get_state(),
               "sampler": {"seed": 7, "step": 1}}
    _save(tmp_path, 1, model, optimizer_state=opt.state_dict(), trainer_state=trainer)
    expected_rand = torch.rand(4)
    expected_gen = torch.rand(4, generator=gen)

    loaded = load_checkpoint(tmp_path)
    t = loaded.trainer_state
    assert {k: t[k] for k in ("step", "tokens", "flops", "scheduler", "lr", "sampler")} == \
        {k: trainer[k] for k in ("step", "tokens", "flops", "scheduler", "lr", "sampler")}
    torch.set_rng_state(t["rng"])
    assert torch.equal(torch.rand(4), expected_rand)
    gen2 = torch.Generator()
    gen2.set_state(t["generator"])
    assert torch.equal(torch.rand(4, generator=gen2), expected_gen)

    resumed = MoDLM(loaded.model_cfg)
    resumed.load_state_dict(loaded.model_state)
    opt2 = torch.optim.AdamW(resumed.parameters(), lr=1e-2, weight_decay=0.1)
    opt2.load_state_dict(loaded.optimizer_state)
    assert opt2.state_dict()["state"][0]["step"] == 1
    train_step(model, opt)
    train_step(resumed, opt2)
    for (name, a), b in zip(model.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name
    # A fresh optimizer (no moments) would land elsewhere: the restored state mattered.
    fresh = MoDLM(loaded.model_cfg)
    fresh.load_state_dict(loaded.model_state)
    train_step(fresh, torch.optim.AdamW(fresh.parameters(), lr=1e-2, weight_decay=0.1))
    assert not torch.equal(fresh.embed.weight, model.embed.weight)


@pytest.mark.parametrize("tie", [True, False])
def test_tied_embeddings_stored_once_and_restored_tied(tmp_path, tie):
    cfg = ModelConfig(**{**CFG.to_dict(), "tie_embeddings": tie})
    model = MoDLM(cfg)
    path = _save(tmp_path, 5, model, cfg=cfg)
    stored = safetensors.torch.load_file(path / "model.safetensors")
    assert ("lm_head.weight" in stored) is (not tie)
    assert "embed.weight" in stored

    loaded_model, loaded = load_model(path)
    state = loaded.model_state
    same_storage = state["lm_head.weight"].data_ptr() == state["embed.weight"].data_ptr()
    assert same_storage is tie
    assert (loaded_model.lm_head.weight is loaded_model.embed.weight) is tie
    assert torch.equal(loaded_model.lm_head.weight, model.lm_head.weight)
    assert torch.equal(loaded_model.embed.weight, model.embed.weight)
    if not tie:
        assert not torch.equal(model.lm_head.weight, model.embed.weight)


def test_keep_last_keeps_newest_plus_best(tmp_path):
    losses = {100: 0.9, 200: 0.5, 300: 0.7, 400: 0.8, 500: None, 600: 0.95}
    model = MoDLM(CFG)
    for step, loss in losses.items():
        _save(tmp_path, step, model, val_loss=loss, keep_last=2)
    assert _steps(tmp_path) == [200, 500, 600]
    best = json.loads((tmp_path / "checkpoints" / "best.json").read_text())
    assert (best["step"], best["path"], best["val_loss"]) == (200, "step_00000200", 0.5)
    assert best_checkpoint(tmp_path) == tmp_path / "checkpoints" / "step_00000200"
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoints" / "step_00000600"
    assert load_checkpoint(best_checkpoint(tmp_path)).val_loss == 0.5

    _save(tmp_path, 700, model, val_loss=0.4, keep_last=2)   # a new best frees the old one
    assert _steps(tmp_path) == [600, 700]
    assert json.loads((tmp_path / "checkpoints" / "best.json").read_text())["step"] == 700
    assert not any(p.name.startswith(".") for p in (tmp_path / "checkpoints").iterdir())


def test_keep_last_none_keeps_everything_and_no_loss_means_no_best(tmp_path):
    for step in (3, 1, 2):
        _save(tmp_path, step, keep_last=None)
    infos = list_checkpoints(tmp_path)
    assert [i.step for i in infos] == [1, 2, 3]
    assert all(i.val_loss is None for i in infos)
    assert best_checkpoint(tmp_path) is None
    assert not (tmp_path / "checkpoints" / "best.json").exists()
    with pytest.raises(CheckpointError, match="val_loss"):
        resolve_checkpoint(tmp_path, which="best")


def test_resaving_an_existing_step_replaces_it(tmp_path):
    first, second = MoDLM(CFG), MoDLM(CFG)
    assert not torch.equal(first.embed.weight, second.embed.weight)
    _save(tmp_path, 100, first, val_loss=1.0)
    _save(tmp_path, 200, first)
    _save(tmp_path, 100, second, val_loss=0.8)   # e.g. after resuming from an earlier step
    assert _steps(tmp_path) == [100, 200]
    loaded = load_checkpoint(tmp_path / "checkpoints" / "step_00000100")
    assert torch.equal(loaded.model_state["embed.weight"], second.embed.weight)
    assert loaded.val_loss == 0.8
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == \
        ["best.json", "step_00000100", "step_00000200"]


@pytest.mark.parametrize("failing", ["torch.save", "os.rename"])
def test_failed_save_leaves_earlier_checkpoints_intact(tmp_path, monkeypatch, failing):
    model = MoDLM(CFG)
    _save(tmp_path, 100, model, val_loss=1.0)
    _save(tmp_path, 200, model, val_loss=1.1)
    before = _tree(tmp_path)
    calls = []

    def boom(*args, **kwargs):
        calls.append(args)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch if failing == "torch.save" else os,
                        failing.split(".")[1], boom)
    with pytest.raises(CheckpointError, match="untouched"):
        _save(tmp_path, 300, model, val_loss=0.1)
    monkeypatch.undo()
    assert calls, f"{failing} was never reached"
    assert _tree(tmp_path) == before      # the partial temp folder was removed too
    assert _steps(tmp_path) == [100, 200]
    assert latest_checkpoint(tmp_path).name == "step_00000200"
    load_checkpoint(tmp_path)


def test_failed_resave_puts_the_old_checkpoint_back(tmp_path, monkeypatch):
    old, new = MoDLM(CFG), MoDLM(CFG)
    _save(tmp_path, 100, old)
    before = _tree(tmp_path)
    real_rename = os.rename
    moved = []

    def fail_on_commit(src, dst):
        if ".tmp-" in Path(src).name:
            raise OSError(5, "Input/output error")
        moved.append(Path(dst).name)
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", fail_on_commit)
    with pytest.raises(CheckpointError):
        _save(tmp_path, 100, new)
    monkeypatch.undo()
    assert moved[0].startswith(".step_00000100.old-")   # it really was moved aside
    assert _tree(tmp_path) == before
    assert torch.equal(load_checkpoint(tmp_path).model_state["embed.weight"], old.embed.weight)


def test_crash_mid_save_leaves_a_temp_folder_that_loaders_ignore(tmp_path):
    _save(tmp_path, 100, val_loss=1.0)
    # A real crash: the process dies at the commit rename, after every file was written.
    script = textwrap.dedent(f"""
        import os
        from modlm.checkpoint import save_checkpoint
        from modlm.config import ModelConfig
        from modlm.model import MoDLM
        from modlm.tokenizer import ByteTokenizer
        cfg = ModelConfig(**{CFG.to_dict()!r})
        os.rename = lambda src, dst: os._exit(17)
        save_checkpoint({str(tmp_path)!r}, step=200, model=MoDLM(cfg), optimizer_state=None,
                        trainer_state={{}}, model_cfg=cfg, tokenizer=ByteTokenizer(),
                        val_loss=0.1)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == 17, proc.stderr
    root = tmp_path / "checkpoints"
    leftovers = [p for p in root.iterdir() if ".tmp-" in p.name]
    assert len(leftovers) == 1 and (leftovers[0] / "meta.json").is_file()
    (root / "step_00000300").mkdir()   # a folder without meta.json is incomplete too
    (root / "step_00000300" / "model.safetensors").write_bytes(b"partial")

    assert _steps(tmp_path) == [100]
    assert latest_checkpoint(tmp_path) == root / "step_00000100"
    assert best_checkpoint(tmp_path) == root / "step_00000100"
    assert resolve_checkpoint(root) == root / "step_00000100"
    assert load_checkpoint(tmp_path).step == 100

    _save(tmp_path, 400)   # the next save removes the dead process's temp folder
    assert not leftovers[0].exists()
    assert _steps(tmp_path) == [100, 400]


def test_truncated_model_file_is_named_and_nothing_changes(tmp_path):
    _save(tmp_path, 100)
    path = _save(tmp_path, 200)
    model_file = path / "model.safetensors"
    model_file.write_bytes(model_file.read_bytes()[:-100])
    before = _tree(tmp_path)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(tmp_path)
    message = str(err.value)
    # Whole phrases: tmp_path itself contains the test's name.
    assert "model.safetensors is truncated" in message
    assert "earlier checkpoint" in message and "step_00000100" in message
    with pytest.raises(CheckpointError, match="model.safetensors is truncated"):
        load_model(path)
    assert _tree(tmp_path) == before


def test_corrupted_state_file_is_named_and_nothing_changes(tmp_path):
    _save(tmp_path, 100)
    path = _save(tmp_path, 200, optimizer_state={"state": {}, "param_groups": []})
    state_file = path / "state.pt"
    data = bytearray(state_file.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 8] = bytes(b ^ 0xFF for b in data[middle:middle + 8])
    state_file.write_bytes(bytes(data))
    before = _tree(tmp_path)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(tmp_path)
    assert "state.pt is corrupt" in str(err.value) and "step_00000100" in str(err.value)
    assert _tree(tmp_path) == before
    # Inference does not need state.pt, so it neither reads nor verifies it.
    assert load_checkpoint(tmp_path, load_state=False).state is None


def test_unreadable_safetensors_with_matching_hash_is_wrapped(tmp_path):
    path = _save(tmp_path, 100)
    (path / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00not json")
    _fix_meta(path, "model.safetensors")
    before = _tree(tmp_path)
    with pytest.raises(CheckpointError, match="cannot be read by safetensors"):
        load_checkpoint(path)
    assert _tree(tmp_path) == before


def test_architecture_mismatch_names_the_fields(tmp_path):
    _save(tmp_path, 100)
    other = ModelConfig(**{**CFG.to_dict(), "d_model": 48, "n_heads": 3,
                           "routing": {**CFG.routing.__dict__, "capacity": 0.25}})
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(tmp_path, expected_model_cfg=other)
    message = str(err.value)
    assert "d_model: checkpoint 32, expected 48" in message
    assert "n_heads: checkpoint 2, expected 3" in message
    assert "routing.capacity: checkpoint 0.125, expected 0.25" in message
    assert "vocab_size" not in message
    assert load_checkpoint(tmp_path, expected_model_cfg=CFG).model_cfg == CFG


def test_tokenizer_mismatch_names_both_identities(tmp_path):
    _save(tmp_path, 100)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(tmp_path, expected_tokenizer_identity="bpe:0123abcd")
    assert "'bytes:utf-8'" in str(err.value) and "'bpe:0123abcd'" in str(err.value)
    loaded = load_checkpoint(tmp_path, expected_tokenizer_identity=ByteTokenizer().identity)
    assert loaded.tokenizer.encode("hé") == [104, 195, 169]


def test_resolve_checkpoint_accepts_run_checkpoints_and_checkpoint_folders(tmp_path):
    run = tmp_path / "run"
    _save(run, 100, val_loss=0.5)
    _save(run, 200, val_loss=0.9)
    root = run / "checkpoints"
    assert resolve_checkpoint(run) == root / "step_00000200"
    assert resolve_checkpoint(run, which="best") == root / "step_00000100"
    assert resolve_checkpoint(root) == root / "step_00000200"
    assert resolve_checkpoint(root / "step_00000100") == root / "step_00000100"
    assert load_checkpoint(str(run)).step == 200

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError) as err:
        resolve_checkpoint(empty)
    assert str(empty) in str(err.value) and "expected a run folder" in str(err.value)
    missing = tmp_path / "nowhere"
    with pytest.raises(ValueError, match="does not exist") as err:
        load_checkpoint(missing)
    assert isinstance(err.value, CheckpointError) and str(missing) in str(err.value)
    with pytest.raises(CheckpointError, match="is a file"):
        resolve_checkpoint(root / "best.json")


class _Opaque:
    """A plain custom object: weights_only cannot rebuild it."""

    def __init__(self) -> None:
        self.value = 3


class _Payload:
    """Would create a folder when unpickled by a loader that runs code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


@pytest.mark.parametrize("kind", ["opaque", "payload"])
def test_state_with_pickled_objects_is_refused_without_running_them(tmp_path, kind):
    path = _save(tmp_path, 100)
    marker = tmp_path / "pwned"
    obj = _Opaque() if kind == "opaque" else _Payload(marker)
    torch.save({"format_version": 1, "optimizer": None, "trainer": {"step": 100, "x": obj}},
               path / "state.pt")
    _fix_meta(path, "state.pt")   # a crafted file whose meta.json is consistent
    before = _tree(tmp_path)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(tmp_path)
    assert "state.pt" in str(err.value) and "weights_only" in str(err.value)
    assert ("_Opaque" if kind == "opaque" else "mkdir") in str(err.value)
    assert not marker.exists()
    assert _tree(tmp_path) == before
    # The payload is live: an unsafe loader would have run it.
    torch.load(path / "state.pt", weights_only=False)
    assert marker.exists() is (kind == "payload")


def test_save_refuses_state_that_would_not_load_safely(tmp_path):
    np = pytest.importorskip("numpy")
    _save(tmp_path, 100)
    before = _tree(tmp_path)
    for bad, where in (({"step": 200, "rng": {"numpy": np.zeros(3)}}, "['rng']['numpy']"),
                       ({"step": 200, "loss": np.float64(1.0)}, "['loss']"),
                       ({"step": 200, "obj": _Opaque()}, "['obj']")):
        with pytest.raises(CheckpointError, match="weights_only") as err:
            _save(tmp_path, 200, trainer_state=bad)
        assert f"trainer_state{where}" in str(err.value)
    with pytest.raises(CheckpointError, match="trainer_state\\['step'\\] is 7"):
        _save(tmp_path, 200, trainer_state={"step": 7})
    with pytest.raises(CheckpointError, match="model.cfg differs"):
        _save(tmp_path, 200, MoDLM(ModelConfig(**{**CFG.to_dict(), "d_mlp": 39})))
    assert _tree(tmp_path) == before
