"""Chinchilla's approach-3 fit: burrow's batched L-BFGS against a loop of scipy's L-BFGS-B.

The same data (Epoch AI's 240 runs read off Chinchilla's Figure 4, the 5 highest losses dropped),
the same objective (the summed Huber loss, delta 1e-3, of log-loss residuals in the log-sum-exp
form of Hoffmann et al. 2022, Appendix D.2), the same starts (the appendix's grid of 4,500) and
the same stopping tests (scipy's defaults). burrow runs all starts as one batch; the rival runs
scipy.optimize.minimize(method="L-BFGS-B") once per start, as Epoch AI's replication does, given
the analytic gradient too (jac=True) to be fair. Rounds alternate ours, theirs, ... after a
warm-up; the JSON reports seconds per fit (median, min, max), the speed-up theirs/ours per pair
of rounds, and the best objective each reached, which must agree.

    .venv/bin/python bench/chinchilla_fit.py                # 3 rounds of the full grid
    .venv/bin/python bench/chinchilla_fit.py --starts 300   # a subset of the grid
    .venv/bin/python bench/chinchilla_fit.py --quick        # seconds: checks the script runs
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

import numpy as np
import torch
from harness import (
    common_parser,
    emit,
    log,
    machine,
    run_main,
    set_threads,
    summary,
    warn_if_busy,
)

from burrow import UserError
from burrow.scaling import lbfgs
from burrow.scaling.parametric import HUBER_DELTA, HuberLSE, grid_starts
from burrow.scaling.points import load_points

RUNS = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "tests", "data",
                    "chinchilla", "svg_extracted_data.csv")
EPOCH_OBJECTIVE = 0.001018274034615  # Epoch's best over the same grid (published.json)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], parents=[
        common_parser("rounds", "threads", "quick",
                      quick="1 round of 60 starts: checks the script runs")])
    parser.set_defaults(rounds=3)  # the fit itself is numpy: --threads is only recorded
    parser.add_argument("--starts", type=int, default=4500,
                        help="grid starts per fit (a subset spread evenly over the 4,500)")
    if parser.parse_args().quick:  # new defaults; options given explicitly still win
        parser.set_defaults(rounds=1, starts=60)
    args = parser.parse_args()
    if args.rounds < 1 or not 1 <= args.starts <= 4500:
        raise UserError("--rounds must be >= 1 and --starts between 1 and 4500")
    return args


def scipy_objective(log_n: np.ndarray, log_d: np.ndarray, log_loss: np.ndarray):
    """The objective and its gradient for one start, in plain numpy: what a scipy user writes."""

    def objective(theta: np.ndarray) -> tuple[float, np.ndarray]:
        a, b, e, alpha, beta = theta
        terms = np.stack([a - alpha * log_n, b - beta * log_d, np.full_like(log_n, e)])
        peak = terms.max(axis=0)
        weights = np.exp(terms - peak)
        total = weights.sum(axis=0)
        residual = peak + np.log(total) - log_loss
        clipped = np.clip(residual, -HUBER_DELTA, HUBER_DELTA)
        value = np.sum(0.5 * clipped**2 + HUBER_DELTA * (np.abs(residual) - np.abs(clipped)))
        weights *= clipped / total
        grad = np.array([weights[0].sum(), weights[1].sum(), weights[2].sum(),
                         -(weights[0] @ log_n), -(weights[1] @ log_d)])
        return float(value), grad

    return objective


def ours(objective: HuberLSE, starts: np.ndarray) -> dict[str, Any]:
    began = time.perf_counter()
    result = lbfgs.minimize(objective, starts)
    seconds = time.perf_counter() - began
    return {"seconds": seconds, "f": result.f, "converged": int(result.converged.sum()),
            "iterations": int(result.iterations.sum())}


def theirs(objective, starts: np.ndarray) -> dict[str, Any]:
    from scipy.optimize import minimize

    began = time.perf_counter()
    results = [minimize(objective, start, jac=True, method="L-BFGS-B") for start in starts]
    seconds = time.perf_counter() - began
    return {"seconds": seconds, "f": np.array([r.fun for r in results]),
            "converged": sum(bool(r.success) for r in results),
            "iterations": sum(int(r.nit) for r in results)}


def describe(fits: list[dict[str, Any]]) -> dict[str, Any]:
    """Seconds over rounds, and the last round's best objective and counts."""
    last = fits[-1]
    best = float(np.nanmin(last["f"]))
    return {"seconds": summary([fit["seconds"] for fit in fits]), "best_objective": best,
            "starts_at_best": int(np.sum(last["f"] <= best * (1 + 1e-6))),
            "converged": last["converged"], "iterations": last["iterations"]}


def main() -> None:
    args = parse_args()
    set_threads(args.threads)
    warn_if_busy()
    try:
        import scipy
    except ImportError:
        log("error: the rival is scipy: pip install 'burrow-lm[dev]'")
        raise SystemExit(2) from None
    points = load_points(RUNS, drop_highest=5)
    starts = grid_starts()[np.linspace(0, 4499, args.starts).round().astype(int)]
    batched = HuberLSE(points)
    single = scipy_objective(np.log(points.N), np.log(points.D), np.log(points.loss))
    probe = starts[len(starts) // 2]
    assert np.isclose(single(probe)[0], batched(probe[None], np.arange(1))[0][0], rtol=1e-12)
    log(f"chinchilla_fit: {len(points)} runs, {len(starts)} starts; warm-up on 20 starts")
    ours(batched, starts[:20])
    theirs(single, starts[:20])
    our_fits, their_fits = [], []
    for round_index in range(args.rounds):
        our_fits.append(ours(batched, starts))
        their_fits.append(theirs(single, starts))
        log(f"  round {round_index + 1}/{args.rounds}: ours {our_fits[-1]['seconds']:.2f} s  "
            f"scipy {their_fits[-1]['seconds']:.2f} s  "
            f"speed-up {their_fits[-1]['seconds'] / our_fits[-1]['seconds']:.1f}x")
    speedups = [t["seconds"] / o["seconds"] for o, t in zip(our_fits, their_fits)]
    our_best, their_best = (float(np.nanmin(fits[-1]["f"])) for fits in (our_fits, their_fits))
    emit({
        "benchmark": "chinchilla_fit",
        "machine": machine(torch.device("cpu")),
        "settings": {"runs": len(points), "starts": len(starts), "rounds": args.rounds,
                     "quick": args.quick, "huber_delta": HUBER_DELTA,
                     "stopping": "ftol 2.22e-9, gtol 1e-5 (scipy L-BFGS-B defaults), history 10",
                     "scipy": scipy.__version__, "numpy": np.__version__,
                     "rival": "scipy.optimize.minimize(method='L-BFGS-B', jac=True), one call "
                              "per start"},
        "checks": {"best_objective": {"ours": our_best, "scipy": their_best,
                                      "agree": bool(np.isclose(our_best, their_best, rtol=1e-6)),
                                      "epoch_published": EPOCH_OBJECTIVE}},
        "results": [{"label": "chinchilla fit vs scipy", "target": None,
                     "ours": describe(our_fits), "scipy": describe(their_fits),
                     "ratio": summary(speedups)}],
    })


if __name__ == "__main__":
    run_main(main)
