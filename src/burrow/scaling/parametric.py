"""Chinchilla's approach 3: fit L(N, D) = E + A/N^alpha + B/D^beta to every run (§3.3, App. D.2).

Appendix D.2 fits the log-sum-exp form log L = LSE(a - alpha log N, b - beta log D, e), with
A, B, E = exp(a), exp(b), exp(e), by minimising the summed Huber loss (delta = 1e-3) of the
log-loss residuals with L-BFGS, from a grid of 4,500 initialisations, keeping the best end
point. All 4,500 starts run as one batch (`lbfgs.minimize`); the objective and its analytic
gradient are evaluated for a block of starts at a time, so that the (starts x runs) arrays stay
in the CPU cache.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from burrow.errors import UserError
from burrow.scaling import lbfgs
from burrow.scaling.laws import CHINCHILLA_PAPER, ScalingLaw
from burrow.scaling.points import MIN_POINTS, Points

HUBER_DELTA = 1e-3  # Appendix D.2: "We use delta = 10^-3 for the Huber loss"
# Appendix D.2's grid of initialisations, 6 x 6 x 5 x 5 x 5 = 4,500 starts.
GRID = {"a": (0.0, 5.0, 10.0, 15.0, 20.0, 25.0), "b": (0.0, 5.0, 10.0, 15.0, 20.0, 25.0),
        "e": (-1.0, -0.5, 0.0, 0.5, 1.0), "alpha": (0.0, 0.5, 1.0, 1.5, 2.0),
        "beta": (0.0, 0.5, 1.0, 1.5, 2.0)}
PARAMS = ("a", "b", "e", "alpha", "beta")  # the order of the columns of a start
# Stopping tests for refits that start near the answer: scipy's ftol compares the decrease of f
# with max(|f|, 1), and a summed Huber loss near 1e-3 passes it long before the minimum.
POLISH = {"ftol": 0.0, "gtol": 1e-10}
_BLOCK_ELEMENTS = 32768  # starts x runs evaluated at once: ~0.25 MB per array, fits in L2


def grid_starts() -> np.ndarray:
    """The (4500, 5) initialisations of Appendix D.2, columns (a, b, e, alpha, beta)."""
    return np.array(list(itertools.product(*(GRID[name] for name in PARAMS))))


class HuberLSE:
    """Sum over runs of Huber_delta(LSE(a - alpha log N, b - beta log D, e) - log L), per start.

    Called as fun(theta, rows) -> (f, grad) for theta (k, 5); `weights` (groups x runs) weighs
    each run's term (bootstrap counts), and `groups[rows]` says which row of weights a start uses.
    """

    def __init__(self, points: Points, *, delta: float = HUBER_DELTA,
                 weights: np.ndarray | None = None, groups: np.ndarray | None = None) -> None:
        self.log_n, self.log_d = np.log(points.N), np.log(points.D)
        self.log_loss = np.log(points.loss)
        self.delta = delta
        self.weights, self.groups = weights, groups
        # d(a - alpha log N)/d(a, alpha) and the same for (b, beta): one matmul each.
        self.n_jacobian = np.stack([np.ones_like(self.log_n), -self.log_n], axis=1)
        self.d_jacobian = np.stack([np.ones_like(self.log_d), -self.log_d], axis=1)

    def __call__(self, theta: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        block = max(1, _BLOCK_ELEMENTS // len(self.log_loss))
        # A trial step of the line search may overflow; it then gets f = inf and is refused.
        with np.errstate(over="ignore", invalid="ignore"):
            parts = [self._block(theta[i:i + block], rows[i:i + block])
                     for i in range(0, len(theta), block)]
        return np.concatenate([f for f, _ in parts]), np.concatenate([g for _, g in parts])

    def _block(self, theta: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        a, b, e, alpha, beta = (column[:, None] for column in theta.T)
        model_term = a - alpha * self.log_n  # (k, runs)
        data_term = b - beta * self.log_d
        peak = np.maximum(np.maximum(model_term, data_term), e)  # LSE without overflow
        model_term -= peak
        data_term -= peak
        weight_n = np.exp(model_term, out=model_term)  # exp(u - peak): softmax numerators
        weight_d = np.exp(data_term, out=data_term)
        weight_e = np.exp(e - peak)
        total = weight_n + weight_d
        total += weight_e
        residual = np.log(total)
        residual += peak
        residual -= self.log_loss
        # Huber_delta(r) = c^2/2 + delta (|r| - |c|) with c = clip(r, -delta, delta).
        clipped = np.clip(residual, -self.delta, self.delta, out=peak)
        huber = 0.5 * clipped * clipped
        huber += self.delta * (np.abs(residual) - np.abs(clipped))
        if self.weights is not None:
            w = self.weights[self.groups[rows]]
            huber *= w
            clipped *= w
        clipped /= total  # dHuber/dr times d LSE/du_j = clip(r) * softmax_j
        weight_n *= clipped
        weight_d *= clipped
        weight_e *= clipped
        grad_a_alpha = weight_n @ self.n_jacobian
        grad_b_beta = weight_d @ self.d_jacobian
        grad = np.column_stack([grad_a_alpha[:, 0], grad_b_beta[:, 0], weight_e.sum(axis=1),
                                grad_a_alpha[:, 1], grad_b_beta[:, 1]])
        return huber.sum(axis=1), grad


@dataclass
class ParametricFit:
    """Approach 3's best fit, how it was found, and bootstrap intervals of its constants."""

    E: float
    A: float
    B: float
    alpha: float
    beta: float
    # Summed Huber loss at the fit (the objective of Appendix D.2).
    objective: float
    # The grid start that reached it, (a, b, e, alpha, beta).
    start: list[float]
    starts: int
    # Starts that stopped on scipy's tests (gradient or relative decrease), not a failure.
    converged: int
    # Wall-clock seconds of the whole fit, bootstrap included.
    seconds: float
    # Percentile intervals over bootstrap refits of a, b, E, A, B, alpha, beta; {} without.
    intervals: dict[str, list[float]] = field(default_factory=dict)
    level: float = 0.8
    resamples: int = 0

    def exponents(self) -> tuple[float, float]:
        """(a, b) of N_opt ∝ C^a, D_opt ∝ C^b (Chinchilla eq. 4)."""
        return self.beta / (self.alpha + self.beta), self.alpha / (self.alpha + self.beta)

    def law(self, name: str, source: str) -> ScalingLaw:
        """The fit as a law for `burrow plan`; UserError if it has no compute-optimal frontier."""
        if not (self.alpha > 0 and self.beta > 0):
            raise UserError(f"approach 3 found alpha = {self.alpha:.3g}, beta = {self.beta:.3g}: "
                            "in these runs the loss does not fall with both N and D, so they give "
                            "no compute-optimal frontier (fit runs of several sizes and budgets)")
        return ScalingLaw(name=name, source=source, E=self.E, A=self.A, B=self.B,
                          alpha=self.alpha, beta=self.beta, confidence=dict(self.intervals),
                          confidence_level=self.level if self.intervals else None,
                          note=f"Chinchilla approach 3 ({CHINCHILLA_PAPER}, App. D.2) fitted "
                               f"by burrow: Huber objective {self.objective:.6g}.")

    def to_dict(self) -> dict[str, Any]:
        a, b = self.exponents()
        return {"E": self.E, "A": self.A, "B": self.B, "alpha": self.alpha, "beta": self.beta,
                "a": a, "b": b, "objective": self.objective, "start": self.start,
                "starts": self.starts, "converged": self.converged, "seconds": self.seconds,
                "intervals": self.intervals, "level": self.level, "resamples": self.resamples}


