"""Scaling laws: how loss depends on parameters N and tokens D, and the compute-optimal N and D.

A law is data, like a preset. Parametric laws have Chinchilla's form (Hoffmann et al. 2022,
eq. 2)

    L(N, D) = E + A / N**alpha + B / D**beta,

whose minimum under the budget C = 6ND is the power law N_opt = G (C/6)**a with
G = (alpha A / (beta B))**(1/(alpha+beta)) and a = beta/(alpha+beta) (§3.3, eq. 4). Frontier
laws give only N_opt(C) = n_coef * C**a (approaches 1 and 2, Kaplan et al. 2020); they borrow a
parametric law (`loss_law`) to predict a loss. Every law spends the budget exactly:
D_opt = C / (6 N_opt), the C = 6ND of Kaplan et al. 2020, §2.1, which Chinchilla uses too.

`burrow fit` saves a law as JSON; `get_law` reads a built-in name or such a file.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from burrow.errors import UserError
from burrow.files import write_text

CHINCHILLA_PAPER = "Hoffmann et al. 2022, Training Compute-Optimal Large Language Models"
EPOCH_PAPER = ("Besiroglu, Erdil, Barnett, You 2024, Chinchilla Scaling: A replication attempt, "
               "arXiv:2404.10102")
KAPLAN_PAPER = "Kaplan et al. 2020, Scaling Laws for Neural Language Models"

GOPHER_FLOPS = 5.76e23  # Gopher's training budget (Chinchilla, Figure 2 caption and Table 3)
PF_DAY = 1e15 * 24 * 3600  # 8.64e19 FLOP: Kaplan et al.'s unit of compute (§1.3)

FORMS = ("chinchilla", "kaplan")
_PARAMETRIC = ("E", "A", "B", "alpha", "beta")
_KAPLAN = ("N_c", "D_c", "alpha_N", "alpha_D")


@dataclass(frozen=True)
class ScalingLaw:
    """A loss law and/or a compute-optimal frontier, with where its numbers come from."""

    # "chinchilla", "chinchilla-1", "chinchilla-2", "epoch", "kaplan", or a fitted law's name.
    name: str
    # Paper and section or table the numbers come from.
    source: str
    # Chinchilla's parametric form L = E + A/N^alpha + B/D^beta (eq. 2); None where there is none.
    E: float | None = None
    A: float | None = None
    B: float | None = None
    alpha: float | None = None
    beta: float | None = None
    # Frontier N_opt(C) = n_coef * C^a, for laws without a parametric form (derived otherwise).
    a: float | None = None
    n_coef: float | None = None
    # The built-in parametric law that predicts the loss where this law has no loss of its own.
    loss_law: str | None = None
    # One or two sentences a user should know before trusting the numbers.
    note: str = ""
    # Intervals [low, high] of fitted quantities ("a", "b", "E", ...), at `confidence_level`.
    confidence: dict[str, list[float]] = field(default_factory=dict)
    # Probability mass inside each interval of `confidence` (0.8: 10th to 90th percentile).
    confidence_level: float | None = None
    # Loss form: "chinchilla" (E, A, B, alpha, beta) or "kaplan" (N_c, D_c, alpha_N, alpha_D).
    form: str = "chinchilla"
    # Kaplan et al.'s L(N, D) = [(N_c/N)^(alpha_N/alpha_D) + D_c/D]^alpha_D (their eq. 1.5).
    N_c: float | None = None
    D_c: float | None = None
    alpha_N: float | None = None
    alpha_D: float | None = None

    def __post_init__(self) -> None:
        self.validate()

    @property
    def parametric(self) -> bool:
        """True when the law has Chinchilla's five constants, so N_opt follows from them."""
        return self.form == "chinchilla" and all(getattr(self, k) is not None for k in _PARAMETRIC)

    def validate(self) -> None:
        """Raise UserError naming what is missing or out of range."""
        if not self.name:
            raise UserError("a scaling law needs a name")
        if self.form not in FORMS:
            raise UserError(f"law {self.name!r}: form {self.form!r} is not one of "
                            f"{', '.join(FORMS)}")
        given = [k for k in _PARAMETRIC if getattr(self, k) is not None]
        if given and len(given) != len(_PARAMETRIC):
            missing = [k for k in _PARAMETRIC if getattr(self, k) is None]
            raise UserError(f"law {self.name!r}: has {', '.join(given)} but not "
                            f"{', '.join(missing)}; a parametric law needs all five")
        kaplan = [k for k in _KAPLAN if getattr(self, k) is not None]
        if self.form == "kaplan" and len(kaplan) != len(_KAPLAN):
            raise UserError(f"law {self.name!r}: form 'kaplan' needs {', '.join(_KAPLAN)}")
        if (self.a is None) != (self.n_coef is None):
            raise UserError(f"law {self.name!r}: a frontier needs both a and n_coef")
        if not self.parametric and self.a is None:
            raise UserError(f"law {self.name!r}: give E, A, B, alpha, beta or a and n_coef")
        for key in (*_PARAMETRIC, *_KAPLAN, "n_coef", "a"):
            value = getattr(self, key)
            # E, the loss no model size or data removes, may be 0: a fit whose exp(e) underflows
            # says the runs show no floor, which is a result, not a malformed law.
            if key == "E" and value == 0:
                continue
            if value is not None and not (math.isfinite(value) and value > 0):
                raise UserError(f"law {self.name!r}: {key} must be a positive number, got {value}")
        if self.a is not None and self.a >= 1:
            raise UserError(f"law {self.name!r}: a must be below 1 (D_opt must grow with C), "
                            f"got {self.a}")

    def exponents(self) -> tuple[float, float]:
        """(a, b) of N_opt ∝ C^a and D_opt ∝ C^b; a + b = 1 since D_opt = C / (6 N_opt).

        Parametric laws: a = beta/(alpha+beta), b = alpha/(alpha+beta) (Chinchilla, eq. 4).
        """
        if self.a is not None:
            return self.a, 1.0 - self.a
        return self.beta / (self.alpha + self.beta), self.alpha / (self.alpha + self.beta)

    def optimal(self, flops: float) -> tuple[float, float]:
        """(N_opt, D_opt) for a budget of `flops` training FLOPs, with 6 N_opt D_opt = flops."""
        if not (math.isfinite(flops) and flops > 0):
            raise UserError(f"the compute budget must be a positive number of FLOPs, got {flops}")
        if self.a is not None:
            n_opt = self.n_coef * flops**self.a
        else:
            # Chinchilla eq. 4: N_opt = G (C/6)^a, G = (alpha A / (beta B))^(1/(alpha+beta)).
            a, _ = self.exponents()
            g = (self.alpha * self.A / (self.beta * self.B)) ** (1.0 / (self.alpha + self.beta))
            n_opt = g * (flops / 6.0) ** a
        return n_opt, flops / (6.0 * n_opt)

    def loss(self, n_params: float, n_tokens: float) -> float | None:
        """Predicted loss of N parameters trained on D tokens; None if the law predicts none.

        Works elementwise on numpy arrays too.
        """
        if self.form == "kaplan":
            ratio = self.alpha_N / self.alpha_D
            return ((self.N_c / n_params) ** ratio + self.D_c / n_tokens) ** self.alpha_D
        if self.parametric:
            return self.E + self.A / n_params**self.alpha + self.B / n_tokens**self.beta
        if self.loss_law is not None:
            return get_law(self.loss_law).loss(n_params, n_tokens)
        return None

    def to_dict(self) -> dict[str, Any]:
        """JSON-able fields; None and empty ones left out."""
        return {key: value for key, value in dataclasses.asdict(self).items()
                if value is not None and value != {} and value != ""}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ScalingLaw:
        if not isinstance(raw, dict):
            raise UserError("a scaling law must be a JSON object")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - names)
        if unknown:
            raise UserError(f"unknown scaling-law field(s) {', '.join(unknown)}; "
                            f"known: {', '.join(sorted(names))}")
        values = dict(raw)
        for key in (*_PARAMETRIC, *_KAPLAN, "a", "n_coef", "confidence_level"):
            if values.get(key) is not None:
                try:
                    values[key] = float(values[key])
                except (TypeError, ValueError):
                    raise UserError(f"scaling-law field {key} must be a number, "
                                    f"got {values[key]!r}") from None
        values.setdefault("source", "")
        if "name" not in values:
            raise UserError("a scaling law needs a name")
        return cls(**values)

    def save(self, path: str | Path) -> None:
        """Write the law as JSON, atomically: a reader sees the old file or the whole new one."""
        write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> ScalingLaw:
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise UserError(f"law file {path} does not exist") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise UserError(f"law file {path} is not readable JSON: {error}") from None
        try:
            return cls.from_dict(raw)
        except UserError as error:
            raise UserError(f"law file {path}: {error}") from None


