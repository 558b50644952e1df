"""Pipeline parallelism and `burrow train --plan` against one process (CPU, gloo), and the
refusals, most of them without starting a process."""

import dataclasses
import json

import pytest

from burrow import UserError
from burrow.cli import main
from burrow.config import ModelConfig, MoEConfig, RunConfig, TrainConfig
from burrow.parallel import ParallelDims
from burrow.parallel.limits import pipeline_batch
from burrow.parallel.planner import CostInputs, Job, LayerPlan, Plan, get_hardware, search
from burrow.parallel.planner.executable import apply_plan, search_executable
from burrow.parallel.planner.search import NoPlanFits
from burrow.train.metrics import MetricsLog
from conftest import tiny_run_config
from test_parallel import COMMON, train

PP = ("--pipeline-parallel", "2")
# The micro preset as test_parallel.COMMON sets it: what a plan for it must name.
MICRO = dict(preset="micro", n_layers=2, d_model=64, n_heads=2, vocab_size=512, seq_len=64)


def val_loss(out) -> float:
    return [row for row in MetricsLog(out / "metrics.jsonl").rows() if row["split"] == "val"][-1][
        "loss"]


# Tolerance: a step's 8 sequences pass in two micro-batches of 4 whose mean losses the
# schedule averages (one process: one mean over 8), and the stages' squared gradient norms are
# summed by an all-reduce: float32 rounding (~1e-7 relative), amplified a little by six AdamW
# steps. 1e-4 relative is far below any real difference (a step moves the loss by ~1e-2), and
# a stage that ran the wrong blocks, dropped a gradient or clipped by its own norm alone would
# be off at the first or second step.
def test_gpipe_on_two_stages_matches_one_process(tmp_path, single, single_run):
    out = tmp_path / "run"
    losses = train(out, 8, processes=2, data_parallel=1,
                   extra=(*PP, "--pipeline-schedule", "gpipe"))
    assert [*losses, val_loss(out)] == pytest.approx([*single, val_loss(single_run)], rel=1e-4)
    layout = json.loads((out / "parallel.json").read_text())
    assert (layout["pp"], layout["mode"]) == (2, "none")
    assert (out / "checkpoints" / "step_8" / "model").is_dir()  # DCP shards of both stages
    assert (out / "samples.txt").read_text().startswith("--- step 8,")


def test_1f1b_resumes_in_one_process_and_back(tmp_path, single):
    """PP (1f1b, DCP) -> one process (safetensors) -> PP: the losses of one straight run."""
    out = tmp_path / "run"
    train(out, 2, processes=2, data_parallel=1, extra=PP)
    train(out, 4, resume=True, extra=("--pipeline-parallel", "1"))
    assert (out / "checkpoints" / "step_4" / "model.safetensors").is_file()
    losses = train(out, 6, processes=2, data_parallel=1, resume=True, extra=PP)
    assert losses == pytest.approx(single[:6], rel=1e-4)


def test_fsdp_run_resumes_in_two_stages_of_two_shards(tmp_path, single):
    """FSDP in one process -> pp 2 x dp_shard 2 on four processes."""
    out = tmp_path / "run"
    train(out, 3, parallel="fsdp")
    losses = train(out, 6, processes=4, parallel="fsdp", data_parallel=2, resume=True,
                   extra=(*PP, "--checkpoint-layers", "1"))
    assert losses == pytest.approx(single[:6], rel=1e-4)
    layout = json.loads((out / "parallel.json").read_text())
    assert (layout["pp"], layout["dp_shard"], layout["mode"]) == (2, 2, "fsdp")


def micro_plan(**change) -> Plan:
    """A plan for the micro model on 4 processes: 2 stages of 2 replicas, block 1 recomputed,
    4 micro-batches of 2 sequences (1 per replica)."""
    layers = [LayerPlan(name, 1, 2, 1, name == "block 1")
              for name in ("embedding", "block 0", "block 1", "head")]
    fields = dict(model=MICRO, world_size=4, mesh={"pp": 2, "dp_replicate": 2, "dp_shard": 1,
                                                   "tp": 1, "ep": 1},
                  stages=(2, 2), micro_batches=4, micro_batch_size=2, layers=tuple(layers),
                  predicted_step_s=1.0, peak_memory_bytes=1e6)
    return Plan(**{**fields, **change})


