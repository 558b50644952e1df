"""Fitting scaling laws: reading runs, the batched L-BFGS, Chinchilla's approaches 1-3, and the
reproduction of Epoch AI's refit of Chinchilla's own runs."""

import json
from pathlib import Path

import numpy as np
import pytest

from burrow import UserError
from burrow.scaling import lbfgs
from burrow.scaling.figures import plot_fit
from burrow.scaling.fit import envelope_points, fit_all, isoflop_fit
from burrow.scaling.laws import ScalingLaw, get_law
from burrow.scaling.parametric import GRID, HuberLSE, fit_parametric, grid_starts
from burrow.scaling.points import load_points, make_points, parse_columns

CHINCHILLA = Path(__file__).parent / "data" / "chinchilla"
RUNS = CHINCHILLA / "svg_extracted_data.csv"
PUBLISHED = json.loads((CHINCHILLA / "published.json").read_text())
TRUTH = dict(E=1.7, A=400.0, B=410.0, alpha=0.34, beta=0.28)
GOOD = "N,D,loss\n" + "1e6,2e7,3\n" * 4  # four valid runs, one short of a fit


@pytest.fixture(scope="module")
def epoch_points():
    return load_points(RUNS, drop_highest=5)


@pytest.fixture(scope="module")
def epoch_fit(epoch_points):
    return fit_all(epoch_points, bootstrap=200, seed=0)


def synthetic_points(noise: float = 0.003, seed: int = 0):
    """Runs of a known law on an IsoFLOP grid: 6 budgets x 7 sizes around each optimum."""
    law = ScalingLaw(name="truth", source="test", **TRUTH)
    rng = np.random.default_rng(seed)
    n_params, n_tokens = [], []
    for flops in np.logspace(18, 21, 6):
        n_opt, _ = law.optimal(flops)
        sizes = n_opt * np.logspace(-0.6, 0.6, 7)
        n_params.extend(sizes)
        n_tokens.extend(flops / (6 * sizes))
    n_params, n_tokens = np.array(n_params), np.array(n_tokens)
    loss = law.loss(n_params, n_tokens) * np.exp(noise * rng.standard_normal(len(n_params)))
    return make_points(n_params, n_tokens, loss, source="synthetic")


# --- reading runs ---------------------------------------------------------------------------

def test_epochs_csv_reads_as_it_is_and_drops_the_five_worst(epoch_points):
    everything = load_points(RUNS)
    assert len(everything) == 245 and len(epoch_points) == 240
    assert epoch_points.loss.max() < 3.4469 < np.sort(everything.loss)[-5]
    # D = C / (6N): Epoch's definition of the tokens.
    assert np.allclose(6 * everything.N * everything.D, everything.C)
    first = (6795600349.289497, 9.993852799709755e18)  # the CSV's first row
    assert everything.N[0] == first[0]
    assert everything.D[0] == pytest.approx(first[1] / (6 * first[0]), rel=1e-15)


def test_columns_are_mapped_and_jsonl_is_read(tmp_path):
    csv_path = tmp_path / "runs.csv"
    csv_path.write_text("size,compute,final\n" + "".join(
        f"{n},{6 * n * 20 * n},{3.0 - i / 10}\n" for i, n in enumerate([1e6, 2e6, 4e6, 8e6, 16e6])))
    points = load_points(csv_path, columns=parse_columns("N=size, C=compute, loss='final'"))
    assert np.allclose(points.D, 20 * points.N)
    jsonl = tmp_path / "runs.jsonl"
    jsonl.write_text("\n".join(json.dumps({"params": n, "tokens": 20 * n, "loss": 3.0})
                               for n in [1e6, 2e6, 4e6, 8e6, 16e6]) + "\n")
    assert np.allclose(load_points(jsonl).D, 20 * points.N)


