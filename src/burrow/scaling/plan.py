"""Compute-optimal planning: from a budget to N_opt, D_opt, a model to train and its wall clock.

The budget is training FLOPs C = 6ND (Kaplan et al. 2020, §2.1; Hoffmann et al. 2022, §3),
given as FLOPs, as device-hours (hours x 3600 x peak FLOP/s x MFU, the peak from
`flops.PEAK_FLOPS`), or as what a preset trained on some tokens spent. The law (default
Chinchilla's approach 3) gives N_opt and D_opt = C / (6 N_opt); `shapes.choose_shape` gives the
nearest sensible architecture, and a run config for it can be written out.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from burrow import presets
from burrow.config import ModelConfig, RunConfig, TrainConfig
from burrow.errors import UserError
from burrow.flops import flops_per_token, matmul_params
from burrow.scaling.laws import ScalingLaw, get_law, law_names
from burrow.scaling.shapes import choose_shape

SECONDS_PER_HOUR = 3600.0
# Context of the planned model: Gopher's and Chinchilla's 2048 tokens (Rae et al. 2021, §3).
PLAN_SEQ_LEN = 2048


@dataclass(frozen=True)
class Hardware:
    """A device from the peak table at a precision and an assumed MFU."""

    # PEAK_FLOPS key, e.g. "H100 SXM".
    device: str
    # "bf16", "fp16", "tf32" or "fp32".
    precision: str
    # Datasheet peak FLOP/s of one device at that precision.
    peak_flops: float
    # Model FLOPs utilization assumed (PaLM §4.1 reached 46.2% on TPU v4).
    mfu: float

    @property
    def flops_per_second(self) -> float:
        """Useful FLOP/s of one device: peak x MFU."""
        return self.peak_flops * self.mfu


def hardware(device: str, *, precision: str = "bf16", mfu: float = 0.4) -> Hardware:
    """The device called `device` ("h100", "A100", "tpu v4", ...) with its peak FLOP/s."""
    from burrow.train.hardware import PEAK_FLOPS, device_family  # torch: only with a device

    family = device_family(device)
    if family is None:
        raise UserError(f"unknown device {device!r}; known: {', '.join(PEAK_FLOPS)}")
    if not (math.isfinite(mfu) and 0 < mfu <= 1):
        raise UserError(f"--mfu is a fraction of the peak in (0, 1], got {mfu} (PaLM reached "
                        "0.462)")
    peak = PEAK_FLOPS[family].get(precision)
    if peak is None:
        raise UserError(f"{family} has no {precision} peak in the table; use --precision "
                        f"{' or '.join(PEAK_FLOPS[family])}")
    return Hardware(family, precision, peak, mfu)


def _positive(value: float, what: str) -> float:
    if not (math.isfinite(value) and value > 0):
        raise UserError(f"{what} must be a positive number, got {value}")
    return value


def budget(*, flops: float | None = None, gpu_hours: float | None = None,
           preset: str | None = None, tokens: float | None = None,
           device: Hardware | None = None) -> dict[str, Any]:
    """The compute budget in FLOPs from exactly one of its three forms, and how it was given."""
    given = [name for name, value in (("--flops", flops), ("--gpu-hours", gpu_hours),
                                      ("--preset", preset)) if value is not None]
    if len(given) != 1:
        raise UserError("give the budget one way: --flops C, --gpu-hours H --device NAME, or "
                        f"--preset NAME --tokens D (got {' and '.join(given) or 'none'})")
    if tokens is not None and preset is None:
        raise UserError("--tokens goes with --preset: the budget is 6 x the preset's "
                        "parameters x the tokens")
    if flops is not None:
        return {"flops": _positive(flops, "--flops"), "given_as": "flops"}
    if gpu_hours is not None:
        _positive(gpu_hours, "--gpu-hours")
        if device is None:
            raise UserError("--gpu-hours needs --device (e.g. --device h100) to know the peak "
                            "FLOP/s")
        flops = gpu_hours * SECONDS_PER_HOUR * device.flops_per_second
        return {"flops": flops, "given_as": "gpu_hours", "gpu_hours": gpu_hours}
    if tokens is None:
        raise UserError(f"--preset {preset} needs --tokens D, the tokens it is trained on "
                        "(Gopher: --tokens 300e9)")
    _positive(tokens, "--tokens")
    cfg = presets.get(preset)
    n_params = matmul_params(cfg)
    return {"flops": 6.0 * n_params * tokens, "given_as": "preset", "preset": preset,
            "params": n_params, "tokens": tokens,
            # PaLM appendix B's count, attention included, at the preset's context.
            "flops_with_attention": flops_per_token(cfg) * tokens}


def _law_summary(law: ScalingLaw) -> dict[str, Any]:
    a, b = law.exponents()
    return {**law.to_dict(), "exponent_a": a, "exponent_b": b,
            "loss_from": law.name if law.parametric or law.form == "kaplan" else law.loss_law}


def optimum(law: ScalingLaw, flops: float) -> dict[str, Any]:
    """N_opt, D_opt, tokens per parameter and predicted loss of `law` at `flops`."""
    n_opt, d_opt = law.optimal(flops)
    a, b = law.exponents()
    return {"law": law.name, "params": n_opt, "tokens": d_opt, "tokens_per_param": d_opt / n_opt,
            "loss": law.loss(n_opt, d_opt), "exponent_a": a, "exponent_b": b,
            "flops_check": 6.0 * n_opt * d_opt}


def compare_laws(flops: float) -> list[dict[str, Any]]:
    """`optimum` of every built-in law at one budget, default law first."""
    return [optimum(get_law(name), flops) for name in law_names()]


def describe_model(cfg: ModelConfig, flops: float, arch: str) -> dict[str, Any]:
    """The chosen architecture, its counts, and the tokens that spend the budget on it."""
    n_params = matmul_params(cfg)
    return {"arch": arch, "n_layers": cfg.n_layers, "d_model": cfg.d_model,
            "n_heads": cfg.n_heads, "head_dim": cfg.head_size, "d_ff": cfg.ffn_size,
            "vocab_size": cfg.vocab_size, "aspect_ratio": cfg.d_model / cfg.n_layers,
            "params": n_params, "total_params": cfg.num_params(),
            "tokens": flops / (6.0 * n_params), "config": dataclasses.asdict(cfg)}


def wall_clock(flops: float, device: Hardware, num_devices: int) -> dict[str, Any]:
    """Device-hours and wall-clock time of `flops` at the device's peak x MFU."""
    hours = flops / device.flops_per_second / SECONDS_PER_HOUR
    return {"device": device.device, "precision": device.precision,
            "peak_flops": device.peak_flops, "mfu": device.mfu, "device_hours": hours,
            "num_devices": num_devices, "wall_seconds": hours / num_devices * SECONDS_PER_HOUR}


