"""Scaling laws: the published constants, the compute-optimal frontier, JSON round trips."""

import json
import math

import numpy as np
import pytest

from burrow import UserError
from burrow.scaling.laws import (
    BUILTIN_LAWS,
    GOPHER_FLOPS,
    PF_DAY,
    ScalingLaw,
    get_law,
    law_names,
)

BUDGETS = [1e18, 6e20, GOPHER_FLOPS, 1e26]


def test_law_names_start_with_the_default_and_cover_the_papers():
    assert law_names()[0] == "chinchilla"
    assert set(law_names()) == {"chinchilla", "chinchilla-1", "chinchilla-2", "epoch", "kaplan"}
    for law in BUILTIN_LAWS.values():
        assert law.source and law.note


def test_chinchilla_constants_and_exponents():
    law = get_law("chinchilla")
    # Appendix D.2: E = 1.69, A = 406.4, B = 410.7, alpha = 0.34, beta = 0.28.
    assert (law.E, law.A, law.B, law.alpha, law.beta) == (1.69, 406.4, 410.7, 0.34, 0.28)
    a, b = law.exponents()
    assert a == pytest.approx(0.28 / 0.62, rel=1e-15)
    assert b == pytest.approx(0.34 / 0.62, rel=1e-15)


@pytest.mark.parametrize("name", law_names())
@pytest.mark.parametrize("flops", BUDGETS)
def test_every_law_spends_the_budget_exactly(name, flops):
    n_opt, d_opt = get_law(name).optimal(flops)
    assert 6 * n_opt * d_opt == pytest.approx(flops, rel=1e-12)


@pytest.mark.parametrize("name", ["chinchilla", "epoch"])
@pytest.mark.parametrize("flops", BUDGETS)
def test_parametric_optimum_minimises_loss_along_the_isoflop_curve(name, flops):
    law = get_law(name)
    n_opt, _ = law.optimal(flops)
    n_grid = n_opt * np.logspace(-2, 2, 40001)  # a step of 0.023% in N
    losses = law.loss(n_grid, flops / (6 * n_grid))
    best = n_grid[np.argmin(losses)]
    assert best == pytest.approx(n_opt, rel=5e-4)
    assert law.loss(n_opt, flops / (6 * n_opt)) <= losses.min() + 1e-12


def test_optimum_follows_the_closed_form_power_law():
    law = get_law("epoch")
    a, _ = law.exponents()
    n1, _ = law.optimal(1e20)
    n2, _ = law.optimal(1e24)
    assert math.log(n2 / n1) / math.log(1e4) == pytest.approx(a, rel=1e-12)


def test_loss_is_the_formula():
    n, d = 70e9, 1.4e12
    assert get_law("chinchilla").loss(n, d) == pytest.approx(
        1.69 + 406.4 / n**0.34 + 410.7 / d**0.28, rel=1e-15)
    # Kaplan et al. 2020, eq. 1.5 with Table 2's fit.
    assert get_law("kaplan").loss(n, d) == pytest.approx(
        ((6.4e13 / n) ** (0.076 / 0.103) + 1.8e13 / d) ** 0.103, rel=1e-15)
    # Approaches 1 and 2 borrow approach 3's loss.
    assert get_law("chinchilla-1").loss(n, d) == get_law("chinchilla").loss(n, d)
    assert get_law("chinchilla-2").loss(n, d) == get_law("chinchilla").loss(n, d)
    # Chinchilla 70B on 1.4T tokens: about 1.94 nats with the published constants.
    assert get_law("chinchilla").loss(n, d) == pytest.approx(1.937, abs=1e-3)


def test_a_frontier_law_without_a_loss_law_predicts_none():
    law = ScalingLaw(name="bare", source="test", a=0.5, n_coef=0.1)
    assert law.loss(1e9, 2e10) is None


def test_approach_1_and_2_laws_match_the_papers_tables():
    # Table 3 (approach 1): 67B at Gopher's 5.76e23 FLOPs; 1B at 1.21e20, 10B at 1.23e22.
    approach1 = get_law("chinchilla-1")
    assert approach1.optimal(GOPHER_FLOPS)[0] == pytest.approx(67e9, rel=1e-12)
    assert approach1.optimal(1.21e20)[0] == pytest.approx(1e9, rel=0.05)
    assert approach1.optimal(1.23e22)[0] == pytest.approx(10e9, rel=0.05)
    assert approach1.exponents() == (0.50, 0.50)
    # Table A3 (approach 2): 67B at 6.88e23, 1B at 1.20e20, 10B at 1.32e22.
    approach2 = get_law("chinchilla-2")
    assert approach2.optimal(6.88e23)[0] == pytest.approx(67e9, rel=1e-12)
    assert approach2.optimal(1.20e20)[0] == pytest.approx(1e9, rel=0.05)
    assert approach2.optimal(1.32e22)[0] == pytest.approx(10e9, rel=0.05)
    assert approach2.optimal(GOPHER_FLOPS)[0] == pytest.approx(61.4e9, rel=0.01)
    assert approach2.exponents()[0] == 0.49


