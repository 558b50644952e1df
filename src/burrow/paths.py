"""The places burrow reads and writes: a file-system error told in one line (the path, what is
wrong, the fix), and a check that a directory can be written, made before long work starts."""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path

from burrow.errors import UserError

# errno -> (what is wrong, the usual fix)
_PROBLEMS = {
    errno.EROFS: ("the file system is read-only", "choose a place on a writable one"),
    errno.EACCES: ("permission denied", "choose a place you may write, or change its permissions"),
    errno.EPERM: ("operation not permitted", "choose a place you may write"),
    errno.ENOSPC: ("no space left on the device", "free some space or choose another place"),
    errno.EDQUOT: ("disk quota exceeded", "free some space or choose another place"),
    errno.ENOENT: ("no such file or directory", "check the path"),
    errno.ENOTDIR: ("a part of the path is not a directory", "check the path"),
    errno.EISDIR: ("it is a directory, not a file", "give the path of a file"),
    errno.EEXIST: ("it already exists", "remove it or choose another name"),
    errno.ENAMETOOLONG: ("the name is too long", "choose a shorter path"),
}


def problem_of(error: OSError) -> str:
    """What is wrong, in a few words: 'the file system is read-only'."""
    known = _PROBLEMS.get(error.errno or 0)
    return known[0] if known else (error.strerror or str(error)).lower()


def os_error_message(error: OSError, fix: str | None = None) -> str:
    """One line for a failed file operation: the path, what is wrong and the fix."""
    path = error.filename if error.filename is not None else error.filename2
    known = _PROBLEMS.get(error.errno or 0)
    fix = fix or (known[1] if known else "check the path and try again")
    return f"{path}: {problem_of(error)}; {fix}" if path else f"{problem_of(error)}; {fix}"


def nearest_existing(path: Path) -> Path:
    """`path` itself if it exists, else its nearest ancestor that does."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_directory(path: str | Path, what: str, fix: str) -> Path:
    """`path`, after checking that it is a directory or can be made as one (nothing on the way
    is a file); UserError naming `what` (e.g. "run directory"), the path and `fix` otherwise."""
    path = Path(path).expanduser()
    existing = nearest_existing(path)
    if not existing.is_dir():
        where = ("is not a directory" if existing == path
                 else f"cannot be made: {existing} is not a directory")
        raise UserError(f"{what} {path} {where}; {fix}")
    return path


def check_writable_dir(path: str | Path, what: str, fix: str) -> Path:
    """`path`, after checking that it is a directory burrow can write into, or can be made as one.

    Probes the directory (or its nearest existing ancestor) by creating and removing a hidden
    file, since permission bits and os.access do not see read-only mounts everywhere.
    """
    path = check_directory(path, what, fix)
    try:
        handle, probe = tempfile.mkstemp(dir=nearest_existing(path), prefix=".burrow-probe-")
    except OSError as error:
        raise UserError(f"{what} {path} cannot be written ({problem_of(error)}); {fix}") from None
    os.close(handle)
    os.unlink(probe)
    return path