def _anchored(a: float, n_params: float, flops: float) -> float:
    """n_coef of the frontier N_opt = n_coef C^a that passes through (flops, n_params)."""
    return n_params / flops**a


BUILTIN_LAWS: dict[str, ScalingLaw] = {law.name: law for law in (
    ScalingLaw(
        name="chinchilla",
        source=f"{CHINCHILLA_PAPER}, approach 3, §3.3 and Appendix D.2 (the fitted L(N, D))",
        # Appendix D.2: L(N, D) = E + A/N^0.34 + B/D^0.28 with E = 1.69, A = 406.4, B = 410.7.
        E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28,
        note=("The paper's rounded constants give a = 0.452 and N_opt = 32B at Gopher's "
              "5.76e23 FLOPs; the unrounded fit behind Table 2 (a = 0.46) gives 40B (Figure 4). "
              "Approach 3 picks smaller models than approaches 1-2 (67B, 61B) at large budgets "
              "(§3.4)."),
    ),
    ScalingLaw(
        name="chinchilla-1",
        source=f"{CHINCHILLA_PAPER}, approach 1, §3.1, Table 2 (a = 0.50) and Table 3",
        # Table 3 (approach 1): a 67B model is compute-optimal at 5.76e23 FLOPs, Gopher's budget.
        a=0.50, n_coef=_anchored(0.50, 67e9, GOPHER_FLOPS),
        loss_law="chinchilla",
        note=("Minimum over training curves: N_opt = 67B at Gopher's budget (Table 3), Table 2 "
              "interval a in (0.488, 0.502). Loss predicted with the approach-3 law."),
    ),
    ScalingLaw(
        name="chinchilla-2",
        source=f"{CHINCHILLA_PAPER}, approach 2, §3.2, Table 2 (a = 0.49) and Table A3",
        # Table A3 (approach 2): a 67B model is compute-optimal at 6.88e23 FLOPs.
        a=0.49, n_coef=_anchored(0.49, 67e9, 6.88e23),
        loss_law="chinchilla",
        note=("IsoFLOP profiles: N_opt = 61B at Gopher's budget (Table A3's 67B at 6.88e23 "
              "FLOPs), Table 2 interval a in (0.462, 0.534). Loss predicted with the "
              "approach-3 law."),
    ),
    ScalingLaw(
        name="epoch",
        source=(f"{EPOCH_PAPER}, table of estimates (refit of Chinchilla's Figure 4 data, "
                "240 points); intervals: analyzing-chinchilla notebook @9225883, cells 24-26"),
        E=1.8172, A=482.01, B=2085.43, alpha=0.3478, beta=0.3658,
        # 95% bootstrap percentile intervals (4,000 resamples) from Epoch's notebook output.
        confidence={"E": [1.769, 1.871], "A": [285.214, 743.626], "B": [1042.357, 5810.344],
                    "alpha": [0.317, 0.373], "beta": [0.331, 0.415]},
        confidence_level=0.95,
        note=("Epoch AI refit Chinchilla's own runs (read off Figure 4) and found a = 0.513 "
              "(SE 0.02), close to approaches 1-2 and about 20 tokens per parameter; the "
              "paper's approach-3 constants do not fit those runs."),
    ),
    ScalingLaw(
        name="kaplan",
        source=(f"{KAPLAN_PAPER}, §6.1, Figure 14 and Table 6 (N_opt = 1.3e9 (C/PF-day)^0.73); "
                "L(N, D) from eq. 1.5 with the fit of Table 2"),
        a=0.73, n_coef=_anchored(0.73, 1.3e9, PF_DAY),
        form="kaplan",
        # Table 2, the fit of eq. 1.5 (their eq. 1.1-1.2 fit L(N) and L(D) alone: 8.8e13, 5.4e13,
        # 0.076, 0.095).
        N_c=6.4e13, D_c=1.8e13, alpha_N=0.076, alpha_D=0.103,
        note=("Kaplan's N excludes embeddings and his loss is in nats of GPT-2's BPE tokens on "
              "WebText2, so neither compares directly with Chinchilla's. He grows N much faster "
              "than D (0.73 vs 0.27), which Chinchilla found undertrains models."),
    ),
)}


def law_names() -> list[str]:
    """The built-in laws, default first."""
    return list(BUILTIN_LAWS)


def get_law(name_or_path: str) -> ScalingLaw:
    """A built-in law by name, or a law saved by `burrow fit` (a JSON file)."""
    if name_or_path in BUILTIN_LAWS:
        return BUILTIN_LAWS[name_or_path]
    path = Path(name_or_path)
    if path.is_file():
        return ScalingLaw.load(path)
    if path.suffix == ".json" or len(path.parts) > 1 or path.exists():
        what = "is not a file" if path.exists() else "does not exist"
        raise UserError(f"law file {path} {what}; give the law.json that `burrow fit` wrote, "
                        f"or a built-in law: {', '.join(law_names())}")
    raise UserError(f"unknown law {name_or_path!r}; choose one of {', '.join(law_names())} "
                    "or a fitted law's JSON file")
