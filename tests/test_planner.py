"""The Galvatron planner: its cost model against hand arithmetic, its dynamic programme against
exhaustive search, its plans against uniform ones, plan files, mistakes, and the verb."""

import dataclasses
import json
import time

import numpy as np
import pytest

from burrow import presets
from burrow.cli import main
from burrow.config import ModelConfig
from burrow.errors import UserError
from burrow.parallel.planner import (
    CostInputs,
    Job,
    LayerShape,
    Plan,
    Step,
    Strategy,
    get_hardware,
    layer_cost,
    model_layers,
    search,
)
from burrow.parallel.planner.costmodel import collective_seconds, overlapped, transition_seconds
from burrow.parallel.planner.plan import layer_names, model_fingerprint
from burrow.parallel.planner.search import solve_stage
from burrow.parallel.planner.stages import balanced_split, candidates, configure, evaluate

# Round numbers so that every expected value below can be checked by hand.
INPUTS = CostInputs(gpus_per_node=8, memory_bytes=80e9, flops_per_second=500e12,
                    intra_node_bandwidth=400e9, inter_node_bandwidth=50e9,
                    intra_node_latency=1e-5, inter_node_latency=2e-5, overlap_slowdown=1.5)
SMALL = ModelConfig(vocab_size=32_000, d_model=256, n_layers=4, n_heads=4, max_seq_len=256)
# A big vocabulary on small blocks: the embedding and the head dominate memory.
WIDE_VOCAB = ModelConfig(vocab_size=256_000, d_model=512, n_layers=4, n_heads=8,
                         max_seq_len=1024)


def shape(params=1_000_000, flops=0.0, activation=0.0, checkpoint=0.0, boundary=512.0):
    return LayerShape("block 0", "block", params, flops, activation, checkpoint, boundary, 4)


def test_hardware_names_are_case_insensitive_and_unknown_ones_are_listed():
    assert get_hardware("H100").name == get_hardware("h100 SXM").name == "H100 SXM"
    assert get_hardware("A100-40GB").memory_bytes == 40e9
    with pytest.raises(UserError, match="known: h100, h200, a100"):
        get_hardware("tpu v4")


def test_collectives_follow_the_alpha_beta_ring_model():
    # all-reduce over 4 GPUs in a node: 2(n-1) steps, 2(n-1)/n of the bytes through each link
    assert collective_seconds("all-reduce", 1e9, 4, False, INPUTS) == pytest.approx(
        6 * 1e-5 + 1.5 * 1e9 / 400e9)
    # all-gather over 16 GPUs across nodes: n-1 steps, (n-1)/n of the gathered bytes
    assert collective_seconds("all-gather", 1e9, 16, True, INPUTS) == pytest.approx(
        15 * 2e-5 + 15 / 16 * 1e9 / 50e9)
    assert collective_seconds("p2p", 1e6, 2, True, INPUTS) == pytest.approx(2e-5 + 1e6 / 50e9)
    assert collective_seconds("reduce-scatter", 1e9, 1, False, INPUTS) == 0


def test_model_states_under_zero3_and_tensor_parallelism():
    step = Step(seq_len=128, micro_batch_size=8, micro_batches=1, in_flight=1, devices=8)
    # Adam in mixed precision: 16 bytes per parameter, split by the ZeRO-3 degree and by TP.
    assert layer_cost(shape(), Strategy(dp_shard=4), step, INPUTS).memory_bytes == 4e6
    assert layer_cost(shape(), Strategy(tp=2, dp_shard=4), step, INPUTS).memory_bytes == 2e6
    assert layer_cost(shape(), Strategy(dp_replicate=4), step, INPUTS).memory_bytes == 16e6


def test_activations_per_gpu_follow_tp_checkpointing_and_micro_batches_in_flight():
    step = Step(seq_len=128, micro_batch_size=8, micro_batches=4, in_flight=3, devices=4)
    layer = shape(params=0, activation=100.0, checkpoint=10.0)
    # dp 2: each TP group takes 4 sequences (512 tokens); sequence parallelism leaves each of
    # its 2 GPUs 256 tokens; 3 micro-batches are in flight.
    assert layer_cost(layer, Strategy(tp=2, dp_replicate=2), step, INPUTS).memory_bytes == (
        3 * 100 * 256)
    assert layer_cost(layer, Strategy(tp=2, dp_replicate=2, checkpoint=True), step,
                      INPUTS).memory_bytes == 3 * 10 * 256


