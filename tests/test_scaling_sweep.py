"""`burrow sweep`: the plan spends each budget as C = 6ND, a tiny sweep trains with the real
trainer, resumes without retraining finished runs, fits, and refuses a changed plan."""

import csv
import json
import shutil
import subprocess

import pytest

from burrow import UserError
from burrow.cli import main
from burrow.scaling.laws import ScalingLaw
from burrow.scaling.sweep import SweepSettings, open_sweep, plan_sweep, run_sweep
from burrow.train import train
from conftest import CORPUS, burrow_command


@pytest.fixture(scope="module")
def tiny_law(tmp_path_factory) -> str:
    """A frontier N_opt = 0.9 sqrt(C): ~90K parameters at 1e10 FLOPs, where the published laws'
    optimum is below the smallest model at this vocabulary; so a test sweep takes seconds."""
    path = tmp_path_factory.mktemp("law") / "tiny.json"
    ScalingLaw(name="tiny", source="test", a=0.5, n_coef=0.9, loss_law="chinchilla").save(path)
    return str(path)


def tiny_settings(law: str, **changes) -> SweepSettings:
    fields = dict(budgets=(1e10, 2e10), sizes=3, span=2.0, law=law, data=str(CORPUS),
                  vocab_size=512, val_fraction=0.25, seq_len=64, batch_tokens=256,
                  eval_tokens=2048, device="cpu")
    fields.update(changes)
    return SweepSettings(**fields)


def test_the_plan_spends_each_budget_around_the_optimum(tiny_law):
    runs = plan_sweep(tiny_settings(tiny_law))
    assert len(runs) == 6
    for budget in (1e10, 2e10):
        family = [run for run in runs if run.budget == budget]
        n_opt = 0.9 * budget**0.5
        assert family[0].params < n_opt < family[-1].params
        assert [run.params for run in family] == sorted({run.params for run in family})
        for run in family:
            assert run.flops == 6 * run.params * run.tokens
            assert run.tokens == run.steps * 256
            assert run.flops == pytest.approx(budget, rel=0.05)  # whole steps
            train_cfg = run.config.train
            assert train_cfg.max_steps == run.steps and train_cfg.schedule == "cosine"
            assert train_cfg.min_lr_ratio == 0.1 and train_cfg.warmup_steps < run.steps / 10


def test_a_tiny_sweep_trains_resumes_and_fits(tiny_law, tmp_path, capsys):
    out = tmp_path / "sweep"
    settings = tiny_settings(tiny_law)
    runs = plan_sweep(settings)
    first = run_sweep(settings, out, max_runs=4, verbose=False)
    assert len(first["results"]) == 4 and "fit" not in first
    finished = {run.name: (out / "runs" / run.name / "metrics.jsonl").read_bytes()
                for run in runs[:4]}
    # The fifth run is cut short: half its steps, with its checkpoint (as a kill would leave).
    cut = runs[4].config
    cut.train.max_steps = runs[4].steps // 2
    train(cut, out / "runs" / runs[4].name, verbose=False)
    capsys.readouterr()

    second = run_sweep(settings, out, verbose=True)
    log = capsys.readouterr().out
    assert f"resumed from {out / 'runs' / runs[4].name}" in log
    assert "run 5/6" in log and "run 6/6 done" in log and "run 1/6" not in log
    for name, metrics in finished.items():  # finished runs are not trained again
        assert (out / "runs" / name / "metrics.jsonl").read_bytes() == metrics
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [row["name"] for row in rows] == [run.name for run in runs]
    for row, run in zip(rows, runs):
        n_params, tokens, flops = int(row["N"]), int(row["D"]), float(row["C"])
        assert flops == 6 * n_params * tokens and int(row["steps"]) == run.steps
        assert 0 < float(row["loss"]) < 7 and float(row["seconds"]) > 0
    assert len((out / "results.jsonl").read_text().splitlines()) == 6
    assert second["fit"]["approach3"]["objective"] >= 0
    for name in ("fit.json", "law.json", "isoflop.png", "frontier.png", "envelope.png"):
        assert (out / name).is_file(), name

    assert main(["fit", str(out), "--bootstrap", "0", "--json"]) == 0
    fitted = json.loads(capsys.readouterr().out)
    assert fitted["report"]["n_points"] == 6 and fitted["law"] == str(out / "law.json")
    # Approach 1 reads the six runs' training curves (about 100 logged rows each).
    envelope = fitted["report"]["approach1"]["envelope"]
    assert fitted["report"]["approach1"]["from"] == "training curves" and envelope["runs"] == 6


def test_a_changed_plan_is_refused_unless_forced(tiny_law, tmp_path):
    out = tmp_path / "sweep"
    settings = tiny_settings(tiny_law)
    open_sweep(out, settings, plan_sweep(settings))
    open_sweep(out, settings, plan_sweep(settings))  # the same plan: fine
    changed = tiny_settings(tiny_law, lr=1e-3)
    with pytest.raises(UserError, match=r"different sweep.*lr 0\.003 -> 0\.001"):
        open_sweep(out, changed, plan_sweep(changed))
    (out / "runs" / plan_sweep(settings)[0].name).mkdir(parents=True)
    open_sweep(out, changed, plan_sweep(changed), force=True)
    assert json.loads((out / "sweep.json").read_text())["settings"]["lr"] == 1e-3
    assert not (out / "runs" / plan_sweep(settings)[0].name).exists()


