"""Environment faults and bad arguments end in one clear line naming the problem and the fix,
never a traceback or a hang: the real CLI in a subprocess, and the library functions behind it."""

from __future__ import annotations

import ctypes
import errno
import os
import resource
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from support import _TORCHRUN_VARS, modlm, one_line_error, snapshot

from modlm.config import ConfigError
from modlm.generate import GenerationError, sample_next
from modlm.runtime import distributed_env

TORCHRUN_OK = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}


def modlm_at_once(*calls: list[str | bytes], preexec_fn: Callable[[], None] | None = None
                  ) -> list[subprocess.CompletedProcess]:
    """`modlm` with each argument list, the processes run side by side (each mostly imports)."""
    env = {k: v for k, v in os.environ.items() if k not in _TORCHRUN_VARS}
    procs = [(args, subprocess.Popen([sys.executable, "-m", "modlm", *args],
                                     env={**env, "OMP_NUM_THREADS": "1"}, text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     preexec_fn=preexec_fn)) for args in calls]
    done = []
    for args, proc in procs:
        out, err = proc.communicate(timeout=120)
        done.append(subprocess.CompletedProcess(args, proc.returncode, out, err))
    return done


@pytest.mark.parametrize("env, message", [
    ({"WORLD_SIZE": "2"}, "WORLD_SIZE=2 is set but RANK is not"),
    ({"WORLD_SIZE": "2", "RANK": "2", **TORCHRUN_OK}, "RANK=2 is outside 0..1"),
    ({"WORLD_SIZE": "two", "RANK": "0"}, "WORLD_SIZE='two' is not a whole number"),
    ({"WORLD_SIZE": "2", "RANK": "x"}, "RANK='x' is not a whole number"),
    ({"WORLD_SIZE": "0"}, "WORLD_SIZE=0 must be at least 1"),
    ({"RANK": "1"}, "RANK=1 is set but WORLD_SIZE is not"),
    ({"WORLD_SIZE": "2", "RANK": "0"}, "MASTER_ADDR and MASTER_PORT are not set"),
    ({"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "h"}, "MASTER_PORT is not set"),
    ({"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "h", "MASTER_PORT": "99999"},
     "MASTER_PORT='99999' is not a port"),
    ({"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "-1", **TORCHRUN_OK},
     "LOCAL_RANK=-1 must not be negative"),
])
def test_inconsistent_torchrun_variables_are_named(env, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")) as e:
        distributed_env(env)
    assert "torchrun --nproc_per_node=N" in str(e.value)


def test_consistent_torchrun_variables_and_one_process():
    assert distributed_env({}) is None
    assert distributed_env({"WORLD_SIZE": "1"}) is None
    assert distributed_env({"WORLD_SIZE": "1", "RANK": "0"}) is None
    assert distributed_env({"WORLD_SIZE": "2", "RANK": "1", **TORCHRUN_OK}) == (1, 2, 1)
    assert distributed_env({"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1",
                            **TORCHRUN_OK}) == (3, 4, 1)


def test_the_cli_refuses_bad_torchrun_variables_at_once(tmp_path):
    proc = modlm("train", "--preset", "tiny", "--set", f"out_dir={tmp_path}",
                 env={"WORLD_SIZE": "2"})
    one_line_error(proc, "WORLD_SIZE=2 is set but RANK is not", "torchrun")
    assert not any(tmp_path.iterdir())        # nothing was written


def _free_port() -> str:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


@pytest.mark.parametrize("rank", ["0", "1"])
def test_a_rank_started_without_its_peers_gives_up_within_the_set_up_timeout(tmp_path, rank):
    """Rank 0 alone waits for clients that never join; rank 1 alone for a server that is not
    there: torch's default would wait 30 minutes. With a 2 s set-up timeout, one line."""
    env = {"WORLD_SIZE": "2", "RANK": rank, "LOCAL_RANK": rank, "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": _free_port(), "MODLM_DIST_SETUP_TIMEOUT": "2"}
    proc = modlm("train", "--preset", "tiny", "--set", f"out_dir={tmp_path}", env=env)
    # alone: no C++ retry logs with stack frames around the line
    one_line_error(proc, f"as rank {rank} of 2 within 2 s", "MODLM_DIST_SETUP_TIMEOUT",
                   alone=True)
    bad = modlm("train", "--preset", "tiny", "--set", f"out_dir={tmp_path}",
                env={**env, "MODLM_DIST_SETUP_TIMEOUT": "soon"})
    one_line_error(bad, "MODLM_DIST_SETUP_TIMEOUT='soon'")


@pytest.mark.parametrize("args, message", [
    (["--budget", "0"], "must be a positive finite number"),
    (["--budget=-1e12"], "must be a positive finite number"),
    (["--budget", "nan"], "must be a positive finite number"),
    (["--budget", "lots"], "must be a positive number"),
    (["--seq-len", "0"], "must be a positive integer"),
    (["--batch=-4", "--budget", "1e12"], "must be a positive integer"),
])
def test_flops_refuses_nonpositive_and_nan_arguments(args, message):
    one_line_error(modlm("flops", *args), message)


def test_a_model_too_large_for_this_machine_is_refused_before_allocating(tmp_path):
    proc = modlm("train", "--preset", "tiny", "--set", "model.d_model=1000000000",
                 "--set", "model.n_heads=1", "--set", f"out_dir={tmp_path}",
                 "--set", "run_name=huge")
    one_line_error(proc, "parameters", "more than this machine's", "lower model.d_model")


def test_sampling_refuses_a_negative_or_nan_temperature():
    logits = torch.zeros(2, 5)
    for bad in (-0.5, float("nan"), float("inf")):
        with pytest.raises(GenerationError, match="temperature must be >= 0"):
            sample_next(logits, temperature=bad)
    assert sample_next(logits, temperature=0.0).tolist() == [0, 0]


def test_ctrl_c_during_start_up_is_reported_as_an_interrupt_not_an_import_error(monkeypatch,
                                                                                capsys):
    import argparse
    import importlib

    from modlm import cli, faults

    def half_imported(args):
        try:
            raise KeyboardInterrupt        # Ctrl-C inside `import torch` ...
        except KeyboardInterrupt:
            # ... and the next import finds the half-initialised module
            raise ImportError("cannot import name 'Tensor' from partially initialized module "
                              "'torch'") from None

    def user_error(args):
        from modlm.checkpoint import DamagedCheckpoint
        raise DamagedCheckpoint("checkpoint x is unusable: y; z")

    for func, code, says in ((half_imported, 130, "modlm: interrupted"),
                             (user_error, 2, "modlm: error: checkpoint x is unusable")):
        parser = argparse.ArgumentParser()
        monkeypatch.setattr(parser, "parse_args", lambda argv, f=func: argparse.Namespace(func=f))
        monkeypatch.setattr(cli, "build_parser", lambda p=parser: p)
        assert cli.main([]) == code
        err = capsys.readouterr().err
        assert err.strip() == says or err.startswith(says), err
    # a bug keeps its traceback
    parser = argparse.ArgumentParser()
    monkeypatch.setattr(parser, "parse_args", lambda argv: argparse.Namespace(
        func=lambda args: 1 / 0))
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    with pytest.raises(ZeroDivisionError):
        cli.main([])
    # every class the CLI reports as a user error is where the CLI looks for it
    for module, name in faults.USER_ERRORS.items():
        cls = getattr(importlib.import_module(module), name)
        assert issubclass(cls, Exception) and cls.__module__ == module


# ---- folders that cannot be written, full disks, bytes that are not text -----------------------

_LIBC = ctypes.CDLL(None, use_errno=True)     # loaded here: a forked child should not dlopen
_PR_CAPBSET_DROP, _CAP_DAC_OVERRIDE, _CAP_DAC_READ_SEARCH = 24, 1, 2


def _without_permission_override() -> None:
    """preexec_fn: file permissions bind the child even though the tests run as root. The
    capabilities that bypass them (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH) leave the bounding set,
    so the interpreter exec'd next never has them; it stays uid 0, so it can still run the
    interpreter under /root. An unprivileged user has nothing to drop."""
    if os.geteuid() != 0:
        return
    for cap in (_CAP_DAC_OVERRIDE, _CAP_DAC_READ_SEARCH):
        if _LIBC.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


@pytest.fixture(scope="session")
def unprivileged(tmp_path_factory) -> Callable[[], None]:
    """The preexec_fn under which a folder of mode 0o555 is read-only to the child; skips where
    that cannot be arranged (root without CAP_SETPCAP)."""
    ro = tmp_path_factory.mktemp("probe") / "ro"
    ro.mkdir(mode=0o555)
    try:
        probe = subprocess.run([sys.executable, "-c", f"import os; os.mkdir({str(ro / 'x')!r})"],
                               preexec_fn=_without_permission_override, capture_output=True)
    except subprocess.SubprocessError as e:
        pytest.skip(f"cannot drop the capabilities that bypass file permissions: {e}")
    if probe.returncode == 0:
        pytest.skip("this process may write in a folder of mode 0o555 even without "
                    "CAP_DAC_OVERRIDE")
    return _without_permission_override


def read_only(path: Path) -> Path:
    """`path` and everything below it read-only (folders 0o555, files 0o444)."""
    for p in [path, *path.rglob("*")]:
        p.chmod(0o555 if p.is_dir() else 0o444)
    return path


def _corpus(tmp_path: Path) -> Path:
    words = ["the", "router", "picks", "tokens", "and", "blocks", "skip", "others", "quickly"]
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(" ".join(words[(i * j) % len(words)] for j in range(1, 12))
                              for i in range(400)))
    return path


def _tiny_train_args(tmp_path: Path, cache: Path, run_name: str, *extra: str) -> list[str]:
    """`modlm train` of a one-step run of a very small model, out_dir tmp_path/runs."""
    sets = {"data.corpus": _corpus(tmp_path), "data.cache_dir": cache, "data.seq_len": 32,
            "data.val_fraction": 0.1, "model.d_model": 32, "model.n_layers": 2,
            "model.n_heads": 2, "model.max_seq_len": 32, "steps": 1, "batch_size": 2,
            "eval_batches": 1, "device": "cpu", "out_dir": tmp_path / "runs",
            "run_name": run_name}
    return ["train", "--preset", "tiny", *(a for k, v in sets.items()
                                           for a in ("--set", f"{k}={v}")), *extra]


def _saved_checkpoint(tmp_path: Path) -> Path:
    from modlm.checkpoint import save_checkpoint
    from modlm.model import MoDLM
    from modlm.tokenizer import ByteTokenizer
    from tests.conftest import tiny_config
    model = MoDLM(tiny_config(vocab_size=256))
    return save_checkpoint(tmp_path / "run", step=1, model=model, optimizer_state=None,
                           trainer_state={"step": 1}, model_cfg=model.cfg,
                           tokenizer=ByteTokenizer())


def test_a_run_folder_that_is_a_file_or_read_only_is_refused_in_one_line(tmp_path,
                                                                         unprivileged):
    from modlm import atomic
    from modlm.train import configure
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "r").write_text("x")           # the run folder itself is a file
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o555)
    run = tmp_path / "old" / "r"                          # a run to --resume, read-only
    run.mkdir(parents=True)
    atomic.write_json(run / "config.json", configure("tiny", {"out_dir": str(run.parent),
                                                              "run_name": "r"}).to_dict())
    read_only(run)
    before = snapshot(tmp_path)
    cases = {("--set", f"out_dir={tmp_path / 'a-file'}"): ("a-file is a file", "out_dir"),
             ("--set", f"out_dir={tmp_path / 'runs'}", "--set", "run_name=r"):
                 (f"{tmp_path / 'runs' / 'r'} is a file", "run_name"),
             ("--set", f"out_dir={ro / 'runs'}", "--set", "run_name=r"):
                 (f"may not write in {ro}", "out_dir"),
             ("--resume", str(run)): (f"may not write in {run}", "permissions")}
    procs = modlm_at_once(*(["train", *(() if a[0] == "--resume" else ("--preset", "tiny")), *a]
                            for a in cases), preexec_fn=unprivileged)
    for proc, needles in zip(procs, cases.values()):
        one_line_error(proc, *needles)
    assert snapshot(tmp_path) == before and not any(ro.iterdir())
    assert sorted(p.name for p in run.iterdir()) == ["config.json"]


def test_export_hf_into_a_folder_under_a_file_or_a_read_only_one_is_one_line(tmp_path,
                                                                            unprivileged):
    ckpt = _saved_checkpoint(tmp_path)
    (tmp_path / "a-file").write_text("x")
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o555)
    for out, needles in ((tmp_path / "a-file" / "hf", ("a-file is a file, not a folder",)),
                         (ro / "hf", (f"may not write in {ro}",))):
        one_line_error(modlm("export-hf", str(ckpt), str(out), preexec_fn=unprivileged),
                       f"export target {out}", *needles)
    assert not any(ro.iterdir()) and (tmp_path / "a-file").read_text() == "x"


def test_a_read_only_token_cache_is_read_and_an_unwritable_one_is_skipped_with_a_warning(
        tmp_path, unprivileged):
    pytest.importorskip("tokenizers")
    from modlm.data import DataConfig, prepare_data
    bpe = ["--set", "data.tokenizer=bpe", "--set", "data.bpe_vocab_size=300"]
    full, empty = tmp_path / "cache", tmp_path / "empty-cache"
    args = _tiny_train_args(tmp_path, full, "full", *bpe)
    # The same data settings as the command line's fill the cache (a trained BPE, three texts).
    prepare_data(DataConfig(corpus=str(tmp_path / "corpus.txt"), seq_len=32, val_fraction=0.1,
                            tokenizer="bpe", bpe_vocab_size=300, cache_dir=str(full)))
    cached = snapshot(read_only(full))
    assert len(cached) == 5          # bpe-tokenizer-*/ (2 files) and train, val, pydoc ids
    empty.mkdir(mode=0o555)
    reads, skips = modlm_at_once(args, _tiny_train_args(tmp_path, empty, "empty", *bpe),
                                 preexec_fn=unprivileged)
    for proc in (reads, skips):
        assert proc.returncode == 0 and "(done)" in proc.stdout, proc.stderr
        assert "Traceback" not in proc.stderr, proc.stderr
    assert "modlm: warning" not in reads.stderr, reads.stderr
    assert snapshot(full) == cached
    (warning,) = [l for l in skips.stderr.splitlines() if "modlm: warning" in l]  # once, not 3x
    for needle in (f"cannot write the token cache {empty}", "Permission denied",
                   "without caching", "data.cache_dir", "$MODLM_CACHE_DIR"):
        assert needle in warning, warning
    assert not any(empty.iterdir())


def test_a_file_size_limit_is_one_line_and_the_earlier_checkpoints_stay_intact(tmp_path):
    from modlm.checkpoint import list_checkpoints
    from modlm.config import ModelConfig
    from modlm.data import DataConfig
    from modlm.train import TrainConfig, train
    limit = 64 * 1024
    cfg = TrainConfig(
        model=ModelConfig(vocab_size=256, d_model=32, n_layers=3, n_heads=2, d_mlp=37,
                          max_seq_len=32),
        data=DataConfig(corpus=str(_corpus(tmp_path)), seq_len=32, val_fraction=0.1,
                        cache_dir=str(tmp_path / "cache")),
        steps=4, batch_size=2, warmup_steps=1, eval_every=4, eval_batches=1,
        checkpoint_every=2, log_every=1, device="cpu", out_dir=str(tmp_path / "runs"),
        run_name="r")
    run = train(cfg).run_dir
    # As if killed after its checkpoint at step 2: --resume trains steps 3 and 4 and saves.
    shutil.rmtree(run / "checkpoints" / "step_00000004")
    (step2,) = list_checkpoints(run)
    assert (step2.path / "model.safetensors").stat().st_size > limit   # the save must fail
    before = snapshot(step2.path)

    def small_files() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    proc = modlm("train", "--resume", str(run), preexec_fn=small_files)
    line = one_line_error(proc, "saving checkpoint step 4", "file-size limit",
                          "free space or raise the limit", "earlier checkpoints are intact",
                          f"modlm train --resume {run}")
    assert "SafetensorError" not in line and "RuntimeError" not in line, line
    assert [c.step for c in list_checkpoints(run)] == [2]
    assert snapshot(step2.path) == before                  # byte-identical
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best.json",
                                                                      "step_00000002"]


