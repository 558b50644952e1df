"""Where prepared data lives: ``$BURROW_CACHE``, default ``~/.cache/burrow``.

The cache must be a directory, checked before any work; it must be writable only when something
is to be written into it, so that a read-only cache that already holds the prepared data serves.
"""

from __future__ import annotations

import os
from pathlib import Path

from burrow.paths import check_directory

CACHE = "data cache (BURROW_CACHE)"
CACHE_FIX = "point BURROW_CACHE at a writable directory"


def cache_dir() -> Path:
    """Where prepared data lives: $BURROW_CACHE, or ~/.cache/burrow."""
    return Path(os.environ.get("BURROW_CACHE") or Path.home() / ".cache" / "burrow").expanduser()


def check_cache() -> Path:
    """The cache directory, after checking that it is (or can be made as) a directory."""
    return check_directory(cache_dir(), CACHE, CACHE_FIX)

