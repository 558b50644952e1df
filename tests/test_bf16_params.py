"""bfloat16 parameters updated with stochastic rounding (Gopher 7.1B and 280B, Rae et al. 2021
§3): the rounding is unbiased and lands on the two neighbours, keeps updates that rounding to
nearest loses, and a run with bf16 parameters learns, keeps float32 moments and resumes exactly."""

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch import nn

from burrow import TrainConfig, UserError, load_run
from burrow.cli import main
from burrow.train import train
from burrow.train.checkpoint import latest_checkpoint
from burrow.train.optim import build_optimizer
from burrow.train.stochastic_rounding import stochastic_round
from burrow.train.trainer import Trainer
from conftest import tiny_run_config


def bf16_neighbours(x: float) -> tuple[float, float]:
    """The bf16 values either side of x, from bf16's 8 significant bits: in the binade
    [2^e, 2^(e+1)) they lie 2^(e-7) apart."""
    spacing = 2.0 ** (math.floor(math.log2(abs(x))) - 7)
    below = math.floor(x / spacing) * spacing
    return below, below + spacing


@pytest.mark.parametrize("x", [1 + 0.3 * 2**-7, -(2**-10) * (1 + 0.7 * 2**-7), 3e-3, -51.9])
def test_stochastic_rounding_is_unbiased_and_lands_on_the_two_neighbours(x):
    below, above = bf16_neighbours(x)
    n = 200_000
    generator = torch.Generator().manual_seed(0)
    rounded = stochastic_round(torch.full((n,), x, dtype=torch.float32), generator)
    assert rounded.dtype == torch.bfloat16
    values = rounded.double()
    assert set(values.unique().tolist()) == {below, above}
    # P(above) = (x - below) / (above - below): a binomial mean, checked to 5 standard errors
    p = (x - below) / (above - below)
    standard_error = (above - below) * math.sqrt(p * (1 - p) / n)
    assert abs(values.mean().item() - x) < 5 * standard_error


def test_values_already_in_bf16_are_kept():
    x = torch.randn(10_000).to(torch.bfloat16)
    assert torch.equal(stochastic_round(x.float()), x)
    infinite = torch.tensor([float("inf"), float("-inf")])
    assert torch.equal(stochastic_round(infinite).float(), infinite)


class Vector(nn.Module):
    """One bf16 vector of ones: 4,096 copies of the same scalar problem."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(4096, dtype=torch.bfloat16))


@pytest.mark.parametrize("optimizer", ["adamw", "adafactor"])
def test_updates_below_half_an_ulp_move_the_parameter_in_expectation(optimizer):
    """lr 1e-3 on weights of 1: each step moves a weight by 1e-3 (AdamW: lr * m / sqrt(v) with
    a constant gradient; Adafactor: lr * RMS(weights), its parameter scaling), half the gap of
    2^-8 below 1 being 1.95e-3. Rounding to nearest (the optimiser on bf16 weights) loses every
    step; stochastic rounding keeps them in expectation."""
    lr, steps = 1e-3, 10
    expected = 1 - steps * lr if optimizer == "adamw" else (1 - lr) ** steps
    means = {}
    for param_dtype in ("fp32", "bf16"):  # fp32: plain AdamW/Adafactor on bf16 weights
        torch.manual_seed(0)
        model = Vector()
        cfg = TrainConfig(optimizer=optimizer, lr=lr, beta1=0.0, weight_decay=0.0,
                          param_dtype=param_dtype)
        opt = build_optimizer(model, cfg)
        for _ in range(steps):
            model.weight.grad = torch.ones_like(model.weight)
            opt.step()
            opt.zero_grad(set_to_none=True)
        assert model.weight.dtype == torch.bfloat16
        means[param_dtype] = model.weight.double().mean().item()
        if param_dtype == "bf16":
            assert all(state.dtype == torch.float32 for state in opt.state[model.weight].values()
                       if state.dim() > 0)
    assert means["fp32"] == 1.0  # round to nearest: ten updates lost
    # each weight ends within a few gaps of 2^-8 of its mean; 4,096 of them average out
    assert means["bf16"] == pytest.approx(expected, abs=5e-4)
    assert means["bf16"] < 1 - 0.5 * steps * lr


def test_bad_settings_are_one_line_errors():
    for fields, message in [({"param_dtype": "fp16"}, "is not one of fp32, bf16"),
                            ({"param_dtype": "bf16", "precision": "fp32"}, "computes in bf16"),
                            ({"param_dtype": "bf16", "parallel": "fsdp"}, "none or ddp")]:
        with pytest.raises(UserError, match=message) as caught:
            TrainConfig(**fields)
        assert "\n" not in str(caught.value)


def losses_of(run_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [row["loss"] for row in rows if row["split"] == "train"]


@pytest.fixture(scope="module")
def bf16_run(tmp_path_factory) -> tuple:
    """Twelve steps of a micro model with bf16 parameters, on the CPU (bf16 emulated)."""
    cfg = tiny_run_config(max_steps=12, param_dtype="bf16")
    run_dir = tmp_path_factory.mktemp("bf16") / "run"
    train(cfg, run_dir, verbose=False)
    return cfg, run_dir


def test_a_run_with_bf16_parameters_learns_and_keeps_float32_moments(bf16_run):
    _, run_dir = bf16_run
    losses = losses_of(run_dir)
    assert len(losses) == 12 and losses[-1] < losses[0] - 0.2
    checkpoint = latest_checkpoint(run_dir)
    with safe_open(checkpoint / "model.safetensors", framework="pt") as weights:
        names = weights.keys()
        saved = {name: weights.get_tensor(name) for name in names}
    assert {tensor.dtype for tensor in saved.values()} == {torch.bfloat16}
    moments = torch.load(checkpoint / "optimizer.pt", weights_only=True)["state"]
    assert {name: state["exp_avg"].dtype for name, state in moments.items()} == {
        name: torch.float32 for name in saved}


def test_eval_and_generate_read_a_bf16_run(bf16_run, capsys):
    _, run_dir = bf16_run
    model, _, _ = load_run(run_dir)  # evaluated in float32: the bf16 values, widened
    with safe_open(latest_checkpoint(run_dir) / "model.safetensors", framework="pt") as weights:
        for name, parameter in model.named_parameters():
            assert torch.equal(parameter, weights.get_tensor(name).float()), name
    assert main(["eval", str(run_dir), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["loss"] < losses_of(run_dir)[0]
    assert main(["generate", str(run_dir), "--prompt", "def ", "--max-new-tokens", "5"]) == 0


def test_stopping_and_resuming_gives_bit_identical_losses(bf16_run, tmp_path, monkeypatch):
    cfg, straight = bf16_run
    original = Trainer.train_step

    def stop_after_five(self):  # a signal during step 5: the loop finishes it, saves, stops
        result = original(self)
        if self.step == 5:
            self._on_signal(2, None)
        return result

    monkeypatch.setattr(Trainer, "train_step", stop_after_five)
    assert train(cfg, tmp_path / "stopped", verbose=False)["step"] == 5
    monkeypatch.setattr(Trainer, "train_step", original)
    assert train(cfg, tmp_path / "stopped", resume=True, verbose=False)["step"] == 12
    assert losses_of(tmp_path / "stopped") == losses_of(straight)  # exactly