def tensor_plan() -> Plan:
    """The micro model on 4 processes as 2 stages of tp 2, block 1 recomputed, 4 micro-batches
    of 2 sequences (both on each rank of a stage: one data-parallel rank)."""
    return micro_plan(mesh={"pp": 2, "dp_replicate": 1, "dp_shard": 1, "tp": 2, "ep": 1},
                      layers=tuple(LayerPlan(layer.name, 2, 1, 1, layer.checkpoint)
                                   for layer in micro_plan().layers))


def grad_norms(out) -> list[float]:
    return [row["grad_norm"] for row in MetricsLog(out / "metrics.jsonl").rows()
            if row["split"] == "train"]


# Tolerance as above: tensor parallelism adds its ranks' partial products and the softmax's
# vocabulary shards in another order than one process (float32 rounding, ~1e-7 relative).
def test_tensor_parallel_stages_match_one_process_and_resume_in_one(tmp_path, single,
                                                                   single_run):
    """pp 2 x tp 2 under GPipe -> pp 2 x tp 2 from a plan under 1F1B (block 1 recomputed),
    resuming the first's DCP shards -> one process, resuming the second's: the losses,
    gradient norms (over both stages and both tensor-parallel ranks) and final evaluation of
    one straight run in one process."""
    out = tmp_path / "run"
    train(out, 3, processes=4, data_parallel=1,
          extra=(*PP, "--tensor-parallel", "2", "--pipeline-schedule", "gpipe"))
    plan = tmp_path / "plan.json"
    tensor_plan().save(plan)
    train(out, 6, processes=4, resume=True,
          extra=("--plan", str(plan), "--pipeline-schedule", "1f1b"))
    saved = RunConfig.load(out / "config.yaml").train
    assert (saved.pipeline_parallel, saved.tensor_parallel, saved.pipeline_schedule) == (
        2, 2, "1f1b")
    assert (out / "checkpoints" / "step_6" / "model").is_dir()
    assert (out / "samples.txt").read_text().count("--- step 6,") == 1  # from a whole copy
    losses = train(out, 8, resume=True, extra=("--pipeline-parallel", "1", "--pipeline-split",
                                               "", "--tensor-parallel", "1"))
    assert [*losses, val_loss(out)] == pytest.approx([*single, val_loss(single_run)], rel=1e-4)
    assert grad_norms(out) == pytest.approx(grad_norms(single_run), rel=1e-4)


def test_train_follows_a_plan_on_four_processes(tmp_path, single):
    plan = tmp_path / "plan.json"
    micro_plan().save(plan)
    out = tmp_path / "run"
    losses = train(out, 6, processes=4, extra=("--plan", str(plan)))
    assert losses == pytest.approx(single[:6], rel=1e-4)
    saved = RunConfig.load(out / "config.yaml").train
    assert (saved.parallel, saved.pipeline_parallel, saved.data_parallel_replicate) == (
        "ddp", 2, 2)
    assert (saved.micro_batch_size, saved.pipeline_microbatches) == (1, 4)
    assert (saved.pipeline_split, saved.checkpoint_layers) == ("1,1", "1")


# -- without processes ----------------------------------------------------------------------

def micro_config(**model) -> RunConfig:
    cfg = tiny_run_config(seq_len=64, batch_tokens=512)
    cfg.model = ModelConfig(**{**dict(vocab_size=512, d_model=64, n_layers=2, n_heads=2,
                                      max_seq_len=64), **model})
    return cfg


def test_plan_micro_batches_are_converted_to_each_ranks():
    train_cfg = apply_plan(micro_config(), micro_plan(), 4).train
    # the plan: 4 micro-batches of 2 sequences over a stage's 2 data-parallel ranks
    assert (train_cfg.micro_batch_size, train_cfg.pipeline_microbatches) == (1, 4)
    assert train_cfg.batch_tokens == 4 * 2 * 64
    assert pipeline_batch(train_cfg, dp=2, pp=2) == (4, 1)
    one_stage = micro_plan(mesh={"pp": 1, "dp_replicate": 1, "dp_shard": 4, "tp": 1, "ep": 1},
                           stages=(4,), micro_batches=2, micro_batch_size=8,
                           layers=tuple(LayerPlan(layer.name, 1, 1, 4, False)
                                        for layer in micro_plan().layers))
    train_cfg = apply_plan(micro_config(), one_stage, 4).train
    assert (train_cfg.parallel, train_cfg.data_parallel_shard, train_cfg.micro_batch_size) == (
        "fsdp", 4, 2)  # 8 sequences over 4 shards; 2 accumulated micro-batches
    assert train_cfg.batch_tokens // (train_cfg.micro_batch_size * 64 * 4) == 2