def fit_parametric(points: Points, *, starts: np.ndarray | None = None,
                   delta: float = HUBER_DELTA, bootstrap: int = 200, level: float = 0.8,
                   seed: int = 0) -> ParametricFit:
    """Approach 3 on `points`: L-BFGS from every start (default the 4,500 of App. D.2) with
    scipy's stopping tests, the best end point by objective polished, then `bootstrap`
    resampled refits for the intervals (0: none)."""
    if len(points) < MIN_POINTS:
        raise UserError(f"{points.source or 'points'}: approach 3 fits 5 constants and needs at "
                        f"least {MIN_POINTS} runs, got {len(points)}")
    if not 0 < level < 1:
        raise UserError(f"the confidence level must be between 0 and 1, got {level}")
    if bootstrap < 0:
        raise UserError(f"the number of bootstrap resamples must be >= 0, got {bootstrap}")
    began = time.perf_counter()
    starts = grid_starts() if starts is None else np.asarray(starts, dtype=np.float64)
    objective = HuberLSE(points, delta=delta)
    result = lbfgs.minimize(objective, starts)
    best = int(np.nanargmin(result.f))
    # The best end point, polished, so that the answer does not hang on where ftol fired.
    polished = lbfgs.minimize(objective, result.x[best:best + 1], **POLISH)
    a, b, e, alpha, beta = polished.x[0]
    with np.errstate(over="ignore"):  # a degenerate fit may send A or B to infinity
        E, A, B = (float(value) for value in np.exp([e, a, b]))
    fit = ParametricFit(E=E, A=A, B=B, alpha=float(alpha),
                        beta=float(beta), objective=float(polished.f[0]),
                        start=starts[best].tolist(), starts=len(starts),
                        converged=int(result.converged.sum()), seconds=0.0, level=level)
    if bootstrap:
        fit.intervals = bootstrap_intervals(points, _distinct_best(result), resamples=bootstrap,
                                            level=level, seed=seed, delta=delta)
        fit.resamples = bootstrap
    fit.seconds = time.perf_counter() - began
    return fit


