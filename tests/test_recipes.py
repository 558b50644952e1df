"""The papers' training recipes (burrow/recipes.py), PaLM's Adafactor (train/adafactor.py) and
the per-step hyperparameters: each value against the paper, each formula against an
independent implementation written here."""

import json
import math

import numpy as np
import pytest
import torch

from burrow import TrainConfig, UserError, recipes
from burrow.cli import build_parser, main
from burrow.commands import run_config_from_args
from burrow.train.adafactor import Adafactor
from burrow.train.optim import apply_schedule, build_optimizer, learning_rate

# Gopher, Table 1 (Rae et al. 2021): maximum learning rate and batch size in tokens; §3:
# clipping at 1.0, at 0.25 for the 7.1B model and Gopher; bfloat16 parameters for both.
GOPHER_TABLE_1 = {
    "gopher-44m": (6e-4, 0.25e6, 1.0), "gopher-117m": (6e-4, 0.25e6, 1.0),
    "gopher-417m": (2e-4, 0.25e6, 1.0), "gopher-1.4b": (2e-4, 0.25e6, 1.0),
    "gopher-7.1b": (1.2e-4, 2e6, 0.25), "gopher-280b": (4e-5, 3e6, 0.25),
}


@pytest.mark.parametrize("name", sorted(GOPHER_TABLE_1))
def test_gopher_rows_are_table_1(name):
    lr, batch, clip = GOPHER_TABLE_1[name]
    recipe = recipes.get(name)
    assert recipe.train["lr"] == lr and recipe.train["grad_clip"] == clip
    # Table 1 rounds: 0.25M is 128 x 2,048 tokens, 2M 1,024 x 2,048, 3M 1,536 x 2,048
    assert recipe.batch_tokens % 2048 == 0 and abs(recipe.batch_tokens / batch - 1) < 0.05
    assert recipe.train["optimizer"] == "adamw" and recipe.train["weight_decay"] == 0.0  # Adam
    assert recipe.train["warmup_steps"] == 1500 and recipe.train["warmup_init_lr"] == 1e-7
    assert recipe.train["schedule"] == "cosine" and recipe.train["min_lr_ratio"] == 0.1
    assert recipe.parameters == ("bf16" if name in ("gopher-7.1b", "gopher-280b") else "fp32")


def test_gopher_280b_and_chinchilla_double_their_batch_halfway_through_their_tokens():
    for name, first, tokens in (("gopher-280b", 3 * 2 ** 20 * 1.0, 300e9),
                                ("chinchilla-70b", 1.5 * 2 ** 20, 1.4e12)):
        recipe = recipes.get(name)
        (step, multiple), = recipe.ramp
        assert multiple == 2
        assert step * recipe.batch_tokens == pytest.approx(tokens / 2, rel=1e-4)
        after = (recipe.steps - step) * recipe.batch_tokens * 2
        assert after == pytest.approx(tokens / 2, rel=1e-4)
        assert recipe.batch_tokens == pytest.approx(first, rel=0.05)
    chinchilla = recipes.get("chinchilla-70b")
    assert chinchilla.train["lr"] == 1e-4 and chinchilla.train["optimizer"] == "adamw"


def test_the_gopher_family_picks_the_row_nearest_the_model():
    assert recipes.get("gopher", 40e6).name == "gopher-44m"
    assert recipes.get("gopher", 1.84e6).name == "gopher-44m"
    assert recipes.get("gopher", 1e9).name == "gopher-1.4b"
    assert recipes.get("gopher", 300e9).name == "gopher-280b"


def test_palm_learning_rate_beta2_weight_decay_and_batch_at_chosen_steps():
    """PaLM §5: 1e-2 for 10k steps then 1/sqrt(k); beta2 = 1 - k^-0.8; decay lr^2; batch 512
    sequences until step 50k, 1,024 until 115k, then 2,048."""
    recipe = recipes.get("palm")
    cfg = TrainConfig(max_steps=255_000, **recipe.train)
    for k in (1, 5_000, 10_000, 20_000, 115_000, 255_000):
        expected = 1e-2 if k <= 10_000 else 1 / math.sqrt(k)
        assert learning_rate(k, cfg) == pytest.approx(expected, rel=1e-12)
    assert recipe.batch_tokens == 512 * 2048
    assert recipe.ramp == ((50_000, 2), (115_000, 4))
    assert recipe.model == {"z_loss": 1e-4, "dropout": 0.0}
    assert cfg.beta2_decay == 0.8 and cfg.beta1 == 0.9 and cfg.grad_clip == 1.0
    assert cfg.weight_decay_lr_power == 2.0


