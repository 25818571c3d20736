"""The output directory's life: one writer at a time, a hidden temporary sibling, leftovers, publishing, signals.

An export builds everything in a hidden sibling `.NAME.partial-XXXX` and renames it into place at the end, so no
failure leaves a directory that looks complete. Around that:

- a lock (`.NAME.lock` beside the output, `flock`) lets one export at a time write a given `-o`: a second export
  to the same directory fails at once, naming the other one's pid, never mixing files with it;
- whoever holds the lock knows that any `.NAME.partial-*` or `.NAME.old-*` sibling was left by an export that was
  killed (SIGKILL, a power cut): it removes them and says so;
- SIGTERM (and SIGINT) become `Interrupted`, so the temporary directory is removed on the way out and the command
  ends with one line; SIGXFSZ is ignored, so a file-size limit gives the write an EFBIG error to report rather than
  killing the process.

`phase(name)` marks the phases of llama-export (tracing, writing weights, graph passes, verifying, publishing) and
of llama-build (checking, profiles). With `LLAMA_EXPORT_PAUSE_AT=NAME` in the environment the command stops at the
start of that phase (saying so on stderr, with its pid) until it gets SIGUSR1 or `LLAMA_EXPORT_PAUSE_S` seconds
(default 120) pass: a test hook, so that a test can signal a command in a known phase. It changes nothing else.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import signal
import tempfile
import time
from pathlib import Path
from typing import Callable

from .errors import ExportError

PHASES = ("tracing", "writing weights", "graph passes", "verifying", "publishing")
PAUSE_AT = "LLAMA_EXPORT_PAUSE_AT"
_HELD: dict[Path, tuple[int, Path]] = {}  # temporary directory → (lock fd, lock path)
NO_SPACE = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}


class Interrupted(BaseException):
    """SIGINT or SIGTERM arrived: unwind (removing the temporary directory) and exit 128 + signal."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def phase(name: str, log: Callable[[str], None]) -> None:
    """The start of phase `name`; pauses there when LLAMA_EXPORT_PAUSE_AT names it (test hook), until SIGUSR1 or
    LLAMA_EXPORT_PAUSE_S seconds."""
    if os.environ.get(PAUSE_AT) != name:
        return
    resumed = []
    previous = signal.signal(signal.SIGUSR1, lambda signum, frame: resumed.append(signum))
    try:
        log(f"paused at phase {name!r} ({PAUSE_AT}); pid {os.getpid()}")
        deadline = time.monotonic() + float(os.environ.get("LLAMA_EXPORT_PAUSE_S", "120"))
        while not resumed and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        signal.signal(signal.SIGUSR1, previous)


def catch_signals() -> Callable[[], None]:
    """From now on SIGINT/SIGTERM raise `Interrupted` and SIGXFSZ is ignored (writes past a size limit fail with
    EFBIG); returns the function that puts the previous handlers back."""
    def raise_interrupted(signum, frame):
        raise Interrupted(signum)

    previous = {s: signal.signal(s, raise_interrupted) for s in (signal.SIGINT, signal.SIGTERM)}
    previous[signal.SIGXFSZ] = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)

    def restore() -> None:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return restore


def _lock(out_dir: Path) -> tuple[int, Path]:
    """Hold `.NAME.lock` beside `out_dir`, or refuse: another export is writing the same directory."""
    path = out_dir.with_name(f".{out_dir.name}.lock")
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise ExportError(f"another llama-export (pid {holder}) is writing {out_dir} right now; wait for it "
                              f"to finish, or choose another -o DIR") from None
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino  # not a lock file its holder just removed
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
            return fd, path
        os.close(fd)


def _release(fd: int, path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink()  # while still holding it: a waiting export then locks a fresh file
    os.close(fd)


def _remove_leftovers(out_dir: Path, log: Callable[[str], None]) -> None:
    """Remove what killed exports to `out_dir` left: only a lock holder may call this."""
    prefixes = (f".{out_dir.name}.partial-", f".{out_dir.name}.old-")
    for entry in sorted(out_dir.parent.iterdir()):
        if entry.name.startswith(prefixes) and entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
            log(f"removed {entry}, left by an export to {out_dir} that was killed")


def prepare_output(out_dir: Path, force: bool, log: Callable[[str], None] = lambda message: None) -> Path:
    """Take the output's lock, refuse an existing DIR without --force, clear leftovers; make a temporary sibling
    to build in. `publish` or `discard` it, which releases the lock."""
    out_dir = out_dir.absolute()
    if out_dir.exists() and not force:
        raise ExportError(f"{out_dir} already exists; pass --force to replace it, or choose another -o DIR")
    if out_dir.exists() and not out_dir.is_dir():
        raise ExportError(f"{out_dir} exists and is not a directory; remove it or choose another -o DIR")
    parent = out_dir.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        held = _lock(out_dir)
    except OSError as err:
        raise ExportError(f"cannot write the artifact under {parent}: {err.strerror}; choose a writable -o DIR") from None
    try:
        if out_dir.exists() and not force:  # published by another export since the first look
            raise ExportError(f"{out_dir} already exists; pass --force to replace it, or choose another -o DIR")
        _remove_leftovers(out_dir, log)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=parent))
    except OSError as err:
        _release(*held)
        raise ExportError(f"cannot write the artifact under {parent}: {err.strerror}; choose a writable -o DIR") from None
    except BaseException:
        _release(*held)
        raise
    _HELD[tmp] = held
    return tmp


def publish(tmp: Path, out_dir: Path) -> None:
    """Rename the finished directory into place, replacing an old one only now; release the lock."""
    out_dir = out_dir.absolute()
    trash = None
    if out_dir.exists():
        trash = out_dir.with_name(f".{out_dir.name}.old-{time.time_ns()}")
        out_dir.rename(trash)
    tmp.chmod(0o755)  # mkdtemp makes it private
    tmp.rename(out_dir)
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)
    if tmp in _HELD:
        _release(*_HELD.pop(tmp))


def discard(tmp: Path) -> None:
    """Remove an unfinished temporary directory and release the lock."""
    shutil.rmtree(tmp, ignore_errors=True)
    if tmp in _HELD:
        _release(*_HELD.pop(tmp))


def write_failure(err: OSError, output: Path) -> str | None:
    """The one line for a write that failed for want of space (ENOSPC, EFBIG, EDQUOT), else None."""
    if err.errno not in NO_SPACE:
        return None
    where = f" ({err.filename})" if err.filename else ""
    return (f"cannot write the artifact {output}: {err.strerror}{where}; nothing was left behind. Free some space "
            f"(or raise the file-size limit) and run again, or choose another -o DIR")