@pytest.mark.parametrize("text, message", [
    ("N,D\n1,2\n", r"has no column for loss \(final loss\); its columns are N, D"),
    ("size,loss\n1,2\n", r"no column for N \(parameters\), D \(tokens\) or C \(training FLOPs"),
    (GOOD + "-1e6,2e7,3\n", r"N \(parameters\) must be positive.*line 6"),
    (GOOD + "1e6,0,3\n", r"D \(tokens\) must be positive"),
    (GOOD + "1e6,2e7,nan\n", r"loss \(final loss\) must be positive"),
    (GOOD + "1e6,2e7,inf\n", r"loss \(final loss\) must be positive"),
    (GOOD + "1e6,2e7,abc\n", r":6: loss \(column 'loss'\) is not a number"),
    (GOOD, r"4 runs are too few .* at least 5"),
    ("", r"is empty"),
])
def test_bad_runs_files_are_user_errors(tmp_path, text, message):
    path = tmp_path / "runs.csv"
    path.write_text(text)
    with pytest.raises(UserError, match=message) as error:
        load_points(path)
    assert str(path) in str(error.value) and "\n" not in str(error.value)


def test_unreadable_files_and_bad_column_maps_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_points(tmp_path / "missing.csv")
    binary = tmp_path / "runs.csv"
    binary.write_bytes(b"\xff\xfe\x00\x81")
    with pytest.raises(UserError, match="cannot read"):
        load_points(binary)
    with pytest.raises(UserError, match=r"no column 'flops' .*its columns are x, y, color"):
        load_points(RUNS, columns={"C": "flops"})
    with pytest.raises(UserError, match="KEY=COLUMN"):
        parse_columns("params")
    with pytest.raises(UserError, match="cannot drop 240 of 240"):
        make_points([1] * 240, [1] * 240, [1] * 240).drop_highest(240)


# --- the batched L-BFGS ---------------------------------------------------------------------

def test_huber_lse_gradient_matches_finite_differences(epoch_points):
    objective = HuberLSE(epoch_points)
    theta = np.array([[6.0, 7.5, 0.6, 0.35, 0.37], [3.0, 9.0, 0.2, 0.2, 0.5]])
    _, grad = objective(theta, np.arange(2))
    for j in range(5):
        step = np.zeros_like(theta)
        step[:, j] = 1e-6
        numeric = (objective(theta + step, np.arange(2))[0]
                   - objective(theta - step, np.arange(2))[0]) / 2e-6
        assert np.allclose(grad[:, j], numeric, rtol=1e-5, atol=1e-9)


def test_lbfgs_agrees_with_scipy(epoch_points):
    optimize = pytest.importorskip("scipy.optimize")
    starts = np.random.default_rng(0).uniform(-2, 2, (6, 5))
    ours = lbfgs.minimize(lambda x, rows: (np.array([optimize.rosen(v) for v in x]),
                                           np.array([optimize.rosen_der(v) for v in x])), starts)
    for start, f, x in zip(starts, ours.f, ours.x):
        theirs = optimize.minimize(optimize.rosen, start, jac=optimize.rosen_der,
                                   method="L-BFGS-B")
        assert f == pytest.approx(theirs.fun, abs=1e-8)
        assert np.allclose(x, theirs.x, atol=1e-3)
    # Chinchilla's objective: from Hoffmann et al.'s own constants (where both stop early, as
    # Epoch AI observed), from the grid start that leads to the best fit, and from a corner.
    objective = HuberLSE(epoch_points)
    starts = np.array([[6.0073404, 6.0179186, 0.5267228, 0.33917084, 0.2849083],
                       [0.0, 20.0, 0.0, 0.5, 1.0], [25.0, 25.0, 1.0, 2.0, 2.0]])
    ours = lbfgs.minimize(objective, starts)
    for start, f in zip(starts, ours.f):
        theirs = optimize.minimize(lambda t: tuple(v[0] for v in objective(t[None], [0])), start,
                                   jac=True, method="L-BFGS-B")
        assert f == pytest.approx(theirs.fun, rel=1e-5)


# --- approach 3 on Chinchilla's own runs ----------------------------------------------------

