"""Argument types of the command line: numbers that carry their range, and config fields checked
by their own config, so that a flag's value is refused as it is parsed (one line, exit status 2)
and help and tests can read each flag's range back."""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from typing import Any, get_type_hints

from burrow.config.fields import coerce
from burrow.errors import UserError


@dataclass(frozen=True)
class Number:
    """An argparse type: an int or a float in a range, kept here so that help and tests read it.

    Number(int, low=1) is a positive integer; Number(float, low=0, high=1, low_open=True) a
    fraction in (0, 1]. Floats must be finite; an int may be written 1e6.
    """

    kind: type
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    # Why the range is what it is, said in the error.
    why: str = ""

    def accepts(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        return self.high is None or value < self.high or (value == self.high
                                                         and not self.high_open)

    def describe(self) -> str:
        noun = "an integer" if self.kind is int else "a number"
        if self.high is not None:
            return (f"{noun} in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}"
                    f"{')' if self.high_open else ']'}")
        if (self.low == 0 and self.low_open) or (self.kind is int and self.low == 1):
            return f"a positive {noun.split()[-1]}"
        if self.low is not None:
            return f"{noun} {'>' if self.low_open else '>='} {self.low:g}"
        return noun

    def parse(self, text: str) -> int | float:
        """The number `text` spells, in range or not; ValueError if it spells none."""
        number = float(text)
        if self.kind is float:
            return number
        if not number.is_integer():
            raise ValueError(text)
        return int(text) if text.strip().lstrip("+-").isdigit() else int(number)

    def __call__(self, text: str) -> int | float:
        try:
            value = self.parse(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {self.describe()}, got {text!r}") from None
        if not self.accepts(value):
            why = f" ({self.why})" if self.why else ""
            raise argparse.ArgumentTypeError(f"expected {self.describe()}{why}, got {text}")
        return value


POSITIVE_INT = Number(int, low=1)
COUNT = Number(int, low=0)  # 0 allowed: seeds, how many to drop
POSITIVE = Number(float, low=0, low_open=True)
NON_NEGATIVE = Number(float, low=0)
FRACTION = Number(float, low=0, high=1, low_open=True)  # (0, 1]: top-p, MFU
HELD_OUT = Number(float, low=0, high=1, high_open=True)  # [0, 1): share held out, may be none


class ConfigField:
    """An argparse type for a config field's flag (--lr, --max-steps): the value is converted to
    the field's type and checked by the section's own validation, so that the flag's range is
    the config's and is said as the config says it."""

    def __init__(self, section: type, name: str, prefix: str):
        self.section, self.name, self.prefix = section, name, prefix
        self.hint = get_type_hints(section)[name]
        text = getattr(self.hint, "__name__", str(self.hint))
        self.kind = next((kind for kind in (bool, int, float) if text.startswith(kind.__name__)),
                         str)

    def accepts(self, value: Any) -> bool:
        try:
            self.section(**{self.name: value})
        except UserError:
            return False
        return not (isinstance(value, float) and not math.isfinite(value))

    def __call__(self, text: str) -> Any:
        try:
            value = coerce(text, self.hint, f"{self.prefix}.{self.name}")
            if isinstance(value, float) and not math.isfinite(value):
                raise UserError(f"{self.prefix}.{self.name} must be a finite number, got {text}")
            self.section(**{self.name: value})
        except UserError as error:
            raise argparse.ArgumentTypeError(str(error)) from None
        return value