@pytest.mark.parametrize("error, needles", [
    (OSError(errno.ENOSPC, "No space left on device", "/data/run/metrics.jsonl"),
     ("cannot write /data/run/metrics.jsonl", "no space is left", "free space or raise")),
    (OSError(errno.EDQUOT, "Disk quota exceeded", "/data/x"),
     ("cannot write /data/x", "disk quota", "free space or raise the limit")),
    (OSError(errno.EROFS, "Read-only file system", "/ro/x"),
     ("cannot write /ro/x", "read-only", "writable file system")),
    (PermissionError(errno.EACCES, "Permission denied", "/data/run/.lock"),
     ("cannot open /data/run/.lock: permission denied", "permissions")),
])
def test_full_disk_quota_read_only_and_permission_errors_are_one_line(monkeypatch, capsys,
                                                                      error, needles):
    import argparse

    from modlm import cli

    def fail(args):
        raise error

    def wrapped(args):            # how torch.save reports it: a RuntimeError over the OSError
        try:
            raise error
        except OSError:         # torch chains it implicitly, as __context__
            raise RuntimeError("[enforce fail at inline_container.cc] unexpected pos")  # noqa: B904

    previous = signal.signal(signal.SIGXFSZ, signal.SIG_DFL)
    try:
        for func in (fail, wrapped):
            parser = argparse.ArgumentParser()
            monkeypatch.setattr(parser, "parse_args",
                                lambda argv, f=func: argparse.Namespace(func=f, command="eval"))
            monkeypatch.setattr(cli, "build_parser", lambda p=parser: p)
            if func is wrapped and error.errno == errno.EACCES:
                with pytest.raises(RuntimeError):     # not a storage fault: a bug's traceback
                    cli.main([])
                continue
            assert cli.main([]) == 2
            (line,) = capsys.readouterr().err.splitlines()
            assert line.startswith("modlm: error: "), line
            for needle in needles if func is fail else needles[1:]:
                assert needle in line, line
        # A write past RLIMIT_FSIZE fails with EFBIG instead of SIGXFSZ killing the process.
        assert signal.getsignal(signal.SIGXFSZ) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGXFSZ, previous)


