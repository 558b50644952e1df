"""Chinchilla's approach 1 from training curves (§3.1, Figure 2): smoothing, the lower envelope
of loss against FLOPs, the power laws through it, and `burrow sweep --horizons`."""

import json
import math

import numpy as np
import pytest

from burrow import UserError
from burrow.cli import main
from burrow.scaling.commands import format_fit
from burrow.scaling.curves import gaussian_smooth, lower_envelope, make_curve, sweep_curves
from burrow.scaling.fit import curve_envelope_fit
from burrow.scaling.laws import ScalingLaw
from burrow.scaling.sweep import (
    SweepSettings,
    horizon_multipliers,
    open_sweep,
    parse_horizons,
    plan_sweep,
)
from conftest import CORPUS

TRUTH = dict(E=1.7, A=400.0, B=410.0, alpha=0.34, beta=0.28)


# --- smoothing -------------------------------------------------------------------------------

def test_smoothing_leaves_a_constant_curve_unchanged():
    steps = np.array([1, 2, 3, 5, 8, 9, 10, 20, 21, 40])
    smoothed = gaussian_smooth(steps, np.full(10, 2.75), window=10)
    np.testing.assert_allclose(smoothed, 2.75, rtol=1e-15)


def test_smoothing_is_the_papers_gaussian_window():
    """Against a double loop: weights exp(-(gap / sigma)^2 / 2), sigma = window / 5, for rows
    at most window / 2 steps away, normalised (App. D.1's 10-step window, MATLAB's convention)."""
    rng = np.random.default_rng(0)
    steps = np.cumsum(rng.integers(1, 4, 60))
    values = rng.normal(3.0, 0.2, 60)
    expected = np.empty(60)
    for i in range(60):
        total = weights = 0.0
        for j in range(60):
            gap = steps[j] - steps[i]
            if abs(gap) <= 5:
                weight = math.exp(-0.5 * (gap / 2.0) ** 2)
                total += weight * values[j]
                weights += weight
        expected[i] = total / weights
    np.testing.assert_allclose(gaussian_smooth(steps, values, window=10), expected, rtol=1e-13)
    # A straight line keeps its values where the window is whole (the kernel is symmetric).
    line = 4.0 - 0.01 * np.arange(1, 101)
    inner = gaussian_smooth(np.arange(1, 101), line, window=10)[5:-5]
    np.testing.assert_allclose(inner, line[5:-5], rtol=1e-13)
    assert np.array_equal(gaussian_smooth(steps, values, window=0), values)


# --- the envelope ----------------------------------------------------------------------------

def hand_made_curves():
    """Four runs whose curves cross, with a gap in FLOPs no run covers."""
    return [
        make_curve("small", 1e3, [1, 2, 3, 4, 6], [100, 200, 300, 400, 600],
                   [5.0, 4.0, 3.6, 3.4, 3.3]),
        make_curve("medium", 3e3, [1, 2, 4, 8], [100, 200, 400, 800], [4.8, 3.7, 3.1, 2.9]),
        make_curve("large", 1e4, [2, 5, 10], [150, 375, 750], [4.0, 3.0, 2.6]),
        make_curve("late", 5e3, [1, 2], [4000, 5000], [2.5, 2.45]),
    ]


def naive_envelope(curves, flops):
    """At each C, the lowest loss of any run whose FLOP range holds C, each run's loss found on
    the segment around C by linear interpolation in log C; (inf, None) where no run reaches C."""
    lowest, sizes = [], []
    for c in flops:
        best, best_n = math.inf, None
        for curve in curves:
            points = list(zip(6.0 * curve.N * curve.tokens, curve.loss))
            for (c0, l0), (c1, l1) in zip(points, points[1:] or points):
                if c0 <= c <= c1:
                    share = 0.0 if c1 == c0 else math.log(c / c0) / math.log(c1 / c0)
                    loss = l0 + share * (l1 - l0)
                    if loss < best:
                        best, best_n = loss, curve.N
                    break
        lowest.append(best)
        sizes.append(best_n)
    return np.array(lowest), sizes