def test_a_plan_with_tensor_parallel_stages_sets_both_degrees():
    train_cfg = apply_plan(micro_config(), tensor_plan(), 4).train
    assert (train_cfg.parallel, train_cfg.pipeline_parallel, train_cfg.tensor_parallel) == (
        "none", 2, 2)
    assert (train_cfg.micro_batch_size, train_cfg.pipeline_microbatches) == (2, 4)


def test_plans_burrow_cannot_run_are_refused_naming_the_layer():
    layers = list(micro_plan().layers)
    layers[0] = LayerPlan("embedding", 2, 1, 1, False)
    with pytest.raises(UserError, match=r"embedding is spread as tp 2, block 0 as "
                                        r"dp_replicate 2.*--executable"):
        apply_plan(micro_config(), micro_plan(layers=tuple(layers)), 4)
    with pytest.raises(UserError, match="the plan is for 4 GPUs, not 2"):
        apply_plan(micro_config(), micro_plan(), 2)
    with pytest.raises(UserError, match=r"made for micro: d_model 64 \(this model: 32\)"):
        apply_plan(micro_config(d_model=32), micro_plan(), 4)


def test_a_plan_searched_with_executable_is_accepted_and_a_full_one_may_not_be():
    # the planner's figures are a GPU's, but the plan is only read for its shape here
    inputs = CostInputs.from_hardware(get_hardware("h100"), memory_bytes=80e9)
    cfg = micro_config()
    job = Job(cfg.model, world_size=4, global_batch=8, seq_len=64, preset="micro")
    plan = search_executable(job, inputs)
    assert apply_plan(cfg, Plan.from_json(plan.to_json()), 4).train.parallel in (
        "none", "ddp", "fsdp")
    # Gopher 7.1B on 64 GPUs: the full search mixes tensor-parallel degrees (docs/galvatron.md)
    from burrow import presets

    gopher = presets.get("gopher-7.1b")
    job = Job(gopher, world_size=64, global_batch=1024, seq_len=2048, preset="gopher-7.1b")
    run = RunConfig(model=gopher, preset="gopher-7.1b")
    with pytest.raises(UserError, match=r"burrow cannot execute the plan: .*--executable"):
        apply_plan(run, search(job, inputs).best, 64)
    apply_plan(run, search_executable(job, inputs), 64)


def test_the_executable_search_puts_tensor_parallelism_inside_stages_where_that_pays():
    """Gopher 1.4B (RoPE, untied) on 8 GPUs of 8 GB: the fastest plan burrow can execute
    runs two stages of tp 2: the search weighs tensor parallelism inside pipeline stages."""
    from burrow import presets

    model = dataclasses.replace(presets.get("gopher-1.4b"), positions="rope",
                                tie_embeddings=False)
    inputs = CostInputs.from_hardware(get_hardware("h100"), memory_bytes=8e9)
    job = Job(model, world_size=8, global_batch=64, seq_len=2048, preset="gopher-1.4b")
    plan = search_executable(job, inputs)
    assert (plan.pp, plan.mesh["tp"]) == (2, 2)
    train_cfg = apply_plan(RunConfig(model=model, preset="gopher-1.4b"), plan, 8).train
    assert (train_cfg.pipeline_parallel, train_cfg.tensor_parallel) == (2, 2)


