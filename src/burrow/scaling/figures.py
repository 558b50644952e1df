"""The fit's figures, drawn like Chinchilla's Figures 2-3: IsoFLOP profiles and the frontier.

`isoflop.png`: loss against N for each IsoFLOP profile with its parabola and minimum (Figure 3,
left); without profiles, every run's loss against N coloured by its FLOPs. `frontier.png`:
N_opt(C) and D_opt(C) on log-log axes, the points approaches 1 and 2 were fitted through, the
three approaches' power laws and Chinchilla's published approach-3 law for reference (Figure 3,
centre and right). `envelope.png`, when approach 1 read training curves: every smoothed curve in
grey with the envelope over them, and the envelope's N and D against C with the fitted power laws
(Figure 2, left, centre and right). Files are written to a temporary name and renamed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from burrow.errors import UserError
from burrow.files import save_figure
from burrow.scaling.curves import Envelope
from burrow.scaling.fit import FitReport, FrontierFit
from burrow.scaling.laws import get_law
from burrow.scaling.points import Points

_APPROACH_STYLE = {1: ("tab:blue", "o"), 2: ("tab:orange", "s"), 3: ("tab:green", None)}


def plot_fit(report: FitReport, points: Points, out_dir: str | Path) -> list[Path]:
    """Write isoflop.png, frontier.png and, from training curves, envelope.png into out_dir;
    returns their paths."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [_isoflop(report, points, out_dir / "isoflop.png"),
             _frontier(report, points, out_dir / "frontier.png")]
    if report.approach1.envelope is not None:
        paths.append(_envelope(report.approach1, out_dir / "envelope.png"))
    return paths


def _save(figure, path: Path) -> Path:
    figure.tight_layout()
    return save_figure(figure, path)


def _isoflop(report: FitReport, points: Points, path: Path) -> Path:
    import matplotlib.pyplot as plt
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import LogNorm

    figure, axis = plt.subplots(figsize=(7.0, 4.6), dpi=110)
    profiles = report.approach2.profiles
    norm = LogNorm(points.C.min(), points.C.max())
    if not profiles:
        dots = axis.scatter(points.N, points.loss, c=points.C, norm=norm, cmap="viridis", s=14)
        figure.colorbar(dots, ax=axis, label="training FLOPs")
        axis.set_title("runs (no IsoFLOP profiles found)")
    else:
        axis.scatter(points.N, points.loss, color="0.8", s=8)
        colours = plt.get_cmap("viridis")
        for profile in profiles:
            colour = colours(norm(profile.flops))
            faded = profile.reason is not None
            axis.scatter(profile.N, profile.loss, color=colour, s=14, alpha=0.35 if faded else 1)
            x = np.linspace(np.log(profile.N[0]) - 0.2, np.log(profile.N[-1]) + 0.2, 100)
            axis.plot(np.exp(x), np.polyval(profile.coef, x), color=colour,
                      linestyle=":" if faded else "-", linewidth=1)
            if not faded:
                axis.plot(profile.n_opt, profile.loss_opt, "x", color="black", markersize=6)
        figure.colorbar(ScalarMappable(norm, colours), ax=axis, label="training FLOPs")
        axis.set_title("IsoFLOP profiles (x: minimum of each parabola; dotted: no minimum)",
                       fontsize=10)
    axis.set_xscale("log")
    axis.set_xlabel("parameters N")
    axis.set_ylabel("final loss")
    return _save(figure, path)