def test_envelope_is_the_minimum_over_runs_of_the_interpolated_curves():
    curves = hand_made_curves()
    envelope = lower_envelope(curves, grid_points=400, window=0)
    all_flops = np.concatenate([6.0 * c.N * c.tokens for c in curves])
    assert envelope.C[0] == all_flops.min() and envelope.C[-1] == all_flops.max()
    np.testing.assert_allclose(np.diff(np.log(envelope.C)), math.log(
        all_flops.max() / all_flops.min()) / 399, rtol=1e-9)  # log-spaced
    loss, sizes = naive_envelope(curves, envelope.C)
    covered = np.isfinite(loss)
    assert 0 < covered.sum() < 400  # the gap is there
    assert np.array_equal(envelope.covered, covered)
    np.testing.assert_allclose(envelope.loss[covered], loss[covered], rtol=1e-12)
    assert envelope.N[covered].tolist() == [n for n in sizes if n is not None]
    np.testing.assert_allclose(envelope.D[covered], envelope.C[covered] /
                               (6 * envelope.N[covered]), rtol=1e-15)
    assert {curves[i].name for i in envelope.run[covered]} == {"small", "medium", "large",
                                                               "late"}


def test_envelope_smooths_before_it_takes_the_minimum():
    curves = hand_made_curves()
    envelope = lower_envelope(curves, grid_points=300, window=4)
    smoothed = [make_curve(c.name, c.N, c.steps, c.tokens, gaussian_smooth(c.steps, c.loss, 4))
                for c in curves]
    loss, _ = naive_envelope(smoothed, envelope.C)
    np.testing.assert_allclose(envelope.loss[envelope.covered], loss[np.isfinite(loss)],
                               rtol=1e-12)


# --- approach 1 on curves of a known law -----------------------------------------------------

def law_curves(sizes, noise=0.0, seed=0, steps=300):
    """Runs of L(N, D) = E + A/N^alpha + B/D^beta: each size on 4 horizons over 16x around the
    tokens at which it is compute-optimal (§3.1), its loss raised mid-run by how far the cosine
    learning rate (10x decay) still is above its floor: zero excess at the end of each run."""
    law = ScalingLaw(name="truth", source="test", **TRUTH)
    g = (TRUTH["alpha"] * TRUTH["A"] / (TRUTH["beta"] * TRUTH["B"])) ** (
        1 / (TRUTH["alpha"] + TRUTH["beta"]))
    a = TRUTH["beta"] / (TRUTH["alpha"] + TRUTH["beta"])
    rng = np.random.default_rng(seed)
    curves = []
    for n in sizes:
        d_star = (n / g) ** (1 / a) / n  # N_opt = G (C/6)^a, D_opt = (C/6) / N_opt
        for horizon in d_star * 16.0 ** (np.arange(4) / 3 - 0.5):
            step = np.arange(1, steps + 1)
            tokens = horizon * step / steps
            lr = 0.1 + 0.45 * (1 + np.cos(np.pi * step / steps))  # cosine from 1 to 0.1
            loss = law.loss(n, tokens) + 0.3 * (lr - 0.1) * TRUTH["B"] / tokens ** TRUTH["beta"]
            loss = loss + noise * rng.standard_normal(steps)
            curves.append(make_curve(f"N{n:.0f}_D{horizon:.0f}", n, step, tokens, loss))
    return curves, a


def test_approach_1_recovers_the_laws_exponent_from_curves():
    curves, a_true = law_curves(np.logspace(7, 9, 13))
    fit = curve_envelope_fit(curves, smooth_steps=10)
    assert fit.skipped is None
    # Sizes 10^(1/6) apart make the envelope's N a staircase around the true N_opt(C).
    assert fit.a == pytest.approx(a_true, abs=0.01)
    assert fit.a + fit.b == pytest.approx(1.0, abs=1e-12)
    # Fitted: the stretch after the smallest size's last win, before the largest's first.
    winner = fit.envelope.N
    first, last = np.searchsorted(fit.envelope.C, fit.C[[0, -1]])
    assert winner[first - 1] == 1e7 and winner[last + 1] == 1e9
    assert 1e7 not in winner[first:] and 1e9 not in winner[:last + 1]
    # Noisy curves (0.02 nats a step), smoothed over the paper's 10 steps: within 0.025.
    noisy, _ = law_curves(np.logspace(7, 9, 13), noise=0.02)
    assert curve_envelope_fit(noisy).a == pytest.approx(a_true, abs=0.025)


