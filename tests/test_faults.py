"""Environment faults and bad arguments end in one clear line naming the problem and the fix,
never a traceback or a hang: the real CLI in a subprocess, and the library functions behind it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from modlm.config import ConfigError
from modlm.generate import GenerationError, sample_next
from modlm.runtime import distributed_env

TORCHRUN_OK = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}


def modlm(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None
          ) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items()
            if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    return subprocess.run([sys.executable, "-m", "modlm", *args], env={**base, **(env or {})},
                          capture_output=True, text=True, timeout=120, cwd=cwd)


def one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    (line,) = [l for l in proc.stderr.splitlines() if "error" in l]
    for needle in needles:
        assert needle in line, line
    return line


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

    from modlm import cli

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
    for module, name in cli._USER_ERRORS.items():
        cls = getattr(importlib.import_module(module), name)
        assert issubclass(cls, Exception) and cls.__module__ == module
