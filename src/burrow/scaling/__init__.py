"""Scaling laws, their fits (Chinchilla approaches 1-3) and compute-optimal planning.

Names are imported on first use (PEP 562), so that `burrow plan` loads neither numpy's fits nor
matplotlib's figures.
"""

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from burrow.scaling.curves import Curve, Envelope, lower_envelope, sweep_curves
    from burrow.scaling.figures import plot_fit
    from burrow.scaling.fit import (
        FitReport,
        FrontierFit,
        Profile,
        curve_envelope_fit,
        envelope_fit,
        fit_all,
        isoflop_fit,
    )
    from burrow.scaling.laws import BUILTIN_LAWS, ScalingLaw, get_law, law_names
    from burrow.scaling.parametric import ParametricFit, fit_parametric
    from burrow.scaling.points import Points, load_points, make_points, parse_columns

# name -> the module that defines it
_LAZY = {
    "plot_fit": "figures",
    **dict.fromkeys(("Curve", "Envelope", "lower_envelope", "sweep_curves"), "curves"),
    **dict.fromkeys(("FitReport", "FrontierFit", "Profile", "curve_envelope_fit", "envelope_fit",
                     "fit_all", "isoflop_fit"), "fit"),
    **dict.fromkeys(("BUILTIN_LAWS", "ScalingLaw", "get_law", "law_names"), "laws"),
    **dict.fromkeys(("ParametricFit", "fit_parametric"), "parametric"),
    **dict.fromkeys(("Points", "load_points", "make_points", "parse_columns"), "points"),
}

__all__ = ["BUILTIN_LAWS", "Curve", "Envelope", "FitReport", "FrontierFit", "ParametricFit",
           "Points", "Profile", "ScalingLaw", "curve_envelope_fit", "envelope_fit", "fit_all",
           "fit_parametric", "get_law", "isoflop_fit", "law_names", "load_points",
           "lower_envelope", "make_points", "parse_columns", "plot_fit", "sweep_curves"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"burrow.scaling.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'burrow.scaling' has no attribute {name!r}")
