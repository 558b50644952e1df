"""Training curves and their lower envelope: Chinchilla's approach 1 as the paper did it
(Hoffmann et al. 2022, §3.1 and Figure 2).

"For each run, we smooth and then interpolate the training loss curve. From this, we obtain a
continuous mapping from FLOP count to training loss for each run. Then, for each FLOP count, we
determine which run achieves the lowest loss." (§3.1). Here:

- a curve is a run's training-loss rows in metrics.jsonl: the step, the tokens trained so far
  and the loss, each row the trainer's mean over the steps since the previous row; its FLOPs are
  C = 6ND with N the run's N (`flops.matmul_params`, as the table and approaches 2-3 count it)
  and D the tokens trained so far. The training loss stands for the test loss because each
  token is new (footnote 2; a run that repeats its data breaks this);
- smoothing is Gaussian over a window of 10 steps (Appendix D.1, which gives only the window):
  the standard deviation a fifth of the window, cut off at the window's ends, the weights
  normalised over the rows inside it, as MATLAB's `smoothdata(..., "gaussian", window)` does; a
  row further than half a window from its neighbours (rows logged more than 5 steps apart) is
  already the mean of its steps and stays as it is;
- interpolation is linear in log C between a curve's rows, inside its own FLOP range;
- the envelope is read at 1500 log-spaced FLOP values between the smallest and the largest C
  of any row ("At 1500 logarithmically spaced FLOP values", §3.1): at each, the run with the
  lowest smoothed loss, its N, and D = C / (6N).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from burrow.errors import UserError

# §3.1: "At 1500 logarithmically spaced FLOP values".
GRID_POINTS = 1500
# Appendix D.1: "Gaussian smoothing with a window length of 10 steps".
SMOOTH_STEPS = 10


@dataclass(frozen=True)
class Curve:
    """One run's training curve: logged steps, tokens trained by each, training loss; N of
    C = 6ND."""

    name: str
    N: float
    steps: np.ndarray
    tokens: np.ndarray
    loss: np.ndarray

    @property
    def flops(self) -> np.ndarray:
        """C = 6ND at each logged step."""
        return 6.0 * self.N * self.tokens


def make_curve(name: str, N: float, steps, tokens, loss) -> Curve:
    """A curve, checked: whole increasing steps, tokens increasing and positive, loss finite."""
    steps, tokens, loss = (np.asarray(values, dtype=np.float64).reshape(-1)
                           for values in (steps, tokens, loss))
    if not (len(steps) == len(tokens) == len(loss) >= 1):
        raise UserError(f"run {name}: a training curve needs as many steps, tokens and losses, "
                        f"at least one each (got {len(steps)}, {len(tokens)}, {len(loss)})")
    if not (np.isfinite(N) and N > 0):
        raise UserError(f"run {name}: N must be positive, got {N}")
    if (np.any(steps != np.round(steps)) or np.any(np.diff(steps) <= 0)
            or np.any(np.diff(tokens) <= 0) or tokens[0] <= 0):
        raise UserError(f"run {name}: the curve's steps must be increasing whole numbers and its "
                        "tokens increasing and positive")
    if not np.all(np.isfinite(loss)):
        raise UserError(f"run {name}: the training loss is not finite at step "
                        f"{steps[~np.isfinite(loss)][0]:.0f}")
    return Curve(name, float(N), steps, tokens, loss)


def gaussian_smooth(steps: np.ndarray, values: np.ndarray,
                    window: float = SMOOTH_STEPS) -> np.ndarray:
    """Gaussian-weighted mean of `values` over `window` steps around each step (standard
    deviation window / 5, rows more than window / 2 steps away ignored, weights normalised over
    the rows inside, so the ends average fewer rows); window 0 returns the values unchanged.

    Steps are distinct whole numbers, so the rows within window / 2 steps of a row are within as
    many rows of it: the sum runs over that many offsets, not over every pair.
    """
    values = np.asarray(values, dtype=np.float64)
    if window <= 0:
        return values.copy()
    sigma, half = window / 5.0, window / 2.0
    total, weight = np.zeros_like(values), np.zeros_like(values)
    count = len(values)
    for offset in range(-int(half), int(half) + 1):
        rows = np.arange(max(0, -offset), min(count, count - offset))
        gap = steps[rows + offset] - steps[rows]
        w = np.exp(-0.5 * (gap / sigma) ** 2) * (np.abs(gap) <= half)
        total[rows] += w * values[rows + offset]
        weight[rows] += w
    return total / weight


@dataclass
class Envelope:
    """The lower envelope of the smoothed curves at log-spaced FLOP values C: the winning run
    (an index into `curves`), its smoothed loss there, its N and D = C / (6N). A C no curve
    reaches (a gap between runs) has run -1 and loss inf."""

    C: np.ndarray
    loss: np.ndarray
    run: np.ndarray
    curves: list[Curve]
    smoothed: list[np.ndarray]
    window: float

    @property
    def covered(self) -> np.ndarray:
        return self.run >= 0

    @property
    def N(self) -> np.ndarray:
        sizes = np.array([curve.N for curve in self.curves] + [np.nan])
        return sizes[self.run]

    @property
    def D(self) -> np.ndarray:
        return self.C / (6.0 * self.N)


def lower_envelope(curves: list[Curve], grid_points: int = GRID_POINTS,
                   window: float = SMOOTH_STEPS) -> Envelope:
    """Smooth each curve, interpolate it in log C, and take the lowest at each grid C."""
    if not curves:
        raise UserError("no training curves to build an envelope from")
    if grid_points < 2:
        raise UserError(f"the envelope needs at least 2 FLOP values, got {grid_points}")
    smoothed = [gaussian_smooth(curve.steps, curve.loss, window) for curve in curves]
    # geomspace puts the ends exactly on the smallest and largest C of any row.
    grid = np.geomspace(min(curve.flops[0] for curve in curves),
                        max(curve.flops[-1] for curve in curves), grid_points)
    table = np.full((len(curves), grid_points), np.inf)
    for i, (curve, loss) in enumerate(zip(curves, smoothed)):
        flops = curve.flops
        inside = (grid >= flops[0]) & (grid <= flops[-1])
        table[i, inside] = np.interp(np.log(grid[inside]), np.log(flops), loss)
    run = np.argmin(table, axis=0)
    lowest = table[run, np.arange(grid_points)]
    run[~np.isfinite(lowest)] = -1
    return Envelope(grid, lowest, run, list(curves), smoothed, window)


def sweep_curves(sweep_dir: str | Path) -> list[Curve] | None:
    """The training curves of a sweep directory's finished runs (those in results.jsonl), or
    None where the directory holds no sweep's runs (a table of final losses only)."""
    sweep_dir = Path(sweep_dir)
    table = sweep_dir / "results.jsonl"
    if not (table.is_file() and (sweep_dir / "runs").is_dir()):
        return None
    rows = [json.loads(line) for line in table.read_text().splitlines() if line.strip()]
    return [run_curve(sweep_dir / "runs" / row["name"], row) for row in rows]


def run_curve(run_dir: Path, result: dict[str, Any]) -> Curve:
    """The training-loss rows of run_dir/metrics.jsonl as a curve of N = result["N"]; where a
    step was logged twice (training went back to a checkpoint) the later row counts."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise UserError(f"{path} is missing: approach 1 reads every finished run's training "
                        "curve; rerun the sweep command to train that run again")
    by_step: dict[int, dict[str, Any]] = {}
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by a crash
            continue
        if row.get("split") == "train":
            by_step[int(row["step"])] = row
    steps = sorted(by_step)
    tokens_per_step = result["D"] / result["steps"]
    return make_curve(result["name"], result["N"], steps,
                      [by_step[s].get("tokens", s * tokens_per_step) for s in steps],
                      [by_step[s]["loss"] for s in steps])