def test_block_activations_are_korthikanti_et_al():
    cfg = presets.get("gopher-1.4b")
    h, a, s = cfg.d_model, cfg.n_heads, 2048
    block = model_layers(cfg, s, flash_attention=False)[1]
    assert block.activation_bytes_per_token == 34 * h + 5 * a * s  # s·b·h(34 + 5as/h) / (s·b)
    assert model_layers(cfg, s)[1].activation_bytes_per_token == 34 * h  # no s² scores
    assert model_layers(cfg, s, precision="fp32")[1].activation_bytes_per_token == 68 * h
    assert block.checkpoint_bytes_per_token == 2 * h


def test_compute_data_parallel_sync_and_fsdp_gathers():
    step = Step(seq_len=100, micro_batch_size=4, micro_batches=2, in_flight=1, devices=4)
    layer = shape(params=50_000_000, flops=1e9)
    # data-parallel degree 4: one sequence of 100 tokens per GPU; backward twice the forward
    forward, backward = 1e9 * 100 / 500e12, 2 * 1e9 * 100 / 500e12
    ddp = layer_cost(layer, Strategy(dp_replicate=4), step, INPUTS)
    assert (ddp.forward_s, ddp.backward_s) == pytest.approx((forward, backward))
    # DDP all-reduces the bf16 gradients once a step, behind the last backward pass
    all_reduce = collective_seconds("all-reduce", 50e6 * 2, 4, False, INPUTS)
    assert ddp.sync_s == pytest.approx(overlapped(backward, all_reduce, 1.5) - backward)
    assert overlapped(1.0, 3.0, 1.5) == 3.5 and overlapped(0.0, 3.0, 1.5) == 3.0
    # FSDP: the forward's all-gather is exposed, the backward's gather and reduce-scatter hide
    fsdp = layer_cost(layer, Strategy(dp_shard=4), step, INPUTS)
    gather = collective_seconds("all-gather", 50e6 * 2, 4, False, INPUTS)
    assert fsdp.forward_s == pytest.approx(forward + gather)
    assert fsdp.backward_s == pytest.approx(overlapped(backward, 2 * gather, 1.5))
    assert fsdp.sync_s == 0
    # TP 2 x DP 2: two sequences (200 tokens) per TP group, half the work on each GPU, 4
    # all-gathers or reduce-scatters of the group's activation each way; checkpointing reruns
    # the forward, its collectives included, in the backward pass
    tp = layer_cost(layer, Strategy(tp=2, dp_replicate=2, checkpoint=True), step, INPUTS)
    activation = 4 * collective_seconds("all-gather", 200 * 512, 2, False, INPUTS)
    assert tp.forward_s == pytest.approx(forward + activation)
    assert tp.backward_s == pytest.approx(3 * forward + 2 * activation)


def test_changing_tp_degree_costs_an_all_to_all_of_the_activation():
    step = Step(seq_len=100, micro_batch_size=8, micro_batches=1, in_flight=1, devices=8)
    local = 8 * 100 * 512 / 8
    assert transition_seconds(Strategy(dp_replicate=8), Strategy(tp=4, dp_shard=2), step, 512,
                              INPUTS) == pytest.approx(
        2 * collective_seconds("all-to-all", local, 4, False, INPUTS))
    assert transition_seconds(Strategy(dp_replicate=8), Strategy(dp_shard=8, checkpoint=True),
                              step, 512, INPUTS) == 0


def test_candidates_are_pruned_like_galvatrons_decision_trees():
    found = candidates(presets.get("gopher-7.1b"), 16, 8)
    assert {s.tp for s in found} == {1, 2, 4, 8}  # within a node
    assert all(s.devices == 16 and min(s.dp_replicate, s.dp_shard) == 1 for s in found)
    assert {s.tp for s in candidates(dataclasses.replace(SMALL, n_heads=2), 8, 8)} == {1, 2}


