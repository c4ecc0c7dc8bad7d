"""How a failure reaches the command-line user: one line that names the problem and the fix.

`modlm.cli.main` asks, in order: was it an interrupt (Ctrl-C, also one that broke an import
half-way: `interrupted`); a machine's storage fault (full disk, quota, file-size limit, read-only
file system, permission: `storage_fault`, found anywhere in the exception chain, since libraries
wrap the OSError); or one of modlm's own error classes, whose messages are written for the user
(`is_user_error`). Anything else is a bug and keeps its traceback. `check_writable` refuses an
output folder before a command starts writing.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import re
import signal
from collections.abc import Iterator
from pathlib import Path

from modlm.config import ConfigError


def check_writable(folder: Path, what: str, fix: str) -> None:
    """Refuse at once, in one line, a folder this command must create or write in but cannot:
    it or a folder above it is a file, or the nearest one that exists is read-only to this
    process. (The write itself may still fail later; `main` reports that in one line too.)"""
    nearest = next((p for p in (folder, *folder.parents) if os.path.exists(p)), None)
    if nearest is None:
        return
    if not os.path.isdir(nearest):
        raise ConfigError(f"{what} cannot be written: {nearest} is a file, not a folder; {fix}")
    if not os.access(nearest, os.W_OK | os.X_OK,
                     effective_ids=os.access in os.supports_effective_ids):
        with contextlib.suppress(OSError, AttributeError):
            if os.statvfs(nearest).f_flag & os.ST_RDONLY:
                raise ConfigError(f"{what} cannot be written: {nearest} is on a read-only file "
                                  f"system; {fix}")
        raise ConfigError(f"{what} cannot be written: this user may not write in {nearest}; "
                          f"{fix}")


USER_ERRORS = {"modlm.config": "ConfigError", "modlm.corpus": "DataError",
                "modlm.tokenizer": "TokenizerError", "modlm.checkpoint": "CheckpointError",
                "modlm.train": "TrainingError", "modlm.generate.errors": "GenerationError",
                "modlm.untrusted": "UntrustedFileError"}


def is_user_error(e: BaseException) -> bool:
    """Whether `e` is one of the project's own error classes, whose messages are written for the
    user (anything else is a bug and keeps its traceback). Decided from the class hierarchy
    alone: importing the modules here could fail while an interrupted import is half done."""
    return any(USER_ERRORS.get(c.__module__) == c.__name__ for c in type(e).__mro__)


def interrupted(e: BaseException) -> bool:
    """A KeyboardInterrupt, or an error raised while one was being handled (Ctrl-C during an
    import leaves half-imported modules that fail next)."""
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, KeyboardInterrupt):
            return True
        seen.add(id(e))
        e = e.__context__ or e.__cause__   # type: ignore[assignment]
    return False


# Write failures that are the machine's, not modlm's: the problem and the fix.
_STORAGE_FAULTS = {
    errno.ENOSPC: "no space is left on the device",
    errno.EDQUOT: "the disk quota is used up",
    errno.EFBIG: "the file would pass this process's file-size limit (ulimit -f)",
    errno.EROFS: "the file system is read-only",
}
_FREE_SPACE = "free space or raise the limit"
_OS_ERROR_IN_TEXT = re.compile(r"\(os error (\d+)\)")   # how Rust libraries (safetensors) say it


def _chain(e: BaseException | None) -> Iterator[BaseException]:
    """`e`, then what it was raised from or while handling (not a context it suppressed)."""
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or (None if e.__suppress_context__ else e.__context__)


def storage_fault(e: BaseException, args: argparse.Namespace | None) -> str | None:
    """One line for a disk that is full or read-only, a file-size limit or quota reached
    (anywhere in `e`'s chain: libraries wrap the OSError), or a permission denied (an OSError
    that escaped as it is); None for any other error."""
    code, filename = None, None
    for x in _chain(e):
        if isinstance(x, OSError) and x.errno in _STORAGE_FAULTS:
            code, filename = x.errno, x.filename
            break
        m = _OS_ERROR_IN_TEXT.search(str(x))
        if m and int(m.group(1)) in _STORAGE_FAULTS:
            code = int(m.group(1))
            break
    if code is None:
        if isinstance(e, OSError) and e.errno in (errno.EACCES, errno.EPERM):
            return (f"cannot open {e.filename or 'a file'}: permission denied; fix its "
                    f"permissions or choose a folder this user can write")
        return None
    if filename is not None:
        where = f"cannot write {filename}"
    elif is_user_error(e) and e.__cause__ is not None and f" ({e.__cause__!r})" in str(e):
        where = str(e).split(f" ({e.__cause__!r})")[0]   # "saving checkpoint 4 into X failed"
    else:
        where = "a write failed"
    fix = ("write to a folder on a writable file system" if code == errno.EROFS
           else _FREE_SPACE)
    message = f"{where}: {_STORAGE_FAULTS[code]}; {fix}"
    command = getattr(args, "command", None)
    if command == "train":
        # Checkpoints are written whole into a temporary folder, then renamed into place.
        run = getattr(args, "run_dir", None) or "RUN_FOLDER"
        message += (f"; the run's earlier checkpoints are intact (each is written whole or not "
                    f"at all): then continue it with `modlm train --resume {run}`")
    elif command == "export-hf":
        message += f"; {args.out_dir} is as it was (an export is renamed into place whole)"
    return message


def ignore_file_size_signal() -> None:
    """A write past RLIMIT_FSIZE then fails with EFBIG, reported in one line, instead of SIGXFSZ
    killing the process without a word. (CPython's start-up ignores SIGXFSZ already; a program
    that embeds Python, or restores the default before calling `main`, may not.)"""
    with contextlib.suppress(AttributeError, ValueError):   # no SIGXFSZ; not the main thread
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)


def quiet_torch_logs() -> None:
    """torch's C++ layer logs its retries with stack frames to stderr (a torchrun rank waiting
    for a peer that never comes prints pages before the one-line error); keep it to fatal
    messages unless the user chose a level. Read once, when torch loads, so set here first."""
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "FATAL")