def test_a_sweep_begun_before_burrow_gained_a_setting_continues(tiny_law, tmp_path):
    """A manifest whose run configs lack a field today's burrow writes (with its default) is
    the same sweep: its runs are kept, even with --force; a changed value is not."""
    out = tmp_path / "sweep"
    settings = tiny_settings(tiny_law)
    runs = plan_sweep(settings)
    open_sweep(out, settings, runs)
    manifest = json.loads((out / "sweep.json").read_text())
    for run in manifest["runs"]:
        del run["config"]["train"]["layer_layouts"]  # as written before the field existed
    (out / "sweep.json").write_text(json.dumps(manifest))
    (out / "runs" / runs[0].name).mkdir(parents=True)
    open_sweep(out, settings, runs)
    open_sweep(out, settings, runs, force=True)
    assert (out / "runs" / runs[0].name).is_dir()
    manifest["runs"][0]["config"]["train"]["seed"] = 7
    (out / "sweep.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="different sweep"):
        open_sweep(out, settings, runs)


@pytest.mark.parametrize("args, words", [
    (["--budgets", "1e12,abc"], ["--budgets", "abc"]),
    (["--budgets=-1e12"], ["--budgets", "positive"]),
    (["--sizes", "2"], ["--sizes", "three"]),
    (["--budgets", "1e6"], ["too small", "smallest model"]),
    (["--batch-tokens", "1000"], ["multiple of --seq-len"]),
    (["--span", "1"], ["--span"]),
    (["--law", "nope"], ["unknown law"]),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, args, words):
    assert main(["sweep", "--out", str(tmp_path / "s"), "--dry-run", *args]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and error[0].startswith("burrow: error: "), error
    for word in words:
        assert word in error[0], error[0]
    assert not (tmp_path / "s").exists()


def test_dry_run_lists_the_runs_and_the_estimate(capsys):
    assert main(["sweep", "--dry-run", "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    assert "estimated time on this CPU" in text and len(text.splitlines()) == 17


EPOCH_CSV = CORPUS.parent / "chinchilla" / "svg_extracted_data.csv"


def test_fit_reads_epochs_copy_of_chinchilla_as_it_is(tmp_path):
    table = tmp_path / "runs.csv"
    shutil.copyfile(EPOCH_CSV, table)
    result = subprocess.run(burrow_command("fit", str(table), "--drop-highest", "5",
                                           "--bootstrap", "8", "--json", "--out", str(tmp_path)),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)["report"]
    assert report["n_points"] == 240
    third = report["approach3"]  # Epoch AI's refit: alpha 0.3478, beta 0.3658
    assert third["alpha"] == pytest.approx(0.347, abs=0.01)
    assert third["beta"] == pytest.approx(0.367, abs=0.01)
    assert third["intervals"]["a"][0] < third["a"] < third["intervals"]["a"][1]
    for approach in ("approach1", "approach2"):
        assert report[approach]["skipped"] is None and 0.4 < report[approach]["a"] < 0.6
    for name in ("fit.json", "law.json", "isoflop.png", "frontier.png"):
        assert (tmp_path / name).is_file(), name
    text = subprocess.run(burrow_command("plan", "--flops", "5.76e23", "--law",
                                         str(tmp_path / "law.json")),
                          capture_output=True, text=True, timeout=120)
    assert text.returncode == 0 and "law       fitted: burrow fit of" in text.stdout


@pytest.mark.parametrize("args, words", [
    (["{tmp}/missing.csv"], ["missing.csv", "does not exist"]),
    (["{tmp}"], ["without results.csv"]),
    (["{tmp}/few.csv"], ["too few"]),
    (["{epoch}", "--columns", "N"], ["--columns"]),
    (["{epoch}", "--columns", "N=params"], ["no column 'params'"]),
    (["{epoch}", "--drop-highest", "245"], ["drop 245"]),
    (["{epoch}", "--bootstrap", "-1"], ["--bootstrap"]),
])
def test_fit_bad_input_is_one_line_and_exit_2(tmp_path, capsys, args, words):
    (tmp_path / "few.csv").write_text("N,D,loss\n1e6,1e8,3.0\n2e6,1e8,2.9\n")
    argv = [arg.format(tmp=tmp_path, epoch=EPOCH_CSV) for arg in args]
    if "--bootstrap" not in argv:
        argv += ["--bootstrap", "0"]
    assert main(["fit", *argv, "--out", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and error[0].startswith("burrow: error: "), error
    for word in words:
        assert word in error[0], error[0]


def test_a_fit_that_fails_between_runs_does_not_stop_the_sweep(tmp_path, monkeypatch):
    """After each run the sweep refits what has finished; runs that fit badly so far (a
    degenerate law) are reported, and the table is still written, so the sweep goes on."""
    from burrow.errors import UserError
    from burrow.scaling import results

    rows = [{"name": f"r{i}", "budget": 1e12, "N": 1000 * (i + 1)} for i in range(6)]
    monkeypatch.setattr(results, "finished_rows", lambda out, runs: rows)
    monkeypatch.setattr(results, "ready_to_fit", lambda rows: True)
    monkeypatch.setattr(results, "sweep_curves", lambda out: [])

    def degenerate(*args, **kwargs):
        raise UserError("law 'fitted': alpha must be a positive number, got nan")

    monkeypatch.setattr(results, "fit_and_plot", degenerate)
    result = results.update_results(tmp_path, runs=[])
    assert result["fit_error"].startswith("law 'fitted'")
    assert "fit" not in result
    assert (tmp_path / "results.csv").read_text().count("\n") == len(rows) + 1