def test_approach_3_picks_a_smaller_model_than_approaches_1_and_2_at_gophers_budget():
    n3 = get_law("chinchilla").optimal(GOPHER_FLOPS)[0]
    assert n3 == pytest.approx(32.2e9, rel=0.01)  # the figure the law's note gives
    assert n3 < get_law("chinchilla-2").optimal(GOPHER_FLOPS)[0]
    assert n3 < get_law("chinchilla-1").optimal(GOPHER_FLOPS)[0]


def test_kaplan_frontier_is_1_3_billion_parameters_at_one_pf_day():
    assert PF_DAY == 8.64e19
    law = get_law("kaplan")
    assert law.optimal(PF_DAY)[0] == pytest.approx(1.3e9, rel=1e-12)
    assert law.optimal(10 * PF_DAY)[0] == pytest.approx(1.3e9 * 10**0.73, rel=1e-12)


def test_epoch_law_is_the_replications_and_inside_its_intervals():
    law = get_law("epoch")
    assert law.exponents()[0] == pytest.approx(0.5126, abs=1e-4)  # Epoch's a = 0.513
    assert law.confidence_level == 0.95
    for key, (low, high) in law.confidence.items():
        assert low < getattr(law, key) < high


def test_save_and_load_round_trip(tmp_path):
    law = ScalingLaw(name="fitted", source="a test", E=1.8, A=480.0, B=2100.0, alpha=0.35,
                     beta=0.37, confidence={"a": [0.49, 0.54]}, confidence_level=0.8,
                     note="round trip")
    path = tmp_path / "law.json"
    law.save(path)
    assert not list(tmp_path.glob("*.tmp"))
    assert ScalingLaw.load(path) == law
    assert get_law(str(path)) == law
    for name in law_names():
        assert ScalingLaw.from_dict(json.loads(json.dumps(get_law(name).to_dict()))) == \
            get_law(name)


def test_get_law_rejects_unknown_names_and_bad_files(tmp_path):
    with pytest.raises(UserError, match="unknown law 'gpt'; choose one of chinchilla, "):
        get_law("gpt")
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(UserError, match="not readable JSON"):
        get_law(str(broken))
    partial = tmp_path / "partial.json"
    partial.write_text(json.dumps({"name": "x", "E": 1.7, "A": 400}))
    with pytest.raises(UserError, match="needs all five"):
        get_law(str(partial))
    extra = tmp_path / "extra.json"
    extra.write_text(json.dumps({"name": "x", "a": 0.5, "n_coef": 0.1, "gamma": 2}))
    with pytest.raises(UserError, match="unknown scaling-law field"):
        get_law(str(extra))


def test_invalid_laws_and_budgets_are_user_errors():
    with pytest.raises(UserError, match="give E, A, B, alpha, beta or a and n_coef"):
        ScalingLaw(name="empty", source="")
    with pytest.raises(UserError, match="alpha must be a positive number"):
        ScalingLaw(name="neg", source="", E=1.0, A=1.0, B=1.0, alpha=-0.3, beta=0.3)
    with pytest.raises(UserError, match="E must be a positive number"):
        ScalingLaw(name="neg", source="", E=-0.1, A=1.0, B=1.0, alpha=0.3, beta=0.3)
    with pytest.raises(UserError, match="form 'kaplan' needs"):
        ScalingLaw(name="k", source="", a=0.7, n_coef=1.0, form="kaplan")
    with pytest.raises(UserError, match="positive number of FLOPs"):
        get_law("chinchilla").optimal(0.0)
    with pytest.raises(UserError, match="positive number of FLOPs"):
        get_law("chinchilla").optimal(float("nan"))


def test_a_fit_without_a_loss_floor_is_a_law():
    """E = 0 (a fitted exp(e) that underflowed: the runs show no irreducible loss) is a law
    like any other: its loss is the two power laws alone."""
    law = ScalingLaw(name="fitted", source="", E=0.0, A=400.0, B=400.0, alpha=0.3, beta=0.3)
    assert law.loss(1e6, 1e9) == pytest.approx(400.0 / 1e6**0.3 + 400.0 / 1e9**0.3)
    assert law.exponents() == pytest.approx((0.5, 0.5))
