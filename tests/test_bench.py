"""The benchmarks' shared options and the distillation benchmark's arithmetic (bench/)."""

import argparse
import importlib
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

harness = importlib.import_module("harness")


def test_common_parser_is_a_parent_whose_defaults_a_script_can_change():
    parser = argparse.ArgumentParser(parents=[harness.common_parser("rounds", "quick")])
    parser.set_defaults(rounds=3)
    assert vars(parser.parse_args([])) == {"rounds": 3, "quick": False}
    assert vars(parser.parse_args(["--rounds", "7", "--quick"])) == {"rounds": 7, "quick": True}
    every = argparse.ArgumentParser(parents=[harness.common_parser()]).parse_args([])
    assert set(vars(every)) == set(harness.COMMON_FLAGS)
    with pytest.raises(ValueError, match="json"):
        harness.common_parser("json")


@pytest.mark.parametrize("script, shared", [
    ("chinchilla_fit", {"rounds": 1, "threads": None}),
    ("cli_start", {"rounds": 1}),
    ("decode_kernels", {"rounds": 2, "threads": None}),
    ("generate", {"rounds": 2, "threads": None, "device": "cpu", "seed": 0}),
    ("gpu_mfu", {"device": "cpu"}),
    ("moe", {"rounds": 1, "threads": 1, "seed": 0}),
    ("train_throughput", {"rounds": 2, "threads": None, "device": "cpu", "seed": 0}),
])
def test_every_script_takes_the_shared_options(monkeypatch, script, shared):
    module = importlib.import_module(script)
    monkeypatch.setattr(sys, "argv", [f"{script}.py", "--quick"])
    args = vars(module.parse_args())
    assert args["quick"] is True
    assert {name: args[name] for name in shared} == shared  # --quick's defaults included


def test_gain_kept_compares_with_the_dense_baseline_continued_as_long():
    moe = importlib.import_module("moe")
    final = {"switch": 3.00, "dense": 3.10, "dense_continued": 3.05, "student": 3.02,
             "init_only": 3.05}
    shares = moe.gains(final)
    assert shares["teacher_gain_nats"] == pytest.approx(0.10)
    assert shares["continued_dense_gain_nats"] == pytest.approx(0.05)
    assert shares["student_gain_kept_percent"] == pytest.approx(30.0)
    assert shares["init_only_gain_kept_percent"] == pytest.approx(0.0)
    assert shares["teacher_probabilities_share_percent"] == pytest.approx(30.0)
    no_gain = moe.gains({**final, "switch": 3.10})
    assert no_gain["student_gain_kept_percent"] is None
    assert no_gain["teacher_probabilities_share_percent"] is None


def test_shares_are_given_only_when_the_teacher_gain_stands_out_of_its_spread():
    moe = importlib.import_module("moe")
    final = {"switch": 3.00, "dense": 3.10, "dense_continued": 3.05, "student": 3.02,
             "init_only": 3.05}
    clear = [moe.gains(final), moe.gains({**final, "switch": 2.98})]
    summary = moe.distill_summary(clear)
    assert summary["teacher_gain_resolved"] is True
    assert summary["student_gain_kept_percent"]["values"] == pytest.approx([30.0, 25.0])
    assert summary["student_minus_init_only_nats"]["mean"] == pytest.approx(-0.03)
    noisy = [moe.gains({**final, "switch": 3.09}), moe.gains({**final, "switch": 3.06}),
             moe.gains({**final, "switch": 3.11})]  # one seed's teacher is worse
    summary = moe.distill_summary(noisy)
    assert summary["teacher_gain_resolved"] is False
    assert summary["student_gain_kept_percent"].startswith("undefined")
    assert summary["init_only_minus_continued_dense_nats"]["mean"] == pytest.approx(0.0)


def test_spread_leaves_out_missing_values():
    moe = importlib.import_module("moe")
    assert moe.spread([10.0, None, 30.0]) == {"mean": 20.0, "std": pytest.approx(14.142, 1e-3),
                                              "min": 10.0, "max": 30.0,
                                              "values": [10.0, None, 30.0]}
    assert moe.spread([None])["mean"] is None
