"""Numbers as people read them: counts (70B, 1.4T) and durations (1h02m). No torch, so that the
commands that only do arithmetic (`burrow presets`, `burrow plan`) start at once."""

from __future__ import annotations


def format_duration(seconds: float) -> str:
    """3725 -> '1h02m', 125 -> '2m05s', 7 -> '7s'."""
    seconds = max(0, round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


def format_count(value: float | None) -> str:
    """70e9 -> '70B', 1.4e12 -> '1.4T', 4230000 -> '4.23M'; None -> '-'."""
    if value is None:
        return "-"
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(value) >= size:
            return f"{value / size:.3g}{unit}"
    return f"{value:.3g}"
