"""The planner's profile of this machine: the fits, the saved-tensor count of a block against
Korthikanti et al.'s formula, the cached JSON and its refusal elsewhere, a plan from measured
inputs, planning from the cache without torch, and collectives timed over two processes."""

import copy
import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch

from burrow.config import ModelConfig
from burrow.errors import UserError
from burrow.parallel.planner import Job, LayerShape, Step, Strategy, layer_cost, search
from burrow.parallel.planner import profile as profiling
from burrow.parallel.planner.costmodel import collective_seconds
from burrow.parallel.planner.layers import block_activation_bytes
from burrow.parallel.planner.measured import (
    Profile,
    fit_alpha_beta,
    fit_line,
    machine,
    model_key,
    profile_path,
    read_cached,
)

TINY = ModelConfig(vocab_size=128, d_model=32, n_layers=2, n_heads=2, max_seq_len=32)
CPU = torch.device("cpu")


def test_alpha_beta_fit_recovers_latency_and_bandwidth():
    latency, bandwidth = 25e-6, 3e9
    sizes = [2.0 ** p for p in range(12, 25, 2)]
    fit = fit_alpha_beta(sizes, [latency + size / bandwidth for size in sizes])
    assert fit.latency == pytest.approx(latency, rel=1e-6)
    assert fit.bandwidth == pytest.approx(bandwidth, rel=1e-6)
    # pure noise (no growth with size): the fastest call, and the largest message's rate
    noisy = fit_alpha_beta([1e3, 1e4, 1e5], [3e-3, 1e-3, 2e-3])
    assert noisy.latency == 1e-3 and noisy.bandwidth == pytest.approx(1e5 / 1e-3)
    assert fit_line([1, 2, 3], [5, 7, 9]).slope == pytest.approx(2)


def saved_per_token(cfg: ModelConfig, checkpointed: bool = False) -> float:
    """Bytes a block keeps per token (float32, CPU), the slope over 1, 2 and 4 sequences."""
    module, prepare = profiling.build_layer("block", cfg, 1, CPU)
    kept = []
    for sequences in (1, 4):
        forward, _ = prepare(sequences, 32)
        kept.append(profiling.saved_bytes(lambda run=forward: run(checkpointed), module, CPU))
    return (kept[1] - kept[0]) / (3 * 32)


def test_saved_tensors_of_a_gelu_block_are_korthikantis_count():
    """Korthikanti et al. 2022, eq. 1, without dropout (burrow's default: no 1-byte masks, so
    34 - 2 = 32 bytes of 16-bit activations per token and unit of width, i.e. 16·h elements),
    with flash attention (no a·s² term): burrow's GELU/LayerNorm block keeps exactly that, plus
    each LayerNorm's mean and inverse deviation (2 x 2) and SDPA's log-sum-exp (one per head)."""
    cfg = dataclasses.replace(TINY, ffn="gelu", norm="layernorm")
    h, a = cfg.d_model, cfg.n_heads
    elements = saved_per_token(cfg) / 4  # float32
    assert elements == 16 * h + 2 * 2 + a
    formula = block_activation_bytes(cfg, 32, flash_attention=True) / 2  # elements in 16-bit
    assert elements / formula == pytest.approx(32 / 34, rel=0.02)


def test_saved_tensors_of_a_swiglu_block_differ_from_the_formula_by_its_mlp():
    """SwiGLU keeps four d_ff-wide tensors (gate, up, silu(gate) and the product that
    down_proj reads) where GELU keeps two 4h ones, and RMSNorm one statistic: 8·h + 4·d_ff +
    2 + a elements per token. At burrow's d_ff = 8/3 h that is 18.7 h against the formula's
    17 h, 10% more; for this tiny block (d_ff rounded up to 88) 1.125 times."""
    h, a, ff = TINY.d_model, TINY.n_heads, TINY.ffn_size
    elements = saved_per_token(TINY) / 4
    assert elements == 8 * h + 4 * ff + 2 + a
    formula = block_activation_bytes(TINY, 32, flash_attention=True) / 2
    assert elements / formula == pytest.approx(1.125, abs=0.01)
    # checkpointed, a block keeps its input alone: h elements per token
    assert saved_per_token(TINY, checkpointed=True) / 4 == h


@pytest.fixture
def quick(monkeypatch):
    """Timings of a few milliseconds: the numbers are not the point here."""
    monkeypatch.setattr(profiling, "RUN_SECONDS", 1e-4)
    monkeypatch.setattr(profiling, "RUNS", 1)


