"""Refusals under torchrun (two CPU processes, gloo): what rank 0 alone checks (the run folder's
lock, the checkpoint to resume from) stops every rank at once with the same one-line error,
instead of leaving the others waiting at a collective for a rank that left.

Each rank's stderr is read from torchrun's per-rank log files (`--log-dir` with `-r 3`), apart
from torchrun's own failure summary. The resume test, which trains a run first, is marked slow.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from modlm.checkpoint import latest_checkpoint
from modlm.train import configure, train

_HOLD_LOCK = """
import sys, time
from modlm.atomic import FolderLock
FolderLock(sys.argv[1]).acquire()
print("locked", flush=True)
time.sleep(600)
"""


@pytest.fixture
def corpus(number_corpus: Path) -> Path:
    return number_corpus


def torchrun(tmp_path: Path, *args: str) -> tuple[int, list[str], float]:
    """Run `torchrun --nproc_per_node=2 -m modlm ARGS`; returns its exit status, each rank's
    stderr and the seconds it took. A hang fails the test after 120 s (torchrun and its workers,
    in a session of their own, are killed)."""
    logs = tmp_path / "torchrun-logs"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "--log-dir", str(logs), "-r", "3", "-m", "modlm", *args]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"torchrun still waiting after 120 s (a rank left waiting?):\n{out[-3000:]}")
    wall = time.perf_counter() - t0
    errs = [next(logs.rglob(f"attempt_0/{rank}/stderr.log")).read_text() for rank in (0, 1)]
    return proc.returncode, errs, wall


def settings(tmp_path: Path, corpus: Path, name: str) -> dict[str, str]:
    """A tiny run's --set values."""
    return {"data.corpus": str(corpus), "data.cache_dir": str(tmp_path / "cache"),
            "out_dir": str(tmp_path / "runs"), "run_name": name, "device": "cpu",
            "steps": "1", "batch_size": "2", "eval_batches": "1"}


def train_args(tmp_path: Path, corpus: Path, name: str) -> list[str]:
    args = ["train", "--preset", "tiny"]
    for key, value in settings(tmp_path, corpus, name).items():
        args += ["--set", f"{key}={value}"]
    return args


def assert_one_line_on_every_rank(errs: list[str], says: str) -> None:
    for rank, err in enumerate(errs):
        assert err.startswith("modlm: error: ") and err.count("\n") == 1, (rank, err)
        assert says in err and "Traceback" not in err, (rank, err)
    assert errs[0] == errs[1]


def test_a_locked_run_folder_stops_every_rank_with_one_line(tmp_path, corpus):
    run = tmp_path / "runs" / "r"
    run.mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(run)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = (run / ".lock").read_bytes()
        rc, errs, wall = torchrun(tmp_path, *train_args(tmp_path, corpus, "r"))
        assert rc != 0 and wall < 60
        assert_one_line_on_every_rank(
            errs, f"being written by another process (pid {holder.pid} ")
        assert [p.name for p in run.iterdir()] == [".lock"]
        assert (run / ".lock").read_bytes() == before
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()


@pytest.mark.slow   # a training run, then torchrun: about 10 s on a busy machine
def test_resume_with_no_checkpoint_that_verifies_stops_every_rank_with_one_line(tmp_path,
                                                                               corpus):
    run = train(configure("tiny", settings(tmp_path, corpus, "damaged"))).run_dir
    weights = latest_checkpoint(run) / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0xFF                                # one flipped byte: it no longer verifies
    weights.write_bytes(bytes(data))
    rc, errs, wall = torchrun(tmp_path, "train", "--resume", str(run))
    assert rc != 0 and wall < 60
    assert_one_line_on_every_rank(errs, f"no checkpoint of {run} verifies")