def _frontier(report: FitReport, points: Points, path: Path) -> Path:
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(12.0, 4.6), dpi=110)
    flops = np.logspace(np.log10(points.C.min()) - 0.5, np.log10(points.C.max()) + 1.0, 50)
    published = get_law("chinchilla")
    try:
        fitted = report.law()
    except UserError:  # approach 3 found no frontier (alpha or beta <= 0): nothing to draw
        fitted = None
    for panel, (axis, label) in enumerate(zip(axes, ("N_opt (parameters)", "D_opt (tokens)"))):
        for fit in (report.approach1, report.approach2):
            _plot_frontier(axis, fit, flops, panel)
        if fitted is not None:
            label = f"approach 3 ({'ab'[panel]} = {fitted.exponents()[panel]:.3f})"
            axis.plot(flops, [fitted.optimal(c)[panel] for c in flops],
                      color=_APPROACH_STYLE[3][0], label=label)
        axis.plot(flops, [published.optimal(c)[panel] for c in flops], "--", color="0.5",
                  label="Chinchilla approach 3 (published)")
        axis.set_xscale("log")
        axis.set_yscale("log")
        axis.set_xlabel("training FLOPs C")
        axis.set_ylabel(label)
        axis.legend(fontsize=8)
    figure.suptitle(f"compute-optimal frontier of {Path(report.source).name or 'the runs'} "
                    f"({report.n_points} runs)")
    return _save(figure, path)


def _plot_frontier(axis, fit: FrontierFit, flops: np.ndarray, panel: int) -> None:
    if fit.skipped is not None:
        return
    colour, marker = _APPROACH_STYLE[fit.approach]
    axis.scatter(fit.C, fit.N if panel == 0 else fit.D, color=colour, marker=marker,
                 s=14 if len(fit.C) < 100 else 3, alpha=0.7)
    coef, exponent = (fit.n_coef, fit.a) if panel == 0 else (fit.d_coef, fit.b)
    axis.plot(flops, coef * flops**exponent, color=colour,
              label=f"approach {fit.approach} (a = {fit.a:.3f})" if panel == 0
              else f"approach {fit.approach} (b = {fit.b:.3f})")


def _envelope(fit: FrontierFit, path: Path) -> Path:
    """Chinchilla's Figure 2: the curves and their envelope; N_opt(C) and D_opt(C) read off it."""
    import matplotlib.pyplot as plt

    envelope: Envelope = fit.envelope
    figure, axes = plt.subplots(1, 3, figsize=(15.0, 4.6), dpi=110)
    for curve, loss in zip(envelope.curves, envelope.smoothed):
        axes[0].plot(curve.flops, loss, color="0.75", linewidth=0.8)
    covered = envelope.covered
    axes[0].plot(envelope.C[covered], envelope.loss[covered], color="tab:blue", linewidth=2,
                 label="envelope: lowest smoothed loss per FLOP")
    axes[0].set_ylim(top=np.percentile(np.concatenate(envelope.smoothed), 95))
    axes[0].set_ylabel("smoothed training loss")
    axes[0].set_title(f"{len(envelope.curves)} training curves, smoothed over "
                      f"{envelope.window:g} steps", fontsize=10)
    axes[0].legend(fontsize=8)
    for panel, (axis, values, label) in enumerate(zip(axes[1:], (envelope.N, envelope.D),
                                                      ("N_opt (parameters)", "D_opt (tokens)"))):
        axis.scatter(envelope.C[covered], values[covered], color="0.75", s=3,
                     label="envelope, not fitted (the smallest or largest size's stretch)")
        if fit.skipped is None:
            axis.scatter(fit.C, fit.N if panel == 0 else fit.D, color="tab:blue", s=3,
                         label="envelope, fitted")
            coef, exponent = (fit.n_coef, fit.a) if panel == 0 else (fit.d_coef, fit.b)
            flops = np.geomspace(envelope.C[0], envelope.C[-1], 50)
            axis.plot(flops, coef * flops**exponent, color="black", linewidth=1,
                      label=f"{coef:.3g} C^{exponent:.3f}")
        axis.set_yscale("log")
        axis.set_ylabel(label)
        axis.legend(fontsize=8)
    for axis in axes:
        axis.set_xscale("log")
        axis.set_xlabel("training FLOPs C = 6ND")
    if fit.skipped is not None:
        figure.suptitle(f"approach 1 skipped: {fit.skipped}", fontsize=9)
    return _save(figure, path)