def made_profile(seq_len: int = 32) -> tuple[Profile, str]:
    """A profile of this machine with TINY's layers measured and round-number collectives."""
    entry = profiling.measure_model(TINY, seq_len, 2, CPU, progress=lambda line: None)
    entry["peak_flops"] = 1e10
    key = model_key(TINY, seq_len)
    collectives = {kind: {2: {"fit": {"latency": 1e-4, "bandwidth": 1e9}, "points": []}}
                   for kind in ("all-reduce", "all-gather", "reduce-scatter", "all-to-all",
                                "p2p")}
    return Profile(machine(), "fp32", 8e9, 1, collectives, {key: entry}), key


@pytest.fixture(scope="module")
def tiny_profile() -> tuple[Profile, str]:
    """made_profile() measured once for the tests below (each takes its own copy)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(profiling, "RUN_SECONDS", 1e-4)
        patch.setattr(profiling, "RUNS", 1)
        return made_profile()


def test_profile_round_trip_and_refusal_of_another_machine(tmp_path, tiny_profile):
    profile, key = copy.deepcopy(tiny_profile)
    path = tmp_path / "profile.json"
    profile.save(path)
    again = read_cached(path)
    assert (json.dumps(again.to_dict(), sort_keys=True)
            == json.dumps(profile.to_dict(), sort_keys=True))
    assert again.collectives == profile.collectives  # group sizes are integers again
    assert again.measured(key) == profile.measured(key)
    assert set(again.models[key]["layers"]["block"]) == {"1", "2"}
    elsewhere = json.loads(path.read_text())
    elsewhere["machine"] = {**elsewhere["machine"], "name": "Some Other CPU", "count": 96}
    path.write_text(json.dumps(elsewhere))
    with pytest.raises(UserError, match=r"measured on 96 x Some Other CPU.*re-profile"):
        read_cached(path)


def test_measured_inputs_drive_the_cost_model_and_plan_a_tiny_model(tiny_profile):
    profile, key = copy.deepcopy(tiny_profile)
    inputs = profile.cost_inputs(key, 2)
    assert inputs.memory_bytes == 4e9  # a CPU's RAM, shared by the processes
    block = inputs.measured.layer("block", 2)
    shape = LayerShape("block 0", "block", 10_000, 1.0, 0.0, 0.0, 128.0, 4)
    step = Step(seq_len=32, micro_batch_size=4, micro_batches=1, in_flight=1, devices=2,
                precision="fp32")
    cost = layer_cost(shape, Strategy(tp=2, checkpoint=True), step, inputs)
    assert cost.forward_s >= block.forward(4 * 32)  # plus the TP collectives
    assert collective_seconds("all-reduce", 1e6, 2, False, inputs) == pytest.approx(
        1e-4 + 1e6 / 1e9)
    result = search(Job(TINY, 2, 8, 32, precision="fp32"), inputs)
    assert result.best.predicted_step_s > 0
    assert result.best.world_size == 2


def test_plan_parallel_reads_a_cached_profile_without_torch(tmp_path, quick, tiny_profile,
                                                           monkeypatch):
    """Planning from the cache is arithmetic: the measuring code (torch) is not imported."""
    from burrow import presets

    monkeypatch.setenv("BURROW_CACHE", str(tmp_path))
    cfg = dataclasses.replace(presets.get("micro"))
    entry = profiling.measure_model(dataclasses.replace(cfg, vocab_size=128, max_seq_len=32),
                                    32, 2, CPU, progress=lambda line: None)
    profile, _ = copy.deepcopy(tiny_profile)
    profile.models = {model_key(cfg, 32): {**entry, "peak_flops": 1e10}}
    profile.save(profile_path())
    code = ("import sys\nfrom burrow.cli import main\nstatus = main(sys.argv[1:])\n"
            "print(status, 'torch' in sys.modules, file=sys.stderr)")
    result = subprocess.run([sys.executable, "-c", code, "plan-parallel", "--preset", "micro",
                             "--gpus", "2", "--seq-len", "32", "--global-batch", "256",
                             "--profile", "--json"], capture_output=True, text=True,
                            timeout=120, env={**os.environ, "BURROW_CACHE": str(tmp_path)})
    assert result.stderr.strip().splitlines()[-1] == "0 False", result.stderr
    report = json.loads(result.stdout)
    assert report["job"]["measured"] and report["job"]["precision"] == "fp32"


def test_collectives_over_two_processes_fit_a_positive_bandwidth():
    from burrow.parallel.planner.collectives import measure_collectives

    found = measure_collectives([2], "cpu", progress=lambda line: None,
                                sizes=(2 ** 12, 2 ** 16, 2 ** 20))
    assert set(found) == {"all-reduce", "all-gather", "reduce-scatter", "all-to-all", "p2p"}
    for groups in found.values():
        assert groups[2]["fit"]["bandwidth"] > 0 and groups[2]["fit"]["latency"] >= 0
        assert [point[0] for point in groups[2]["points"]] == [2 ** 12, 2 ** 16, 2 ** 20]
