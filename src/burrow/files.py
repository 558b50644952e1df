"""Files that are whole or absent: written beside their place, flushed, then renamed over it.

A reader (a plot viewer, a resumed run, a sweep looking at its own results) sees the old file or
the whole new one, never half, whatever stops the writer. Each write stages under a name of its
own (process id and a random part), so two writers never write into one staging file, and the
file gets the mode the user's umask gives any new file, whatever the writer (safetensors, for
one, creates its files 0600).
"""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def new_file_mode() -> int:
    """The permissions a new file gets under this process's umask (0644 under umask 022)."""
    try:  # Linux says it without changing it
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    except OSError:
        pass
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


def staging_path(path: str | Path) -> Path:
    """A hidden sibling of `path`, unique to this write, that keeps its extension."""
    path = Path(path)
    token = f"{os.getpid()}-{secrets.token_hex(4)}"
    return path.with_name(f".{path.name}.{token}.tmp{path.suffix}")


@contextmanager
def replacing(path: str | Path) -> Iterator[Path]:
    """Replace the file `path` whole or not at all: write the yielded staging path; it is then
    flushed to disk, given the umask's mode and renamed over `path`. On an error the staging
    file goes and `path` stays as it was."""
    path = Path(path)
    staging = staging_path(path)
    try:
        yield staging
        fd = os.open(staging, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.chmod(staging, new_file_mode())
        os.replace(staging, path)
    finally:
        staging.unlink(missing_ok=True)


def write_text(path: str | Path, text: str) -> Path:
    """Replace `path` with `text` atomically."""
    with replacing(path) as staging:
        staging.write_text(text)
    return Path(path)


def copy_file(source: str | Path, path: str | Path) -> Path:
    """Replace `path` with a copy of `source` atomically."""
    with replacing(path) as staging:
        shutil.copyfile(source, staging)
    return Path(path)


def save_figure(figure: Any, path: str | Path) -> Path:
    """Save a matplotlib figure to `path` atomically, then close it."""
    import matplotlib.pyplot as plt

    try:
        with replacing(path) as staging:  # the staging name keeps the extension matplotlib reads
            figure.savefig(staging)
    finally:
        plt.close(figure)
    return Path(path)