def test_the_executable_search_gives_each_pipeline_stage_a_micro_batch():
    """Two sequences a step on 2 GPUs, a model tensor parallelism cannot split (3 heads): the
    full search's plan is two stages of one micro-batch, which the 1F1B schedule a plan runs
    under refuses; the executable search's has a micro-batch per stage and passes the checks
    the trainer makes before joining a process group. One sequence a step has no such plan."""
    model = ModelConfig(vocab_size=512, d_model=48, n_layers=2, n_heads=3, max_seq_len=64)
    inputs = CostInputs.from_hardware(get_hardware("h100"), memory_bytes=80e9)
    job = Job(model, world_size=2, global_batch=2, seq_len=64)
    run = RunConfig(model=model)
    full = search(job, inputs).best
    assert (full.pp, full.micro_batches) == (2, 1)
    with pytest.raises(UserError, match="pipeline_microbatches=1 is fewer than the 2 stages"):
        refused = apply_plan(run, full, 2)
        ParallelDims.for_train(refused.train, 2).check_model(refused)
    plan = search_executable(job, inputs)
    assert (plan.pp, plan.micro_batches) == (2, 2)
    cfg = apply_plan(run, plan, 2)
    ParallelDims.for_train(cfg.train, 2).check_model(cfg)
    with pytest.raises(NoPlanFits, match=r"a micro-batch for each pipeline stage\)"):
        search_executable(dataclasses.replace(job, global_batch=1), inputs)


def test_stage_splits_and_micro_batches():
    assert TrainConfig(pipeline_parallel=2).pipeline_stages(5) == [3, 2]
    assert TrainConfig(pipeline_parallel=2, pipeline_split="1,4").pipeline_stages(5) == [1, 4]
    for split, message in (("2;3", "not a list"), ("5", "gives 1 stages"),
                           ("2,2", "holds 4 blocks, the model has 5")):
        with pytest.raises(UserError, match=message):
            TrainConfig(pipeline_parallel=2, pipeline_split=split).pipeline_stages(5)
    with pytest.raises(UserError, match="need at least 3 blocks"):
        TrainConfig(pipeline_parallel=3).pipeline_stages(2)
    # 8 sequences a step on one data-parallel rank: 2 micro-batches of 4 by default
    train_cfg = TrainConfig(batch_tokens=512, micro_batch_size=8, seq_len=64)
    assert pipeline_batch(train_cfg, dp=1, pp=2) == (2, 4)
    four = dataclasses.replace(train_cfg, pipeline_microbatches=4)
    assert pipeline_batch(four, dp=1, pp=2) == (4, 2)
    with pytest.raises(UserError, match="must divide the 8 sequences"):
        pipeline_batch(dataclasses.replace(train_cfg, pipeline_microbatches=3), dp=1, pp=2)
    one = dataclasses.replace(train_cfg, pipeline_microbatches=1)
    with pytest.raises(UserError, match="fewer than the 2 stages"):
        pipeline_batch(one, dp=1, pp=2)
    assert pipeline_batch(dataclasses.replace(one, pipeline_schedule="gpipe"), 1, 2) == (1, 8)


def test_what_does_not_compose_with_stages_is_refused():
    assert ParallelDims.for_mode("fsdp", 4, pp=2).dp_shard == 2
    assert ParallelDims.for_mode("none", 2, pp=2).describe() == "pp 2"
    with pytest.raises(UserError, match="pipeline_parallel=3 must divide"):
        ParallelDims.for_mode("ddp", 4, pp=3)
    with pytest.raises(UserError, match=r"expert_parallel=2 with train\.pipeline_parallel"):
        ParallelDims.for_mode("ddp", 4, ep=2, pp=2)
    cases = [({"tie_embeddings": True}, 1, 64, "tied embeddings"),
             ({"moe": MoEConfig(num_experts=4)}, 1, 64, "Switch experts"),
             ({}, 2, 63, "2 does not divide train.seq_len=63")]
    for model, tp, seq_len, message in cases:
        dims = ParallelDims.for_mode("none", 2 * tp, tp=tp, pp=2)
        cfg = micro_config(**model)
        cfg.train = dataclasses.replace(cfg.train, seq_len=seq_len)
        with pytest.raises(UserError, match=message):
            dims.check_model(cfg)
    ParallelDims.for_mode("none", 4, tp=2, pp=2).check_model(micro_config())


def test_a_pipeline_without_enough_processes_stops_before_joining_a_group(capsys, tmp_path):
    assert main(["train", *COMMON, "--out", str(tmp_path / "run"), *PP]) == 2
    error = capsys.readouterr().err.strip()
    assert "pipeline_parallel=2 must divide the number of processes (1)" in error
    assert "\n" not in error
    assert main(["train", *COMMON, "--out", str(tmp_path / "run"), "--plan",
                 str(tmp_path / "missing.json")]) == 2
