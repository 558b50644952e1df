"""Chinchilla's three ways to find the compute-optimal frontier from a table of runs (§3.1-3.3).

1. The envelope (§3.1): the runs with the lowest loss for their FLOPs, and power laws
   N_opt = k C^a, D_opt = k' C^b through them. From a sweep's training curves (`curves.py`) as
   the paper did it, or from a table's final losses.
2. IsoFLOP profiles (§3.2): runs with the same budget, a parabola of loss in log N through each
   profile, its vertex the N_opt of that budget, and power laws through the vertices.
3. The parametric loss (§3.3, Appendix D.2): `parametric.fit_parametric`.

Chinchilla's approach 1 reads the envelope off whole training curves, which a sweep directory
has (`curve_envelope_fit`). A table of final losses has one point per run, so there a run is on
the envelope when no run with fewer or equal FLOPs has a lower loss (`envelope_fit`). An
approach whose runs do not have the structure it needs (too few envelope points, no IsoFLOP
profiles) is reported as skipped, with the reason, instead of failing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from burrow.errors import UserError
from burrow.scaling.curves import GRID_POINTS, SMOOTH_STEPS, Curve, Envelope, lower_envelope
from burrow.scaling.laws import CHINCHILLA_PAPER, ScalingLaw
from burrow.scaling.parametric import ParametricFit, fit_parametric
from burrow.scaling.points import Points

ISOFLOP_TOLERANCE = 0.05  # runs within ±5% of a profile's budget belong to it
MIN_PROFILE_SIZES = 3  # a parabola needs three model sizes
MIN_ENVELOPE = 3


@dataclass
class Profile:
    """Runs at one budget (C within the tolerance) and the parabola loss = c2 x² + c1 x + c0
    in x = ln N through them; `reason` says why a profile gives no N_opt (None if it does)."""

    flops: float
    N: np.ndarray
    loss: np.ndarray
    coef: list[float] | None = None
    n_opt: float | None = None
    loss_opt: float | None = None
    reason: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"flops": self.flops, "N": self.N.tolist(), "loss": self.loss.tolist(),
                "coef": self.coef, "n_opt": self.n_opt, "loss_opt": self.loss_opt,
                "reason": self.reason}


@dataclass
class FrontierFit:
    """Approach 1 or 2: N_opt = n_coef C^a and D_opt = d_coef C^b through optimal points."""

    approach: int
    # The compute-optimal points the power laws go through: C, N_opt, D_opt.
    C: np.ndarray
    N: np.ndarray
    D: np.ndarray
    a: float | None = None
    b: float | None = None
    n_coef: float | None = None
    d_coef: float | None = None
    # Why the approach could not be applied to these runs; None when it was.
    skipped: str | None = None
    profiles: list[Profile] = field(default_factory=list)
    # Approach 1 from training curves: their lower envelope (None: from final losses).
    envelope: Envelope | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"approach": self.approach, "skipped": self.skipped, "a": self.a,
                               "b": self.b, "n_coef": self.n_coef, "d_coef": self.d_coef,
                               "C": self.C.tolist(), "N": self.N.tolist(), "D": self.D.tolist()}
        if self.approach == 2:
            out["profiles"] = [profile.to_dict() for profile in self.profiles]
        if self.approach == 1:
            out["from"] = "final losses" if self.envelope is None else "training curves"
        if self.envelope is not None:
            out["envelope"] = {"runs": len(self.envelope.curves),
                               "sizes": len({curve.N for curve in self.envelope.curves}),
                               "grid_points": len(self.envelope.C),
                               "smooth_steps": self.envelope.window}
        return out


def _power_law(flops: np.ndarray, values: np.ndarray) -> tuple[float, float]:
    """(exponent, coefficient) of the least-squares line log values = exponent log C + log k."""
    slope, intercept = np.polyfit(np.log(flops), np.log(values), 1)
    return float(slope), math.exp(intercept)


def _frontier(approach: int, flops: np.ndarray, n_opt: np.ndarray,
              profiles: list[Profile] | None = None) -> FrontierFit:
    d_opt = flops / (6.0 * n_opt)
    a, n_coef = _power_law(flops, n_opt)
    b, d_coef = _power_law(flops, d_opt)
    return FrontierFit(approach, flops, n_opt, d_opt, a=a, b=b, n_coef=n_coef, d_coef=d_coef,
                       profiles=profiles or [])


def envelope_points(points: Points, rtol: float = 1e-6) -> np.ndarray:
    """Indices of the runs, by FLOPs, that no run with fewer or equal FLOPs beats on loss.

    Budgets within `rtol` count as equal (6ND of a sweep's runs differs by rounding only), so
    of the runs at one budget only the lowest loss is on the envelope.
    """
    order = np.argsort(points.C, kind="stable")
    flops, loss = points.C[order], points.loss[order]
    best_so_far = np.minimum.accumulate(loss)
    same_budget_end = np.searchsorted(flops, flops * (1 + rtol), side="right") - 1
    beats_all_before = loss < np.r_[np.inf, best_so_far[:-1]]
    lowest_at_budget = loss <= best_so_far[same_budget_end]
    return order[beats_all_before & lowest_at_budget]


def envelope_fit(points: Points) -> FrontierFit:
    """Approach 1 (§3.1): power laws through the minimum-loss-per-FLOP runs."""
    keep = envelope_points(points)
    if len(keep) < MIN_ENVELOPE:
        empty = np.empty(0)
        return FrontierFit(1, empty, empty, empty,
                           skipped=f"{len(keep)} run(s) on the loss-per-FLOP envelope; "
                                   f"approach 1 needs {MIN_ENVELOPE} at different budgets")
    return _frontier(1, points.C[keep], points.N[keep])


def curve_envelope_fit(curves: list[Curve], grid_points: int = GRID_POINTS,
                       smooth_steps: float = SMOOTH_STEPS) -> FrontierFit:
    """Approach 1 as §3.1 did it: power laws through the lower envelope of the smoothed curves.

    The power laws go through the stretch of the envelope after the smallest model's last win
    and before the largest model's first: where the smallest model wins, the envelope says only
    that N_opt is at most that size, and below that FLOP count the winners are early, unfinished
    steps of runs; past the largest model's first win, likewise. Those flat ends would pull the
    slope towards 0 (approach 2 likewise drops a parabola whose minimum lies outside the sizes
    tried).
    """
    envelope = lower_envelope(curves, grid_points, smooth_steps)
    sizes = np.array([curve.N for curve in curves])
    winner = envelope.N  # the size that wins at each FLOP value
    index = np.arange(len(winner))
    smallest_wins = index[winner == sizes.min()]
    start = smallest_wins[-1] + 1 if smallest_wins.size else 0
    largest_wins = index[(winner == sizes.max()) & (index >= start)]
    stop = largest_wins[0] if largest_wins.size else len(winner)
    inside = envelope.covered & (index >= start) & (index < stop)
    winners = np.unique(winner[inside])
    if len(winners) < 2:
        empty = np.empty(0)
        return FrontierFit(1, empty, empty, empty, envelope=envelope,
                           skipped=f"{len(winners)} model size(s) win the envelope of "
                                   f"{len(curves)} training curves ({len(np.unique(sizes))} "
                                   "sizes) between the smallest size's last win and the "
                                   "largest's first; approach 1 needs 2")
    fit = _frontier(1, envelope.C[inside], envelope.N[inside])
    fit.envelope = envelope
    return fit


def isoflop_profiles(points: Points, tolerance: float = ISOFLOP_TOLERANCE,
                     min_sizes: int = MIN_PROFILE_SIZES) -> list[Profile]:
    """Group runs into IsoFLOP profiles, largest first, then fit each profile's parabola.

    The budget with the most runs within ±tolerance becomes a profile and its runs leave the
    pool; this repeats while a budget has `min_sizes` runs (of as many sizes). Sweeps give exact
    budgets; runs read off a figure (Epoch's copy of Chinchilla's) scatter by a few percent.
    """
    width = math.log1p(tolerance)
    pool = np.argsort(points.C)
    profiles = []
    while pool.size:
        log_c = np.log(points.C[pool])
        low = np.searchsorted(log_c, log_c - width, side="left")
        high = np.searchsorted(log_c, log_c + width, side="right")
        center = int(np.argmax(high - low))
        members = pool[low[center]:high[center]]
        if len(members) < min_sizes:
            break
        if len(np.unique(points.N[members])) >= min_sizes:
            profiles.append(_parabola(points, members))
        pool = np.concatenate([pool[:low[center]], pool[high[center]:]])
    return sorted(profiles, key=lambda profile: profile.flops)


def _parabola(points: Points, members: np.ndarray) -> Profile:
    """A profile and its vertex, when the parabola is convex and its vertex among the sizes."""
    n_params, loss = points.N[members], points.loss[members]
    order = np.argsort(n_params)
    profile = Profile(float(np.exp(np.log(points.C[members]).mean())), n_params[order],
                      loss[order])
    x = np.log(profile.N)
    c2, c1, c0 = np.polyfit(x, profile.loss, 2)
    profile.coef = [float(c2), float(c1), float(c0)]
    if c2 <= 0:
        profile.reason = "loss is not convex in log N: no minimum"
        return profile
    vertex = -c1 / (2.0 * c2)
    if not x[0] <= vertex <= x[-1]:
        profile.reason = (f"the minimum lies outside the sizes tried ({profile.N[0]:.3g} to "
                          f"{profile.N[-1]:.3g} parameters)")
        return profile
    profile.n_opt = float(np.exp(vertex))
    profile.loss_opt = float(c0 - c1 * c1 / (4.0 * c2))
    return profile


def isoflop_fit(points: Points, tolerance: float = ISOFLOP_TOLERANCE,
                min_sizes: int = MIN_PROFILE_SIZES) -> FrontierFit:
    """Approach 2 (§3.2): power laws through the vertices of the IsoFLOP parabolas."""
    if min_sizes < 3:
        raise UserError(f"an IsoFLOP parabola needs at least 3 model sizes, got {min_sizes}")
    profiles = isoflop_profiles(points, tolerance, min_sizes)
    usable = [profile for profile in profiles if profile.reason is None]
    if len(usable) < 2:
        empty = np.empty(0)
        return FrontierFit(2, empty, empty, empty, profiles=profiles,
                           skipped=f"{len(usable)} IsoFLOP profile(s) with a minimum; approach 2 "
                                   f"needs 2 budgets, each with runs of {min_sizes}+ "
                                   f"sizes whose FLOPs agree within {tolerance:.0%}")
    flops = np.array([profile.flops for profile in usable])
    n_opt = np.array([profile.n_opt for profile in usable])
    return _frontier(2, flops, n_opt, profiles)


@dataclass
class FitReport:
    """The three approaches on one table of runs."""

    source: str
    n_points: int
    approach1: FrontierFit
    approach2: FrontierFit
    approach3: ParametricFit

    def to_dict(self) -> dict[str, Any]:
        """JSON-able: every number of every approach."""
        return {"source": self.source, "n_points": self.n_points,
                "approach1": self.approach1.to_dict(), "approach2": self.approach2.to_dict(),
                "approach3": self.approach3.to_dict()}

    def law(self, name: str = "fitted") -> ScalingLaw:
        """Approach 3's law with its bootstrap intervals: what `burrow plan --law` reads."""
        source = (f"burrow fit of {self.source} ({self.n_points} runs): {CHINCHILLA_PAPER}, "
                  "approach 3 (§3.3, Appendix D.2)")
        law = self.approach3.law(name, source)
        others = [f"approach {fit.approach} a = {fit.a:.3f}"
                  for fit in (self.approach1, self.approach2) if fit.skipped is None]
        if not others:
            return law
        return ScalingLaw.from_dict({**law.to_dict(), "note": f"{law.note} On the same runs "
                                     f"{' and '.join(others)}; approach 3 a = "
                                     f"{law.exponents()[0]:.3f}."})


def fit_all(points: Points, *, bootstrap: int = 200, level: float = 0.8, seed: int = 0,
            tolerance: float = ISOFLOP_TOLERANCE, min_sizes: int = MIN_PROFILE_SIZES,
            curves: list[Curve] | None = None,
            smooth_steps: float = SMOOTH_STEPS) -> FitReport:
    """Chinchilla's approaches 1, 2 and 3 on `points`.

    `bootstrap` resamples give approach 3's intervals at `level` (0.8: 10th-90th percentiles,
    as Chinchilla's Table 2); `tolerance` and `min_sizes` say which runs form an IsoFLOP
    profile (budgets within ±tolerance, at least min_sizes model sizes). With the runs'
    training `curves`, approach 1 is their envelope (smoothed over `smooth_steps` steps);
    without, the envelope of the final losses.
    """
    approach1 = (envelope_fit(points) if curves is None
                 else curve_envelope_fit(curves, smooth_steps=smooth_steps))
    return FitReport(source=points.source, n_points=len(points),
                     approach1=approach1,
                     approach2=isoflop_fit(points, tolerance, min_sizes),
                     approach3=fit_parametric(points, bootstrap=bootstrap, level=level,
                                              seed=seed))