def naive_adafactor(theta, grads, lrs, beta1=0.9, decay_rates=None):
    """Shazeer & Stern 2018, unfactored, momentum on the scaled update, written elementwise."""
    theta = np.array(theta, dtype=np.float64)
    v = np.zeros_like(theta)
    m = np.zeros_like(theta)
    for t, (g, lr) in enumerate(zip(grads, lrs), start=1):
        beta2 = 1 - t ** -0.8
        v = beta2 * v + (1 - beta2) * (g * g + 1e-30)
        u = g / np.sqrt(v)
        u = u / max(1.0, math.sqrt(np.mean(u * u)) / 1.0)
        scale = max(1e-3, math.sqrt(np.mean(theta * theta)))
        m = beta1 * m + (1 - beta1) * scale * lr * u
        decay = 0.0 if decay_rates is None else decay_rates[t - 1]
        theta = theta - m - decay * theta
    return theta


def test_adafactor_matches_the_algorithm_written_out():
    rng = np.random.default_rng(0)
    theta0 = rng.normal(size=(6, 5)) * 0.2
    grads = [rng.normal(size=(6, 5)) for _ in range(6)]
    lrs = [1e-2, 1e-2, 8e-3, 5e-3, 5e-3, 2e-3]
    for beta1 in (0.9, 0.0):
        parameter = torch.nn.Parameter(torch.tensor(theta0, dtype=torch.float64))
        optimizer = Adafactor([parameter], beta1=beta1)
        for g, lr in zip(grads, lrs):
            optimizer.param_groups[0]["lr"] = lr
            parameter.grad = torch.tensor(g)
            optimizer.step()
        expected = naive_adafactor(theta0, grads, lrs, beta1=beta1)
        np.testing.assert_allclose(parameter.detach().numpy(), expected, rtol=1e-10)


def test_update_clipping_caps_the_rms_of_an_update():
    """At step 1 beta2 = 0, so u = g/|g| elementwise has RMS 1: never clipped; a parameter of
    zeros moves by eps2 * lr * (1 - beta1) per element, the floor of the parameter scale."""
    parameter = torch.nn.Parameter(torch.zeros(4, 4, dtype=torch.float64))
    optimizer = Adafactor([parameter], lr=1e-2)
    parameter.grad = torch.full((4, 4), 7.0, dtype=torch.float64)
    optimizer.step()
    assert torch.allclose(parameter, torch.full((4, 4), -1e-3 * 1e-2 * 0.1, dtype=torch.float64))


def test_palm_weight_decay_is_lr_squared_for_both_optimisers():
    """With no gradient signal (a zero gradient) only the decay moves a matrix: by lr^2."""
    model = torch.nn.Linear(4, 3, bias=True)
    for name in ("adamw", "adafactor"):
        cfg = TrainConfig(optimizer=name, lr=1e-2, schedule="rsqrt", warmup_steps=10,
                          weight_decay=0.0, weight_decay_lr_power=2.0)
        weight = model.weight.detach().clone()
        bias = model.bias.detach().clone()
        optimizer = build_optimizer(model, cfg)
        for step in (0, 40):
            lr = apply_schedule(optimizer, step, cfg)
            model.weight.grad = torch.zeros_like(model.weight)
            model.bias.grad = torch.zeros_like(model.bias)
            before = model.weight.detach().clone()
            optimizer.step()
            assert torch.allclose(model.weight, before * (1 - lr ** 2), atol=1e-12), name
        assert lr == pytest.approx(1e-2 * math.sqrt(10 / 40))
        assert torch.equal(model.bias, bias)  # vectors are not decayed
        with torch.no_grad():
            model.weight.copy_(weight)