def _distinct_best(result: lbfgs.BatchResult, count: int = 8, tol: float = 1e-2) -> np.ndarray:
    """The `count` lowest-objective end points that differ from each other by more than tol."""
    chosen: list[np.ndarray] = []
    for index in np.argsort(result.f):
        if not np.isfinite(result.f[index]) or len(chosen) == count:
            break
        if all(np.abs(result.x[index] - other).max() > tol for other in chosen):
            chosen.append(result.x[index])
    return np.array(chosen)


def bootstrap_intervals(points: Points, starts: np.ndarray, *, resamples: int = 200,
                        level: float = 0.8, seed: int = 0,
                        delta: float = HUBER_DELTA) -> dict[str, list[float]]:
    """Percentile intervals of a, b, E, A, B, alpha, beta over refits to resampled runs.

    Each resample draws len(points) runs with replacement (seeded) and is refitted from
    `starts`, which fit_parametric takes to be the 8 best distinct end points of the full grid
    (the full-data optimum first): the full 4,500-start grid for each of hundreds of resamples
    would cost hundreds of full fits. All resamples x starts run as one L-BFGS batch. The
    default level 0.8 gives the 10th and 90th percentiles that Chinchilla's Table 2 reports
    (Chinchilla resampled 80% of its runs 100 times; this is the ordinary bootstrap).
    """
    rng = np.random.default_rng(seed)
    count = len(points)
    weights = np.zeros((resamples, count))
    np.add.at(weights, (np.arange(resamples)[:, None], rng.integers(0, count, (resamples, count))),
              1.0)
    groups = np.repeat(np.arange(resamples), len(starts))
    objective = HuberLSE(points, delta=delta, weights=weights, groups=groups)
    result = lbfgs.minimize(objective, np.tile(starts, (resamples, 1)), **POLISH)
    values = result.f.reshape(resamples, len(starts))
    best = result.x.reshape(resamples, len(starts), 5)[np.arange(resamples),
                                                       np.nanargmin(values, axis=1)]
    a, b, e, alpha, beta = best.T
    samples = {"a": beta / (alpha + beta), "b": alpha / (alpha + beta), "E": np.exp(e),
               "A": np.exp(a), "B": np.exp(b), "alpha": alpha, "beta": beta}
    tail = 50.0 * (1.0 - level)
    return {name: np.percentile(sample, [tail, 100.0 - tail]).tolist()
            for name, sample in samples.items()}