def test_balanced_split_keeps_every_stage_and_minimises_the_heaviest():
    assert balanced_split([1.0] * 5, 3) == [2, 2, 1]
    assert balanced_split([0.0, 1.0, 1.0, 1.0, 1.0, 4.0], 2) == [5, 1]
    assert balanced_split([3.0, 1.0, 1.0, 1.0], 2) == [1, 3]
    assert sum(balanced_split([0.0] * 7, 7)) == 7


def exhaustive(problem):
    """The least objective over every assignment of strategies to the stage's layers, by
    broadcasting over all of them at once."""
    layers, count = problem.units.shape
    total, units = np.zeros((count,) * layers), np.zeros((count,) * layers, dtype=np.int64)
    for layer in range(layers):
        axes = [1] * layers
        axes[layer] = count
        total = total + problem.objective[layer].reshape(axes)
        units = units + problem.units[layer].reshape(axes)
    for layer in range(layers - 1):
        axes = [1] * layers
        axes[layer] = axes[layer + 1] = count
        total = total + (problem.micro_batches * problem.transition).reshape(axes)
    total[units > problem.budget_units] = np.inf
    return total.min()


@pytest.mark.parametrize("tightness", [0.3, 0.6, 1.0])
def test_dynamic_programme_finds_the_exhaustive_optimum(tightness):
    """4 blocks + embedding + head on 4 GPUs, 10 strategies each: all 10^6 assignments."""
    config = configure(Job(SMALL, 4, 16, 256), INPUTS, 1, 2)
    problem = config.stages[0]
    leanest = int(problem.units.min(axis=1).sum())
    fastest = int(problem.units[np.arange(6), problem.objective.argmin(axis=1)].sum())
    assert fastest > leanest  # memory decides: the budgets below bind
    problem = dataclasses.replace(problem, budget_units=int(
        leanest + tightness * (fastest - leanest)))
    choice = solve_stage(problem)
    chosen = evaluate(problem, choice)
    assert chosen.units <= problem.budget_units
    found = problem.micro_batches * chosen.per_micro_batch + chosen.sync
    assert found == pytest.approx(exhaustive(problem), rel=1e-12)
    assert solve_stage(dataclasses.replace(problem, budget_units=leanest - 1)) is None


@pytest.mark.parametrize("preset, gpus, hardware, memory", [
    ("gopher-7.1b", 64, "h100", 80e9),
    ("gopher-1.4b", 8, "a100-40gb", 20e9),
    ("palm-8b", 16, "h200", 141e9),
    ("chinchilla-70b", 32, "h100", 80e9),
])
def test_searched_plan_is_never_worse_than_the_best_uniform_one(preset, gpus, hardware, memory):
    cfg = presets.get(preset)
    inputs = CostInputs.from_hardware(get_hardware(hardware), memory_bytes=memory)
    result = search(Job(cfg, gpus, 256, cfg.max_seq_len, preset=preset), inputs)
    assert result.best.peak_memory_bytes <= memory
    for outcome in (result.uniform, *result.baselines.values()):
        if outcome.plan is not None:
            assert result.best.predicted_step_s <= outcome.plan.predicted_step_s * (1 + 1e-12)


def test_a_vocabulary_that_dominates_memory_makes_per_layer_strategies_pay():
    inputs = CostInputs.from_hardware(get_hardware("h100"), memory_bytes=4e9)
    result = search(Job(WIDE_VOCAB, 8, 64, 1024), inputs)
    assert result.best.predicted_step_s < 0.95 * result.uniform.plan.predicted_step_s
    strategies = {layer.strategy for layer in result.best.layers}
    assert len(strategies) > 1
    assert result.best.layers[-1].tp > result.best.layers[1].tp  # the head splits, blocks don't


def test_64_gpus_and_80_layers_search_quickly():
    cfg = presets.get("chinchilla-70b")
    start = time.perf_counter()
    result = search(Job(cfg, 64, 1024, 2048, preset="chinchilla-70b"),
                    CostInputs.from_hardware(get_hardware("h100")))
    assert time.perf_counter() - start < 10
    assert len(result.best.layers) == 82 and sum(result.best.stages) == 82
    assert result.baselines["ddp"].plan is None and result.baselines["ddp"].needs_bytes > 80e9


def small_plan() -> Plan:
    return search(Job(SMALL, 4, 16, 256, preset="small-test"), INPUTS).best


