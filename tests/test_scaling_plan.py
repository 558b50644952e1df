"""`burrow plan`: the optimum against Chinchilla's closed form, the architecture rules against
the papers' shapes, the budget arithmetic, and every bad input through the real CLI."""

import json
import subprocess

import pytest

from burrow import RunConfig
from burrow.cli import main
from burrow.flops import matmul_params
from burrow.scaling.plan import plan
from burrow.scaling.shapes import aspect_ratio, choose_shape, head_width
from conftest import burrow_command

# Hoffmann et al. 2022, Appendix D.2: the published approach-3 fit.
E, A, B, ALPHA, BETA = 1.69, 406.4, 410.7, 0.34, 0.28


def plan_json(capsys, *args: str) -> dict:
    assert main(["plan", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_optimum_is_the_closed_form_and_spends_the_budget():
    flops = 5.76e23
    result = plan(flops)
    best = result["optimal"]
    # Chinchilla eq. 4: N_opt = G (C/6)^a, G = (alpha A / (beta B))^(1/(alpha+beta)).
    a = BETA / (ALPHA + BETA)
    g = (ALPHA * A / (BETA * B)) ** (1 / (ALPHA + BETA))
    assert best["params"] == pytest.approx(g * (flops / 6) ** a, rel=1e-9)
    assert 6 * best["params"] * best["tokens"] == pytest.approx(flops, rel=1e-12)
    assert best["flops_check"] == pytest.approx(flops, rel=1e-12)
    assert (best["exponent_a"], best["exponent_b"]) == pytest.approx((a, ALPHA / (ALPHA + BETA)))
    n, d = best["params"], best["tokens"]
    assert best["loss"] == pytest.approx(E + A / n**ALPHA + B / d**BETA, rel=1e-12)
    assert 30e9 < n < 34e9  # the rounded constants' 32B (the unrounded fit: 40B)
    model = result["model"]
    assert model["params"] == pytest.approx(n, rel=0.03)
    assert 6 * model["params"] * model["tokens"] == pytest.approx(flops, rel=1e-12)


def test_every_law_is_compared_and_approach_3_is_the_smallest():
    rows = {row["law"]: row for row in plan(5.76e23)["laws"]}
    assert set(rows) == {"chinchilla", "chinchilla-1", "chinchilla-2", "epoch", "kaplan"}
    assert rows["chinchilla-1"]["params"] == pytest.approx(67e9, rel=1e-9)  # Table 3
    assert rows["chinchilla"]["params"] < rows["chinchilla-2"]["params"] < 67e9


@pytest.mark.parametrize("n_params, layers, d_model", [
    (44e6, 8, 512), (117e6, 12, 768), (1.018e9, 23, 1792),  # Chinchilla Table A9
    (70e9, 80, 8192),                                         # Chinchilla, Table 4
])
def test_chinchilla_shapes_are_reproduced(n_params, layers, d_model):
    cfg = choose_shape(n_params, arch="chinchilla")
    assert (cfg.n_layers, cfg.d_model) == (layers, d_model)
    assert cfg.num_params() == pytest.approx(n_params, rel=0.02)


def test_llama_70b_is_near_chinchilla_and_the_rules_hold():
    cfg = choose_shape(70e9)
    assert abs(cfg.n_layers - 80) <= 4 and abs(cfg.d_model - 8192) <= 512
    assert cfg.head_size == 128 and cfg.ffn == "swiglu" and cfg.ffn_size % 256 == 0
    assert cfg.num_params() == pytest.approx(70e9, rel=0.02)
    for n_params in (3e5, 2e6, 5e7, 1e9, 2e10, 3e11):
        cfg = choose_shape(n_params, vocab_size=4096 if n_params < 1e7 else 32_000)
        assert cfg.d_model % head_width(cfg.d_model) == 0 and cfg.head_size == head_width(
            cfg.d_model)
        # Tiny models have a coarse grid (widths of 16 dominated by the embedding).
        assert matmul_params(cfg) == pytest.approx(n_params, rel=0.25 if n_params < 1e8 else 0.03)
        if n_params >= 1e9:  # wide enough for the aspect ratio to be kept
            assert cfg.d_model / cfg.n_layers == pytest.approx(aspect_ratio(n_params), rel=0.2)


def test_a_1e21_budget_gives_a_sensible_model():
    model = plan(1e21)["model"]
    assert 1.5e9 < model["params"] < 2.2e9
    assert 20 <= model["n_layers"] <= 36 and model["d_model"] % 128 == 0
    assert 60 <= model["aspect_ratio"] <= 110


def test_gopher_is_oversized(capsys):
    result = plan_json(capsys, "--preset", "gopher-280b", "--tokens", "300e9")
    gap = result["preset"]
    assert result["flops"] == pytest.approx(6 * gap["params"] * 300e9)
    assert gap["params"] == pytest.approx(280e9, rel=0.01)
    assert gap["params_ratio"] > 3 and gap["tokens_ratio"] < 1 / 3
    assert gap["loss"] > gap["optimal_loss"]
    # Approach 1 (67B at 5.76e23): Gopher is about 4x too large, Chinchilla's point.
    first = plan_json(capsys, "--preset", "gopher-280b", "--tokens", "300e9",
                      "--law", "chinchilla-1")["preset"]
    assert 4 < first["params_ratio"] < 5


def test_gpu_hours_budget_and_wall_clock(capsys):
    result = plan_json(capsys, "--gpu-hours", "1e5", "--device", "h100", "--mfu", "0.45")
    assert result["flops"] == pytest.approx(1e5 * 3600 * 989e12 * 0.45, rel=1e-12)
    assert result["time"]["device"] == "H100 SXM"
    assert result["time"]["device_hours"] == pytest.approx(1e5, rel=1e-12)
    timed = plan_json(capsys, "--flops", "1e21", "--device", "A100", "--mfu", "0.5",
                      "--num-devices", "8")["time"]
    assert timed["wall_seconds"] == pytest.approx(1e21 / (312e12 * 0.5) / 8, rel=1e-12)
    assert plan_json(capsys, "--flops", "1e21")["time"] is None


def test_emitted_config_trains_the_planned_model(capsys, tmp_path):
    path = tmp_path / "plan.yaml"
    result = plan_json(capsys, "--flops", "1e19", "--emit-config", str(path))
    cfg = RunConfig.load(path)
    assert matmul_params(cfg.model) == result["model"]["params"]
    tokens = cfg.train.max_steps * cfg.train.batch_tokens
    assert tokens == pytest.approx(result["model"]["tokens"], rel=0.02)
    assert cfg.train.seq_len == cfg.model.max_seq_len == 2048
    assert cfg.train.schedule == "cosine" and cfg.train.min_lr_ratio == 0.1


def test_a_saved_law_file_is_a_law(capsys, tmp_path):
    law = tmp_path / "law.json"
    law.write_text(json.dumps({"name": "mine", "source": "test", "E": E, "A": A, "B": B,
                               "alpha": ALPHA, "beta": BETA}))
    mine = plan_json(capsys, "--flops", "1e21", "--law", str(law))["optimal"]
    assert mine["params"] == pytest.approx(plan(1e21)["optimal"]["params"], rel=1e-12)


def test_the_text_report_through_the_real_command():
    result = subprocess.run(burrow_command("plan", "--flops", "5.76e23"), capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    for words in ("N_opt", "D_opt", "6 x N_opt x D_opt = 5.76e+23", "chinchilla-1",
                  "approach 3 (chinchilla) predicts", "layers, d_model"):
        assert words in result.stdout


@pytest.mark.parametrize("args, words", [
    (["--flops", "1e9"], ["below the smallest sensible model"]),
    (["--flops", "1e21", "--law", "nope"], ["unknown law", "chinchilla"]),
    (["--gpu-hours", "10", "--device", "tpu9"], ["unknown device", "H100 SXM"]),
    (["--gpu-hours", "10", "--device", "h100", "--mfu", "0"], ["--mfu"]),
    (["--gpu-hours", "10", "--device", "h100", "--mfu", "1.5"], ["--mfu"]),
    (["--flops", "-1"], ["--flops", "positive"]),
    (["--flops", "nan"], ["--flops", "positive"]),
    (["--gpu-hours", "0", "--device", "h100"], ["--gpu-hours", "positive"]),
    (["--gpu-hours", "100"], ["--device"]),
    (["--flops", "1e21", "--gpu-hours", "5", "--device", "h100"], ["one way"]),
    ([], ["one way", "none"]),
    (["--preset", "gopher-280b"], ["--tokens"]),
    (["--preset", "gopher-280b", "--tokens", "-5"], ["--tokens", "positive"]),
    (["--flops", "1e21", "--tokens", "1e9"], ["--preset"]),
    (["--preset", "gopher-1b", "--tokens", "1e9"], ["gopher-1b"]),
    (["--flops", "1e21", "--device", "v100"], ["bf16", "fp16"]),
    (["--flops", "abc"], ["--flops"]),
    (["--flops", "1e21", "--num-devices", "0"], ["--num-devices"]),
    (["--flops", "1e21", "--arch", "gpt"], ["--arch"]),
])
def test_bad_input_is_one_line_and_exit_2(capsys, args, words):
    assert exit_status(["plan", *args]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and error[0].startswith("burrow: error: "), error
    for word in words:
        assert word in error[0], error[0]


def exit_status(argv: list[str]) -> int:
    """main's status, also for usage errors, which argparse raises as SystemExit."""
    try:
        return main(argv)
    except SystemExit as stop:
        return stop.code
