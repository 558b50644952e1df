"""One writer per run directory: `train.lock` names the process that holds it.

The holder keeps the file open with an exclusive `flock`, which the kernel drops when the process
ends, however it ends: a lock file whose flock is free was left by a process of this host that
is no longer running, and is taken over with a note. A lock file naming another host is
refused, since no process there can be checked; the message says which file to delete once
that run is over. Where the filesystem has no flock, the lock file's process id is checked
instead. Under torchrun one lock serves the job: rank 0 holds it (train/trainer.py).
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from burrow.errors import UserError
from burrow.parallel.runtime import Runtime

try:
    import fcntl
except ImportError:  # no flock here: the process id alone decides
    fcntl = None

LOCK_FILE = "train.lock"
T = TypeVar("T")


class RunLock:
    """The lock of one run directory; `acquire` it (or use `with`) before writing the run."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_FILE
        self.fd: int | None = None

    def acquire(self) -> str | None:
        """Take the lock (creating the run directory); return a one-line note when a dead
        process's lock was taken over. Raise UserError if another writer holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, locked = self._open_locked()
        try:
            holder = _read(fd)
            note = None
            if holder is not None:
                host, pid = holder.get("host"), holder.get("pid")
                if host != socket.gethostname() or (not locked and _alive(pid)):
                    raise UserError(self._refusal(holder))
                note = (f"note: took over {self.path} from process {pid} on {host}, which is "
                        "no longer running")
            me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd
        return note

    def _open_locked(self) -> tuple[int, bool]:
        """The lock file, open and flocked (False where the filesystem has no flock)."""
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                if fcntl is None:
                    return fd, False
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read(fd)
                os.close(fd)
                raise UserError(self._refusal(holder)) from None
            except OSError:  # e.g. a network filesystem without locks
                return fd, False
            try:  # the holder may have released (and deleted) the file while this opened it
                if os.fstat(fd).st_ino == os.stat(self.path).st_ino:
                    return fd, True
            except FileNotFoundError:
                pass
            os.close(fd)

    def _refusal(self, holder: dict[str, Any] | None) -> str:
        who = (f"pid {holder.get('pid')} on {holder.get('host')}" if holder
               else "a process that has not written its name yet")
        return (f"{self.path.parent} is being written by another burrow train ({who}); wait "
                f"for it to finish, or choose another --out (if that run is over, delete "
                f"{self.path})")

    def release(self) -> None:
        """Give the lock back: the file goes, then the flock."""
        if self.fd is None:
            return
        try:
            if os.fstat(self.fd).st_ino == os.stat(self.path).st_ino:
                self.path.unlink()
        except FileNotFoundError:
            pass
        os.close(self.fd)
        self.fd = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def on_rank_zero(runtime: Runtime, action: Callable[[], T]) -> T | None:
    """`action()` on rank 0 alone; if it raises UserError, every rank raises, so that no rank
    is left waiting for rank 0 at a barrier."""
    result, error = None, None
    if runtime.is_main:
        try:
            result = action()
        except UserError as caught:
            error = caught
    if runtime.any(error is not None):
        raise error or UserError("rank 0 stopped the job; its message says why")
    return result


@contextmanager
def job_lock(run_dir: Path, runtime: Runtime, log: Callable[[str], None]) -> Iterator[None]:
    """Hold the run directory's lock while the body runs: one lock for a job, held by rank 0,
    which the other ranks trust (they raise too if rank 0 is refused)."""
    lock = RunLock(run_dir)
    note = on_rank_zero(runtime, lock.acquire)
    if note:
        log(note)
    try:
        yield
    finally:
        if runtime.is_main:
            lock.release()


def _read(fd: int) -> dict[str, Any] | None:
    """The holder a lock file names, or None when it names none."""
    try:
        holder = json.loads(os.pread(fd, 4096, 0) or b"null")
    except (ValueError, OSError):
        return None
    return holder if isinstance(holder, dict) else None


def _alive(pid: Any) -> bool:
    """Whether a process with this id runs on this host."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        return True
    return True