def test_plans_round_trip_through_json(tmp_path):
    plan = small_plan()
    assert Plan.from_json(plan.to_json()) == plan
    plan.save(tmp_path / "plan.json")
    text = (tmp_path / "plan.json").read_text()
    assert Plan.load(tmp_path / "plan.json") == plan
    assert '    {"name": "block 2", "tp": ' in text  # one layer per line
    plan.check(SMALL, 4, 256)


def written(layer=None, **changes) -> str:
    """A plan file for SMALL on 4 GPUs as a user might write it, with `changes`; `layer`
    changes every layer's strategy."""
    layers = [{"name": name, "tp": 1, "dp_replicate": 1, "dp_shard": 4, "checkpoint": False,
               **(layer or {})} for name in layer_names(4)]
    data = {"model": model_fingerprint(SMALL, 256, "small-test"), "world_size": 4,
            "mesh": {"pp": 1, "dp_replicate": 1, "dp_shard": 4, "tp": 1, "ep": 1},
            "stages": [6], "micro_batches": 2, "micro_batch_size": 8, "layers": layers,
            "predicted_step_s": 1.0, "peak_memory_bytes": 1e9}
    return json.dumps({**data, **changes})


def test_plans_that_cannot_work_are_refused_in_one_line():
    plan = Plan.from_json(written())
    assert plan.global_batch == 16
    with pytest.raises(UserError, match="tp 3 does not divide the model's 4 heads"):
        Plan.from_json(written({"tp": 3, "dp_shard": 1}, world_size=3,
                               mesh={"pp": 1, "dp_replicate": 1, "dp_shard": 1, "tp": 3,
                                     "ep": 1}))
    with pytest.raises(UserError, match="multiply to world_size / pp"):
        Plan.from_json(written({"dp_shard": 2}))
    with pytest.raises(UserError, match="hold 5 layers but the model has 6"):
        Plan.from_json(written(stages=[5]))
    with pytest.raises(UserError, match="does not divide the micro-batch"):
        Plan.from_json(written(micro_batch_size=6))
    with pytest.raises(UserError, match="has 8 GPUs, not world_size 4"):
        Plan.from_json(written(mesh={"pp": 2, "dp_replicate": 1, "dp_shard": 4, "tp": 1,
                                     "ep": 1}))
    with pytest.raises(UserError, match="missing stages"):
        Plan.from_json(json.dumps({k: v for k, v in json.loads(written()).items()
                                   if k != "stages"}))
    with pytest.raises(UserError, match="made for small-test: n_layers 4 \\(this model: 6\\)"):
        plan.check(dataclasses.replace(SMALL, n_layers=6), 4, 256)
    with pytest.raises(UserError, match="for 4 GPUs, not 8"):
        plan.check(SMALL, 8, 256)
    with pytest.raises(UserError, match="not JSON"):
        Plan.from_json("{")


def test_a_budget_nothing_fits_names_the_layer_and_its_need():
    inputs = CostInputs.from_hardware(get_hardware("h100"), memory_bytes=2e9)
    with pytest.raises(UserError, match=r"no plan fits: head alone needs [\d.]+ [GM]B at its "
                                        r"leanest \(tp 8.*above the [\d.]+ MB"):
        search(Job(dataclasses.replace(WIDE_VOCAB, vocab_size=4_096_000), 8, 64, 1024), inputs)


def test_the_verb_prints_one_json_object_and_refuses_bad_sizes(capsys, tmp_path):
    argv = ["plan-parallel", "--preset", "gopher-1.4b", "--gpus", "16", "--hardware", "H100",
            "--memory", "40GiB", "--global-batch", "524288", "--out", str(tmp_path / "p.json")]
    assert main([*argv, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert {"plan", "predicted_step_s", "peak_memory_bytes", "uniform_best",
            "baselines"} <= set(result)
    assert "predicted_step_s" in result["uniform_best"]
    assert set(result["baselines"]) == {"fsdp", "ddp"}
    assert Plan.load(tmp_path / "p.json").to_dict() == result["plan"]
    assert result["plan"]["micro_batches"] * result["plan"]["micro_batch_size"] == 256
    assert main(argv) == 0
    assert "searched (per layer)" in capsys.readouterr().out
    assert main([*argv[:-2], "--memory", "lots"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("burrow: error: --memory 'lots' is not a size") and (
        error.count("\n") == 1)