def preset_gap(spent: dict[str, Any], law: ScalingLaw) -> dict[str, Any]:
    """How far a preset trained on `tokens` is from the law's optimum at the same budget."""
    n_params, tokens = spent["params"], spent["tokens"]
    n_opt, d_opt = law.optimal(spent["flops"])
    return {"name": spent["preset"], "params": n_params, "tokens": tokens,
            "params_ratio": n_params / n_opt, "tokens_ratio": tokens / d_opt,
            "tokens_per_param": tokens / n_params, "loss": law.loss(n_params, tokens),
            "optimal_params": n_opt, "optimal_tokens": d_opt,
            "optimal_loss": law.loss(n_opt, d_opt)}


def plan(flops: float, *, law: str = "chinchilla", arch: str = "llama", vocab_size: int = 32_000,
         device: Hardware | None = None, num_devices: int = 1) -> dict[str, Any]:
    """The compute-optimal plan for `flops` FLOPs under `law`, as a JSON-able dict."""
    chosen = get_law(law)
    best = optimum(chosen, flops)
    if best["tokens"] < PLAN_SEQ_LEN:
        raise UserError(f"a budget of {flops:.3g} FLOPs gives D_opt = {best['tokens']:.3g} "
                        f"tokens, less than one sequence of {PLAN_SEQ_LEN}; raise the budget")
    if num_devices < 1:
        raise UserError(f"--num-devices must be at least 1, got {num_devices}")
    cfg = choose_shape(best["params"], vocab_size=vocab_size, max_seq_len=PLAN_SEQ_LEN, arch=arch)
    return {"flops": flops, "law": _law_summary(chosen), "optimal": best,
            "model": describe_model(cfg, flops, arch),
            "time": wall_clock(flops, device, num_devices) if device else None,
            "laws": compare_laws(flops)}


def batch_and_lr(flops: float) -> tuple[float, float]:
    """Starting batch size (tokens) and peak learning rate for a budget: DeepSeek LLM's fits
    (Bi et al. 2024, §3.1, eq. 1): B_opt = 0.2920 C^0.3271, eta_opt = 0.3118 C^-0.1250."""
    return 0.2920 * flops**0.3271, 0.3118 * flops**-0.1250


def run_config(result: dict[str, Any], *, data: str = "stdlib", batch_tokens: int | None = None,
               micro_batch_size: int | None = None) -> RunConfig:
    """A RunConfig that trains the planned model on its share of the budget.

    The batch is `batch_tokens` (a parallel plan's global batch) or else DeepSeek's B_opt
    rounded to a power-of-two number of 2048-token sequences; max_steps spends the tokens of
    `describe_model`; cosine decay to 10% over the whole run (Chinchilla §3.2 and Appendix D:
    the cycle matched to the training tokens), warmup 1500 steps as Gopher (Rae et al. 2021,
    Appendix C) or 5% of the run when that is shorter.
    """
    model = ModelConfig(**result["model"]["config"])
    batch, lr = batch_and_lr(result["flops"])
    if batch_tokens is None:
        batch_tokens = 2 ** max(0, round(math.log2(batch / PLAN_SEQ_LEN))) * PLAN_SEQ_LEN
    sequences = batch_tokens // PLAN_SEQ_LEN
    steps = max(1, round(result["model"]["tokens"] / batch_tokens))
    train = TrainConfig(max_steps=steps, batch_tokens=batch_tokens, seq_len=PLAN_SEQ_LEN,
                        micro_batch_size=micro_batch_size or min(sequences, 8),
                        lr=float(f"{lr:.2g}"),
                        warmup_steps=min(1500, max(1, steps // 20)), schedule="cosine",
                        min_lr_ratio=0.1, eval_every=max(1, steps // 20),
                        save_every=max(1, steps // 20))
    cfg = RunConfig(model=model, train=train, preset=f"plan-{result['law']['name']}")
    cfg.data.source = data
    return cfg