def test_grid_is_the_papers_4500_starts():
    starts = grid_starts()
    assert starts.shape == (4500, 5)
    assert GRID["e"] == (-1.0, -0.5, 0.0, 0.5, 1.0)  # Appendix D.2: e in {-1, -.5, ..., 1}
    assert len(np.unique(starts, axis=0)) == 4500


def test_fit_reproduces_epochs_grid_refit(epoch_fit):
    fit, epoch = epoch_fit.approach3, PUBLISHED["epoch_replication"]["lbfgs_grid_fit"]
    # Epoch's best objective over the same grid is 0.001018274034615 (scipy, numerical grad).
    assert fit.objective == pytest.approx(0.001018274034615, rel=1e-7)
    assert fit.objective <= 0.001018274034615
    for key in ("E", "alpha", "beta"):
        assert getattr(fit, key) == pytest.approx(epoch[key]["value"], rel=1e-4), key
    for key in ("A", "B"):
        assert getattr(fit, key) == pytest.approx(epoch[key]["value"], rel=1e-3), key
    assert fit.exponents()[0] == pytest.approx(epoch["a_opt"]["value"], abs=1e-4)
    assert fit.starts == 4500 and fit.converged >= 4400
    assert fit.seconds < 20  # about 2 s on 2 cores, bootstrap included


def test_fit_lies_within_two_standard_errors_of_epochs_estimates(epoch_fit):
    fit = epoch_fit.approach3
    for key, published in PUBLISHED["epoch_replication"]["headline_estimates"].items():
        if "standard_error" in published and key in ("E", "A", "B", "alpha", "beta"):
            assert abs(getattr(fit, key) - published["value"]) < 2 * published["standard_error"]


def test_bootstrap_intervals_are_as_wide_as_epochs(epoch_fit):
    fit = epoch_fit.approach3
    assert fit.level == 0.8 and fit.resamples == 200
    for key in ("a", "b", "E", "A", "B", "alpha", "beta"):
        low, high = fit.intervals[key]
        value = {"a": fit.exponents()[0], "b": fit.exponents()[1]}.get(key) or getattr(fit, key)
        assert low < value < high, key
    # Epoch's bootstrap: SE of a = 0.020 and an 80% interval 0.051 wide (4,000 resamples).
    low, high = fit.intervals["a"]
    assert high - low == pytest.approx(0.051, rel=0.3)
    # E: SE 0.0257, so an 80% interval about 2 x 1.28 x 0.0257 = 0.066 wide.
    low, high = fit.intervals["E"]
    assert high - low == pytest.approx(0.066, rel=0.3)


def test_report_is_json_and_its_law_plans(epoch_fit, tmp_path):
    report = json.loads(json.dumps(epoch_fit.to_dict()))
    assert report["n_points"] == 240
    assert report["approach3"]["E"] == epoch_fit.approach3.E
    law = epoch_fit.law("chinchilla-refit")
    assert law.confidence["a"] == epoch_fit.approach3.intervals["a"]
    assert law.confidence_level == 0.8
    law.save(tmp_path / "fitted.json")
    loaded = get_law(str(tmp_path / "fitted.json"))
    assert loaded == law
    n_opt, d_opt = loaded.optimal(5.76e23)
    assert 6 * n_opt * d_opt == pytest.approx(5.76e23, rel=1e-12)
    assert 60e9 < n_opt < 90e9  # Epoch's refit: about 20 tokens per parameter, not approach 3's


def test_approaches_1_and_2_on_chinchillas_runs(epoch_fit):
    # The runs hold Chinchilla's IsoFLOP profiles (§3.2: 9 budgets from 6e18 to 3e21).
    approach1, approach2 = epoch_fit.approach1, epoch_fit.approach2
    assert approach1.skipped is None and approach2.skipped is None
    usable = [p for p in approach2.profiles if p.reason is None and len(p.N) >= 7]
    assert len(usable) >= 8
    # Table 2 reports a = 0.50 (approach 1) and 0.49 (approach 2) on all of Chinchilla's runs.
    assert approach1.a == pytest.approx(0.50, abs=0.03)
    assert approach2.a == pytest.approx(0.49, abs=0.05)
    assert approach1.a + approach1.b == pytest.approx(1.0, abs=1e-12)


