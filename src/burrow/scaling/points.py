"""A table of training runs to fit scaling laws to: parameters N, tokens D and final loss.

`load_points` reads CSV (a header row) or JSON Lines (one object per run). Columns are found by
name, case-insensitively: N as `N`, `params`, `n_params`, `parameters` or `model size`; D as `D`,
`tokens` or `n_tokens`; the loss as `loss`. Where D is missing, FLOPs (`C`, `flops`,
`training flop`) give it as D = C / (6N), Chinchilla's budget C = 6ND. So Epoch AI's copy of the
Chinchilla runs (columns `Model Size`, `Training FLOP`, `loss`) reads as it is; any other names
are mapped with `columns={"N": "my params", "C": "my flops"}` (`--columns N="my params",...`).
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from burrow.errors import UserError

# Chinchilla's law has five constants (E, A, B, alpha, beta): fewer runs cannot pin them down.
MIN_POINTS = 5

_ALIASES: dict[str, tuple[str, ...]] = {
    "N": ("n", "params", "n_params", "parameters", "model size", "model_size"),
    "D": ("d", "tokens", "n_tokens", "training tokens"),
    "C": ("c", "flops", "training flop", "training flops", "training_flops"),
    "loss": ("loss", "final_loss"),
}
_MEANING = {"N": "parameters", "D": "tokens", "C": "training FLOPs", "loss": "final loss"}


@dataclass(frozen=True)
class Points:
    """Runs as parallel float64 arrays: parameters N, tokens D, final loss; C = 6ND."""

    N: np.ndarray
    D: np.ndarray
    loss: np.ndarray
    # Where the runs come from (a file name), for messages and reports.
    source: str = ""

    @property
    def C(self) -> np.ndarray:
        return 6.0 * self.N * self.D

    def __len__(self) -> int:
        return len(self.loss)

    def drop_highest(self, count: int) -> Points:
        """The runs without the `count` highest losses (Epoch AI drop 5 of Chinchilla's 245)."""
        if count < 0 or count >= len(self):
            raise UserError(f"{self.source or 'points'}: cannot drop {count} of {len(self)} runs")
        keep = np.sort(np.argsort(self.loss, kind="stable")[:len(self) - count])
        return Points(self.N[keep], self.D[keep], self.loss[keep], self.source)


def make_points(N, D, loss, *, source: str = "points",
                lines: list[int] | None = None) -> Points:
    """Points from sequences, checked: N, D and loss positive and finite.

    `lines` numbers the runs in messages (a file's line numbers); by default run 1, 2, ...
    """
    arrays = [np.asarray(values, dtype=np.float64).reshape(-1) for values in (N, D, loss)]
    if len({len(values) for values in arrays}) != 1:
        raise UserError(f"{source}: N, D and loss have different lengths "
                        f"({', '.join(str(len(v)) for v in arrays)})")
    for key, values in zip(("N", "D", "loss"), arrays):
        bad = np.flatnonzero(~np.isfinite(values) | (values <= 0))
        if bad.size:
            where = f"line {lines[bad[0]]}" if lines else f"run {bad[0] + 1}"
            raise UserError(f"{source}: {key} ({_MEANING[key]}) must be positive and finite; "
                            f"{bad.size} run(s) are not, the first at {where}: "
                            f"{key} = {values[bad[0]]}")
    return Points(*arrays, source=source)


def parse_columns(text: str) -> dict[str, str]:
    """`N=Model Size,C=Training FLOP` -> {"N": "Model Size", "C": "Training FLOP"}."""
    mapping: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, column = item.partition("=")
        canonical = {k.lower(): k for k in _ALIASES}.get(key.strip().lower())
        if not sep or canonical is None or not column.strip():
            raise UserError(f"--columns takes KEY=COLUMN pairs with KEY one of "
                            f"{', '.join(_ALIASES)}, got {item!r}")
        mapping[canonical] = column.strip().strip("'\"")
    return mapping


def load_points(path: str | Path, *, columns: dict[str, str] | None = None,
                drop_highest: int = 0) -> Points:
    """Runs from a CSV or JSON Lines file, checked, without the `drop_highest` worst losses."""
    path = Path(path)
    header, rows = _read_table(path)
    found = _resolve_columns(path, header, columns or {})
    values = {key: _numbers(path, rows, column, key) for key, column in found.items()}
    if "D" not in values:
        n_params = np.where(values["N"] > 0, values["N"], np.nan)
        values["D"] = values.pop("C") / (6.0 * n_params)
    points = make_points(values["N"], values["D"], values["loss"], source=str(path),
                         lines=[number for number, _ in rows])
    if drop_highest:
        points = points.drop_highest(drop_highest)
    if len(points) < MIN_POINTS:
        raise UserError(f"{path}: {len(points)} runs are too few to fit a scaling law; it has "
                        f"{MIN_POINTS} constants, so give at least {MIN_POINTS} runs")
    return points


def _read_table(path: Path) -> tuple[list[str], list[tuple[int, dict]]]:
    """Header and (line number, row) pairs of a CSV or JSON Lines file."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise UserError(f"runs file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"cannot read runs file {path}: {error}") from None
    if path.suffix.lower() in (".jsonl", ".ndjson"):
        rows = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise UserError(f"{path}:{number}: not valid JSON: {error}") from None
            if not isinstance(row, dict):
                raise UserError(f"{path}:{number}: each line must be a JSON object")
            rows.append((number, row))
        header = list(dict.fromkeys(key for _, row in rows for key in row))
        return header, rows
    reader = csv.DictReader(text.splitlines())
    header = [name.strip() for name in reader.fieldnames or []]
    if not header:
        raise UserError(f"{path} is empty: expected a CSV header such as N,D,loss")
    reader.fieldnames = header
    return header, [(number, row) for number, row in enumerate(reader, 2)]


def _resolve_columns(path: Path, header: list[str], columns: dict[str, str]) -> dict[str, str]:
    """The file's column name for N, loss, and D (or C where there is no D)."""
    lowered = {name.strip().lower(): name for name in header}
    found: dict[str, str] = {}
    for key, column in columns.items():
        if key not in _ALIASES:
            raise UserError(f"--columns key {key!r} is not one of {', '.join(_ALIASES)}")
        if column.strip().lower() not in lowered:
            raise UserError(f"{path} has no column {column!r} (given for {key}); its columns "
                            f"are {', '.join(header)}")
        found[key] = lowered[column.strip().lower()]
    for key, aliases in _ALIASES.items():
        if key not in found:
            match = next((lowered[alias] for alias in (key.lower(), *aliases) if alias in lowered),
                         None)
            if match is not None:
                found[key] = match
    if "D" in found:
        found.pop("C", None)
    missing = [key for key in ("N", "loss") if key not in found]
    if "D" not in found and "C" not in found:
        missing.append("D")
    if missing:
        wanted = ", ".join(f"{key} ({_MEANING[key]})" + (" or C (training FLOPs)" if key == "D"
                                                         else "") for key in missing)
        raise UserError(f"{path} has no column for {wanted}; its columns are "
                        f"{', '.join(header) or 'none'}; name them with --columns "
                        f"{missing[0]}=COLUMN")
    return found


def _numbers(path: Path, rows: list[tuple[int, dict]], column: str, key: str) -> np.ndarray:
    values = np.empty(len(rows))
    for i, (number, row) in enumerate(rows):
        raw = row.get(column)
        try:
            values[i] = float(raw)
        except (TypeError, ValueError):
            raise UserError(f"{path}:{number}: {key} (column {column!r}) is not a number: "
                            f"{raw!r}") from None
    return values