def test_a_prompt_with_bytes_that_are_not_utf8_is_one_line_and_a_clear_library_error(tmp_path):
    from modlm.checkpoint import load_model
    from modlm.generate import Engine
    from modlm.tokenizer import ByteTokenizer, TokenizerError
    ckpt = _saved_checkpoint(tmp_path)
    cases = {(b"--prompt", b"ab\xffc"): "--prompt",
             (b"--prompt", b"abc", b"--stop", b"\xe9t\xe9"): "--stop",
             (b"--escapes", b"--prompt", b"a\\n\xff"): "--prompt"}
    procs = modlm_at_once(*(["sample", str(ckpt), "--max-new-tokens", "2", *a] for a in cases))
    for proc, option in zip(procs, cases.values()):
        one_line_error(proc, f"{option} holds the byte 0x", "which is not UTF-8",
                       "give it as UTF-8 text")
    model, loaded = load_model(ckpt)
    engine = Engine(model.eval())
    bad = "ab\udcffc"                      # how Python decodes the byte 0xff in argv
    with pytest.raises(GenerationError, match="prompt 1 holds the byte 0xff, which is not UTF-8"):
        engine.generate_text(loaded.tokenizer, ["fine", bad], 2)
    with pytest.raises(GenerationError, match="prompt 0 holds the byte 0xff"):
        engine.stream_text(loaded.tokenizer, bad, 2)
    tokenizers = [ByteTokenizer()]
    try:
        from modlm.tokenizer import BPETokenizer
        tokenizers.append(BPETokenizer.train("the router picks tokens " * 20, 300))
    except TokenizerError:
        pass                                  # `tokenizers` is not installed
    for tok in tokenizers:
        for encode in (tok.encode, tok.encode_array):
            with pytest.raises(TokenizerError, match="at character 2: it is not Unicode text"):
                encode(bad)
    assert engine.generate_text(loaded.tokenizer, "ab", 1).result.new_tokens == 1
