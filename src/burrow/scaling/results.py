"""A sweep's results: the table of finished runs, and the fit of Chinchilla's three approaches
(approach 1 on the runs' training curves) with its figures once the table has two IsoFLOP
profiles of three sizes each.

Everything is rewritten after each finished run, atomically (a temporary file renamed), so a
reader, or a sweep killed mid-write, never sees half a table.
"""

from __future__ import annotations

import csv
import io
import json
from collections import Counter
from pathlib import Path
from typing import Any

from burrow.errors import UserError
from burrow.files import write_text
from burrow.scaling.curves import SMOOTH_STEPS, sweep_curves
from burrow.scaling.fit import MIN_PROFILE_SIZES
from burrow.scaling.points import MIN_POINTS

COLUMNS = ("budget", "horizon", "name", "N", "D", "C", "loss", "train_loss", "steps",
           "seconds", "n_layers", "d_model", "n_heads", "total_params")
# Bootstrap resamples of the fit redone after every run: enough for rough intervals, cheap.
SWEEP_BOOTSTRAP = 50


def finished_rows(out: Path, runs: list) -> list[dict[str, Any]]:
    """result.json of each finished run, in the plan's order."""
    rows = []
    for run in runs:
        path = out / "runs" / run.name / "result.json"
        if path.is_file():
            rows.append(json.loads(path.read_text()))
    return rows


def write_table(out: Path, rows: list[dict[str, Any]]) -> None:
    """results.csv and results.jsonl: one line per finished run."""
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text(out / "results.csv", text.getvalue())
    write_text(out / "results.jsonl", "".join(json.dumps(row) + "\n" for row in rows))


def ready_to_fit(rows: list[dict[str, Any]]) -> bool:
    """Two budgets with MIN_PROFILE_SIZES finished sizes each (approach 2 needs two vertices)."""
    sizes = Counter(row["budget"] for row in rows)
    profiles = sum(count >= MIN_PROFILE_SIZES for count in sizes.values())
    return profiles >= 2 and len(rows) >= MIN_POINTS


def fit_and_plot(table: Path, out: Path, *, bootstrap: int, seed: int = 0,
                 columns: dict[str, str] | None = None, drop_highest: int = 0,
                 name: str = "fitted", curves: list | None = None,
                 smooth_steps: float = SMOOTH_STEPS) -> dict[str, Any]:
    """Fit the three approaches to the runs in `table` (approach 1 to their training `curves`
    when given); write fit.json, law.json and figures."""
    from burrow.scaling.fit import fit_all
    from burrow.scaling.points import load_points

    points = load_points(table, columns=columns, drop_highest=drop_highest)
    report = fit_all(points, bootstrap=bootstrap, seed=seed, curves=curves,
                     smooth_steps=smooth_steps)
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "fit.json", json.dumps(report.to_dict(), indent=1) + "\n")
    report.law(name).save(out / "law.json")
    figures = _figures(report, points, out)
    return {"report": report.to_dict(), "law": str(out / "law.json"),
            "fit": str(out / "fit.json"), "figures": [str(path) for path in figures]}


def _figures(report, points, out: Path) -> list[Path]:
    from burrow.scaling.figures import plot_fit

    return list(plot_fit(report, points, out))


def update_results(out: Path, runs: list) -> dict[str, Any]:
    """Rewrite the table, and the fit and figures when the runs allow it."""
    rows = finished_rows(out, runs)
    write_table(out, rows)
    result: dict[str, Any] = {"results": rows, "figures": []}
    if ready_to_fit(rows):
        try:
            fitted = fit_and_plot(out / "results.csv", out, bootstrap=SWEEP_BOOTSTRAP,
                                  curves=sweep_curves(out))
        except UserError as error:  # the runs so far fit badly: the sweep goes on regardless
            result["fit_error"] = str(error)
            return result
        result.update(fit=fitted["report"], figures=fitted["figures"])
    return result