# --- approaches 1-3 on runs of a known law --------------------------------------------------

def test_fit_recovers_a_known_law():
    points = synthetic_points(noise=0.002)
    report = fit_all(points, bootstrap=50, seed=0)
    fit = report.approach3
    assert pytest.approx(TRUTH["E"], rel=0.03) == fit.E
    assert pytest.approx(TRUTH["A"], rel=0.25) == fit.A
    assert pytest.approx(TRUTH["B"], rel=0.25) == fit.B
    assert fit.alpha == pytest.approx(TRUTH["alpha"], rel=0.06)
    assert fit.beta == pytest.approx(TRUTH["beta"], rel=0.06)
    a_true = TRUTH["beta"] / (TRUTH["alpha"] + TRUTH["beta"])
    assert fit.exponents()[0] == pytest.approx(a_true, abs=0.01)
    assert fit.intervals["a"][0] < a_true < fit.intervals["a"][1]
    approach2 = report.approach2
    assert approach2.skipped is None and len(approach2.C) == 6
    assert approach2.a == pytest.approx(a_true, abs=0.01)
    assert approach2.b == pytest.approx(1 - a_true, abs=0.01)
    # The envelope holds the best of 7 sizes per budget, sizes 0.2 decades apart.
    assert report.approach1.a == pytest.approx(a_true, abs=0.05)


def test_noiseless_runs_give_the_law_exactly():
    points = synthetic_points(noise=0.0)
    fit = fit_parametric(points, bootstrap=0)
    assert fit.objective < 1e-12
    for key, value in TRUTH.items():
        assert getattr(fit, key) == pytest.approx(value, rel=1e-4), key


def test_envelope_keeps_runs_no_cheaper_run_beats():
    points = make_points([1, 2, 3, 4, 5, 6], [1, 1, 1, 1, 1, 1], [5.0, 4.0, 4.5, 3.0, 3.0, 2.0])
    assert envelope_points(points).tolist() == [0, 1, 3, 5]


def test_runs_without_structure_skip_approaches_1_and_2():
    rng = np.random.default_rng(0)
    n_params = 10 ** rng.uniform(7, 9, 12)
    points = make_points(n_params, 10 ** rng.uniform(9, 11, 12), 2 + rng.uniform(0, 1, 12))
    report = isoflop_fit(points)
    assert report.skipped.startswith("0 IsoFLOP profile(s) with a minimum")
    few = make_points([1e7, 2e7, 4e7, 8e7, 1.6e8], [1e9] * 5, [3.0, 3.0, 3.0, 3.0, 3.0])
    assert fit_all(few, bootstrap=0).approach1.skipped.startswith("1 run(s) on the loss-per-FLOP")
    with pytest.raises(UserError, match="needs at least 5 runs, got 4"):
        fit_parametric(make_points([1e7, 2e7, 4e7, 8e7], [1e9] * 4, [3.0] * 4))


def test_figures_are_written(epoch_fit, epoch_points, tmp_path):
    paths = plot_fit(epoch_fit, epoch_points, tmp_path / "figures")
    assert [p.name for p in paths] == ["isoflop.png", "frontier.png"]
    for path in paths:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list((tmp_path / "figures").glob("*.tmp*"))
    rng = np.random.default_rng(0)
    scattered = make_points(10 ** rng.uniform(7, 9, 12), 10 ** rng.uniform(9, 11, 12),
                            2 + rng.uniform(0, 1, 12))
    report = fit_all(scattered, bootstrap=0)
    assert report.approach3.beta < 0  # random runs: no frontier, yet the figures are drawn
    with pytest.raises(UserError, match="no compute-optimal frontier"):
        report.law()
    assert plot_fit(report, scattered, tmp_path / "scattered")[0].stat().st_size > 0
