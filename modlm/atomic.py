"""Crash-safe file writes, used by every module that writes run state, caches or checkpoints,
and the lock that keeps one writer per run folder (`FolderLock`).

A file is written under a hidden temporary name beside its target, flushed and fsynced, renamed
over the target (`os.replace`, atomic on POSIX), and the folder is fsynced: a reader sees the
old file or the new one, never a half-written one, and a crash leaves at most a hidden
`.NAME.*.tmp` file. Files get the ordinary umask-respecting mode (not mkstemp's 0600).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike[str], mode: str = "w") -> Iterator[IO[Any]]:
    """Open a temporary sibling of `path` for writing; on success it replaces `path`."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open writes whole files: mode must be 'w' or 'wb', got {mode!r}")
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        exclusive = "x" if mode == "w" else "xb"  # never reuse a name another writer holds
        with open(tmp, exclusive, **({"encoding": "utf-8"} if mode == "w" else {})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_text(path: str | os.PathLike[str], text: str) -> None:
    with atomic_open(path, "w") as f:
        f.write(text)


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def copy_file(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
    with atomic_open(dst, "wb") as out, open(src, "rb") as inp:
        shutil.copyfileobj(inp, out)


def fsync_file(path: str | os.PathLike[str]) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | os.PathLike[str]) -> None:
    if not hasattr(os, "O_DIRECTORY"):  # Windows cannot open a folder to fsync it
        return
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: str | os.PathLike[str]) -> None:
    """fsync every file and folder below `path`, deepest first, then `path` itself."""
    for p in sorted(Path(path).rglob("*"), reverse=True):
        if p.is_file():
            fsync_file(p)
        elif p.is_dir():
            fsync_dir(p)
    fsync_dir(path)


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike[str], replace: bool = False) -> Iterator[Path]:
    """Write a whole folder: yield a hidden temporary sibling to fill; on success it becomes
    `path` (fsynced). An existing `path` must be empty, or `replace` must be set: then it is
    renamed aside, the new folder renamed in, and only then the old one deleted, so a crash
    leaves a complete folder, never a mix: the old one or the new one at `path`, or (killed
    between the two renames) the old one under its hidden `.NAME.*.old` name. An error raised
    before the renames changes nothing at `path`."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{path} is a file, not a folder")
    if path.is_dir() and any(path.iterdir()) and not replace:
        raise FileExistsError(f"{path} is not empty")
    tag = f"{os.getpid()}.{uuid.uuid4().hex[:8]}"
    tmp = path.with_name(f".{path.name}.{tag}.tmp")
    tmp.mkdir(parents=True)
    try:
        yield tmp
        fsync_tree(tmp)
        old = None
        if path.is_dir() and any(path.iterdir()):
            if not replace:    # filled while we wrote
                raise FileExistsError(f"{path} is not empty")
            old = path.with_name(f".{path.name}.{tag}.old")
            os.rename(path, old)
        elif path.is_dir():
            path.rmdir()       # empty: rename cannot put a folder over another
        try:
            os.rename(tmp, path)
        except BaseException:
            if old is not None:
                os.rename(old, path)
            raise
        fsync_dir(path.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


class FolderBusy(RuntimeError):
    """Another live process holds the folder's lock."""


class FolderLock:
    """One writer per folder: an exclusive `flock` on FOLDER/.lock, held from `acquire()` until
    `release()` or the process ends. The kernel drops the lock of a process that dies, so a
    killed writer never leaves it stuck; the file records the holder (pid, host, start) for
    messages, and a file still naming a holder when the lock is free marks one that died
    holding it (`acquire` then returns a message saying it took over)."""

    NAME = ".lock"

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.path = Path(folder) / self.NAME
        self._fd: int | None = None

    def acquire(self) -> str | None:
        import fcntl
        import socket
        import time
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
                os.close(fd)
                raise FolderBusy(f"{self.path.parent} is being written by another process "
                                 f"({holder or 'unknown'})") from None
            # A holder that released the lock may have removed the file meanwhile: lock the
            # file that is at the path now.
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        previous = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
        record = (f"pid {os.getpid()} on {socket.gethostname()}, since "
                  f"{time.strftime('%Y-%m-%d %H:%M:%S')}")
        os.ftruncate(fd, 0)
        os.pwrite(fd, record.encode(), 0)
        self._fd = fd
        if previous:
            return (f"took over the lock of {self.path.parent} from a writer that ended without "
                    f"releasing it ({previous})")
        return None

    def take(self, advice: str) -> FolderLock:
        """Acquire for a command: a live holder is refused as one ConfigError line (its pid and
        `advice`, what the user can do), a takeover from a dead holder is said; returns self."""
        from modlm.config import ConfigError
        try:
            took_over = self.acquire()
        except FolderBusy as e:
            raise ConfigError(f"{e}; {advice}") from None
        if took_over:
            print(f"modlm: {took_over}", flush=True)
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            self.path.unlink(missing_ok=True)   # while still held: no one locks a stale file
        finally:
            os.close(fd)

    def __enter__(self) -> FolderLock:
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()
