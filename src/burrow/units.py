"""Numbers as people read them: counts (70B, 1.4T), durations (1h02m) and sizes (80 GB). No
torch, so that the commands that only do arithmetic (`burrow presets`, `burrow plan`) start at
once."""

from __future__ import annotations

from burrow.errors import UserError


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


# Decimal units as datasheets write them (80GB = 80e9 bytes) and binary ones as nvidia-smi and
# torch report them (80GiB = 80 x 2^30).
_BYTE_UNITS = {"": 1, "b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12,
               "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str, what: str = "memory") -> float:
    """'80GB' -> 80e9, '80GiB' -> 80 x 2^30, '40e9' -> 40e9 (bytes); UserError otherwise."""
    spelled = text.strip().lower().replace(" ", "")
    number = spelled.rstrip("kmgtib")
    unit = spelled[len(number):]
    try:
        value = float(number) * _BYTE_UNITS[unit]
    except (KeyError, ValueError):
        raise UserError(f"{what} {text!r} is not a size: write bytes (40e9) or a number with "
                        "a unit (80GB, 80GiB, 512MiB)") from None
    if not value > 0 or value == float("inf"):
        raise UserError(f"{what} must be a positive size, got {text!r}")
    return value


def format_bytes(value: float) -> str:
    """80e9 -> '80 GB', 1.5e6 -> '1.5 MB': decimal units, three significant digits."""
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(value) >= size:
            return f"{value / size:.3g} {unit}"
    return f"{value:.0f} B"