def test_scaling_keeps_fractions_of_the_run_and_multiples_of_the_batch():
    palm = recipes.get("palm")
    scaled = recipes.scale(palm, batch_tokens=4096, max_steps=2550, granularity=4096)
    assert scaled.train["warmup_steps"] == 100  # 10,000 of 255,000 steps = 100 of 2,550
    assert scaled.train["batch_ramp"] == "500:8192,1150:16384"
    assert scaled.train["lr"] == 1e-2 and scaled.model["z_loss"] == 1e-4
    kept = recipes.scale(palm, batch_tokens=4096, max_steps=2550, granularity=4096,
                         keep=frozenset({"lr", "model.z_loss"}))
    assert "lr" not in kept.train and "z_loss" not in kept.model


def args_of(*argv):
    return build_parser().parse_args(["train", *argv])


def test_train_recipe_sets_the_fields_and_flags_still_win(tmp_path, capsys):
    cfg, _ = run_config_from_args(args_of("--preset", "nano", "--recipe", "gopher",
                                          "--out", str(tmp_path / "a"), "--max-steps", "1000"))
    assert cfg.recipe == "gopher-44m"
    assert (cfg.train.lr, cfg.train.weight_decay, cfg.train.warmup_steps) == (6e-4, 0.0, 1)
    assert "gopher-44m" in capsys.readouterr().err
    cfg, _ = run_config_from_args(args_of("--preset", "nano", "--recipe", "gopher",
                                          "--out", str(tmp_path / "b"), "--lr", "1e-3",
                                          "--set", "train.grad_clip=0.5"))
    assert cfg.train.lr == 1e-3 and cfg.train.grad_clip == 0.5
    assert cfg.train.weight_decay == 0.0  # the recipe's, where no flag says otherwise


def test_an_unknown_recipe_is_one_line_with_suggestions(tmp_path, capsys):
    assert main(["train", "--recipe", "palmm", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert "unknown recipe 'palmm'" in err and "palm" in err and "\n" not in err
    with pytest.raises(UserError):
        recipes.get("gopher-1b")


def test_presets_recipes_lists_every_recipe_as_json(capsys):
    assert main(["presets", "--recipes", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["recipes"]
    assert [row["name"] for row in rows] == [r.name for r in recipes.RECIPES]
    palm = next(row for row in rows if row["name"] == "palm")
    assert palm["optimizer"] == "adafactor" and palm["weight_decay"] == "lr^2"


def test_the_switch_recipe_sets_switchs_model_fields_and_skips_them_on_a_dense_model(tmp_path):
    cfg, _ = run_config_from_args(args_of("--preset", "switch-nano", "--recipe", "switch",
                                          "--out", str(tmp_path / "s")))
    assert cfg.model.init == "switch" and cfg.model.moe.jitter == 0.01
    assert cfg.model.moe.router_z_loss == 0.0  # ST-MoE's addition, not Switch's
    assert (cfg.model.moe.capacity_factor, cfg.model.moe.balance_loss) == (1.25, 0.01)
    assert (cfg.train.optimizer, cfg.train.schedule, cfg.train.beta1) == ("adafactor", "rsqrt", 0)
    dense, _ = run_config_from_args(args_of("--preset", "nano", "--recipe", "switch",
                                            "--out", str(tmp_path / "d")))
    assert dense.model.init == "switch" and not dense.model.moe.enabled
    assert dense.model.moe.jitter == 0.0  # no experts: the moe fields are left alone


def test_gopher_7b_keeps_bf16_parameters_on_cuda_and_says_why_not_elsewhere():
    recipe = recipes.get("gopher-7.1b")
    on_gpu = recipes.scale(recipe, batch_tokens=4096, max_steps=100, granularity=4096,
                           device_type="cuda")
    assert on_gpu.train["param_dtype"] == "bf16"
    on_cpu = recipes.scale(recipe, batch_tokens=4096, max_steps=100, granularity=4096)
    assert "param_dtype" not in on_cpu.train and any("float32" in line for line in on_cpu.lines)
    sharded = recipes.scale(recipe, batch_tokens=4096, max_steps=100, granularity=4096,
                            device_type="cuda", sharded=True)
    assert "param_dtype" not in sharded.train
    small = recipes.scale(recipes.get("gopher-44m"), batch_tokens=4096, max_steps=100,
                          granularity=4096, device_type="cuda")
    assert "param_dtype" not in small.train