def test_an_envelope_won_only_by_the_extreme_sizes_is_skipped():
    curves, _ = law_curves([1e7, 1e9], steps=50)
    fit = curve_envelope_fit(curves)
    assert fit.skipped.startswith("0 model size(s) win the envelope of 8 training curves")
    assert fit.to_dict()["from"] == "training curves"


def test_bad_curves_are_user_errors():
    with pytest.raises(UserError, match="increasing whole numbers"):
        make_curve("r", 1e6, [1, 1, 2], [1, 2, 3], [3, 2, 1])
    with pytest.raises(UserError, match="not finite at step 2"):
        make_curve("r", 1e6, [1, 2], [1, 2], [3, float("nan")])


# --- reading a sweep's curves and fitting them -----------------------------------------------

def write_sweep(out, curves):
    """A sweep directory as `burrow sweep` leaves it, from curves: results.csv/.jsonl and each
    run's metrics.jsonl (train rows, an eval row, a step logged twice)."""
    law = ScalingLaw(name="truth", source="test", **TRUTH)
    rows = []
    for curve in curves:
        run_dir = out / "runs" / curve.name
        run_dir.mkdir(parents=True)
        lines = [{"step": int(s), "split": "train", "loss": 9.0, "tokens": float(t)}
                 for s, t in zip(curve.steps[:2], curve.tokens[:2])]  # overwritten below
        lines += [{"step": int(s), "split": "train", "loss": float(v), "tokens": float(t)}
                  for s, t, v in zip(curve.steps, curve.tokens, curve.loss)]
        lines.append({"step": int(curve.steps[-1]), "split": "val", "loss": 0.1})
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
        d = float(curve.tokens[-1])
        rows.append({"budget": 6 * curve.N * d, "name": curve.name, "N": curve.N, "D": d,
                     "C": 6 * curve.N * d, "loss": float(law.loss(curve.N, d)),
                     "steps": int(curve.steps[-1])})
    (out / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    header = "name,N,D,C,loss\n"
    (out / "results.csv").write_text(header + "".join(
        f"{r['name']},{r['N']},{r['D']},{r['C']},{r['loss']}\n" for r in rows))


def test_fit_of_a_sweep_reads_the_curves(tmp_path, capsys):
    curves, a_true = law_curves(np.logspace(7, 9, 7), steps=100)
    write_sweep(tmp_path, curves)
    read = sweep_curves(tmp_path)
    for mine, theirs in zip(read, curves):  # the later row of a step counts; eval rows do not
        assert mine.name == theirs.name and mine.N == theirs.N
        np.testing.assert_array_equal(mine.loss, theirs.loss)
        np.testing.assert_array_equal(mine.tokens, theirs.tokens)
    assert main(["fit", str(tmp_path), "--bootstrap", "0", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    first = result["report"]["approach1"]
    assert first["from"] == "training curves" and first["envelope"]["runs"] == 28
    assert first["envelope"]["grid_points"] == 1500 and first["envelope"]["smooth_steps"] == 10
    assert first["a"] == pytest.approx(a_true, abs=0.02)
    assert (tmp_path / "envelope.png").read_bytes()[:4] == b"\x89PNG"
    assert "of 1500 FLOP values on the envelope of 28 training curves, 7 sizes" in (
        format_fit(result))
    (tmp_path / "runs" / curves[0].name / "metrics.jsonl").unlink()
    assert main(["fit", str(tmp_path), "--bootstrap", "0"]) == 2
    assert "metrics.jsonl is missing" in capsys.readouterr().err


# --- burrow sweep --horizons -----------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_law(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("law") / "tiny.json"
    ScalingLaw(name="tiny", source="test", a=0.5, n_coef=0.9, loss_law="chinchilla").save(path)
    return str(path)


def horizon_settings(law: str, **changes) -> SweepSettings:
    fields = dict(budgets=(1e11,), sizes=3, span=2.0, law=law, data=str(CORPUS), vocab_size=512,
                  val_fraction=0.25, seq_len=64, batch_tokens=64, eval_tokens=2048,
                  device="cpu", horizons=horizon_multipliers(4))
    fields.update(changes)
    return SweepSettings(**fields)


def test_horizons_are_the_papers_16x_range():
    assert horizon_multipliers(4) == pytest.approx((1, 16 ** (-1 / 3), 16 ** (-2 / 3), 1 / 16))
    assert horizon_multipliers(1) == (1.0,)
    assert parse_horizons("4") == horizon_multipliers(4)
    assert parse_horizons("0.25,1,0.5") == (1.0, 0.5, 0.25)


def test_horizons_give_each_size_schedules_over_16x(tiny_law, tmp_path):
    settings = horizon_settings(tiny_law)
    runs = plan_sweep(settings)
    open_sweep(tmp_path, settings, runs)
    written = json.loads((tmp_path / "sweep.json").read_text())["runs"]
    assert len(written) == 3 * 4
    plain = {run.name: run for run in plan_sweep(horizon_settings(tiny_law, horizons=(1.0,)))}
    for params in {run["params"] for run in written}:
        family = [run for run in written if run["params"] == params]
        train = [run["config"]["train"] for run in family]
        steps = sorted(t["max_steps"] for t in train)
        assert steps[-1] / steps[0] == pytest.approx(16, rel=0.05)
        for run, t in zip(family, train):
            # Each cosine cycle spans the run's own steps, decays 10x, after a 5% warmup.
            assert t["schedule"] == "cosine" and t["schedule_steps"] == 0
            assert t["min_lr_ratio"] == 0.1 and t["warmup_steps"] == max(1, round(
                0.05 * t["max_steps"]))
            assert run["tokens"] == t["max_steps"] * 64
            assert run["budget"] == pytest.approx(1e11 * run["horizon"])
            assert t["log_every"] == max(1, t["max_steps"] // 100)
        longest = max(family, key=lambda run: run["tokens"])
        isoflop = json.loads(json.dumps(plain[longest["name"]].config.to_dict()))
        assert longest["horizon"] == 1 and longest["config"] == isoflop  # the IsoFLOP run


def test_a_sweep_planned_with_other_logging_continues(tiny_law, tmp_path):
    settings = horizon_settings(tiny_law, horizons=(1.0,))
    runs = plan_sweep(settings)
    open_sweep(tmp_path, settings, runs)
    manifest = json.loads((tmp_path / "sweep.json").read_text())
    for run in manifest["runs"]:  # as sweeps were planned before: 4 log rows a run
        run["config"]["train"]["log_every"] = run["steps"] // 4
        del run["horizon"]
    (tmp_path / "sweep.json").write_text(json.dumps(manifest))
    open_sweep(tmp_path, settings, runs)
    assert json.loads((tmp_path / "sweep.json").read_text())["runs"][0]["horizon"] == 1


@pytest.mark.parametrize("args, words", [
    (["--horizons", "0"], ["--horizons", "at least 1"]),
    (["--horizons", "abc"], ["--horizons", "'abc'"]),
    (["--horizons", "1,1.5"], ["--horizons", "(0, 1]"]),
    (["--horizons", "1,0.5,0.5"], ["--horizons", "twice"]),
    (["--horizons", "4", "--budgets", "3e12", "--batch-tokens", "4096"],
     ["at horizon 0.0625", "--horizons"]),
])
def test_bad_horizons_are_one_line_and_exit_2(tmp_path, capsys, args, words):
    assert main(["sweep", "--out", str(tmp_path / "s"), "--dry-run", *args]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and error[0].startswith("burrow: error: "), error
    for word in words:
        assert word in error[0], error[0]


def test_dry_run_with_horizons_lists_four_runs_per_isoflop_run(capsys):
    assert main(["sweep", "--dry-run", "--device", "cpu", "--horizons", "4", "--json"]) == 0
    runs = json.loads(capsys.readouterr().out)["runs"]
    assert len(runs) == 60
    assert sum(run["horizon"] == 1 for run in runs) == 15
    assert {run["name"] for run in runs if run["horizon"] == 1} >= {"C1e12_N54240",
                                                                   "C1e13_N1322400"}
