"""A data-parallel layout per layer (Galvatron), executed with FSDP2 on CPU (gloo) against one
process; the planner's search for such plans and `apply_plan`. Run as a script under torchrun,
this file is the worker of the model test."""

import copy
import dataclasses
import os
import shutil
import subprocess
import sys

import pytest
import torch

from burrow import UserError
from burrow.config import ModelConfig, RunConfig, TrainConfig
from burrow.model import Transformer
from burrow.parallel import LayerStrategy, ParallelDims, parallelize
from burrow.parallel.planner import CostInputs, Job, LayerPlan, Plan, get_hardware, search
from burrow.parallel.planner.executable import apply_plan, search_executable
from test_parallel import train
from test_pipeline_parallel import micro_config, micro_plan

# The micro model's embedding, blocks 0 and 1, head on 4 data-parallel ranks: a hybrid (2
# replicas of 2 shards), a fully sharded, a replicated and a fully sharded layer.
MIXED = "2x2,1x4,4x1,1x4"


def layers_of(layouts: list[tuple[int, int]], tp: int = 1) -> list[LayerStrategy]:
    return [LayerStrategy(replicas, shards, tp) for replicas, shards in layouts]


def local_rows(parameter: torch.Tensor) -> int:
    return parameter.to_local().shape[0]


def mixed_model_worker() -> None:
    """Each rank spreads a copy of one model in mixed layouts, checks how each layer's
    weights are split, and checks the loss, every gradient and the clipped global gradient
    norm against the whole model's on the whole batch (each rank computing its share).

    Two jobs on the 4 ranks: dp 4 (embedding 2x2, block 0 1x4, block 1 4x1, head 1x4), and
    tensor parallelism 2 x dp 2 (embedding 2x1, blocks 1x2 and 2x1, head 1x2), with tied
    embeddings in the second so that the final norm is a unit of its own.

    Tolerance: the ranks' gradients are summed by collectives instead of one mean over the
    batch, float32 rounding (~1e-7 relative); rtol 1e-4 with atol 1e-6 leaves a wide margin,
    while a gradient reduced over the wrong ranks is off by a factor of 2 or more.
    """
    import torch.distributed as dist

    from burrow.parallel.layouts import clip_sharded_grad_norm_
    from burrow.parallel.tensor import loss_parallel_context

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    close = dict(rtol=1e-4, atol=1e-6)
    jobs = [(ParallelDims.for_mode("fsdp", world), [(2, 2), (1, 4), (4, 1), (1, 4)], {}),
            (ParallelDims.for_mode("fsdp", world, tp=2), [(2, 1), (1, 2), (2, 1), (1, 2)],
             {"tie_embeddings": True})]
    for dims, layouts, change in jobs:
        cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, d_ff=48,
                          max_seq_len=16, **change)
        torch.manual_seed(0)
        whole = Transformer(cfg)
        split = copy.deepcopy(whole)
        parallelize(split, dims, torch.device("cpu"), False, layers=layers_of(layouts, dims.tp))
        up = [block.mlp.up_proj.weight for block in split.blocks]  # (48, 32): rows / (tp x s)
        assert [local_rows(weight) for weight in up] == [48 // dims.tp // shards for _, shards
                                                         in layouts[1:3]]
        assert local_rows(split.embed.weight) == 64 // dims.tp // layouts[0][1]
        assert local_rows(split.norm.weight) == 32 // layouts[-1][1]  # a norm is not tp-split
        ids, labels = torch.randint(0, 64, (8, 16)), torch.randint(0, 64, (8, 16))
        expected = whole(ids, labels)
        expected.loss.backward()
        expected_norm = torch.nn.utils.clip_grad_norm_(whole.parameters(), 0.1)
        share = slice(dims.dp_rank(rank) * 8 // dims.dp_degree,
                      (dims.dp_rank(rank) + 1) * 8 // dims.dp_degree)
        with loss_parallel_context(dims.tp):
            out = split(ids[share], labels[share])
            out.loss.backward()
        loss = out.loss.detach().clone()
        dist.all_reduce(loss)
        torch.testing.assert_close(loss / world, expected.loss, **close)
        norm = clip_sharded_grad_norm_(split.parameters(), 0.1)
        torch.testing.assert_close(norm, expected_norm, **close)
        for (name, weight), reference in zip(split.named_parameters(), whole.parameters()):
            torch.testing.assert_close(weight.grad.full_tensor(), reference.grad, **close,
                                       msg=f"{layouts} {name}")
    dist.barrier()  # no rank tears down its connections while a peer still uses them
    dist.destroy_process_group()


def test_layers_are_sharded_as_their_layouts_say_and_compute_the_whole_model():
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                             "--nproc_per_node", "4", __file__],
                            capture_output=True, text=True, timeout=180, env=os.environ.copy())
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]


@pytest.fixture(scope="module")
def mixed_run(tmp_path_factory):
    """Four steps in the mixed layout on four processes, each rank's 2 sequences in two
    accumulated micro-batches of 1: a checkpoint of DCP shards at step 4, and its losses.
    (Resuming a uniform FSDP run in a mixed layout is the same DCP resharding as the
    reverse, which the next test checks.)"""
    out = tmp_path_factory.mktemp("mixed") / "run"
    losses = train(out, 4, processes=4, parallel="fsdp",
                   extra=("--layer-layouts", MIXED, "--micro-batch-size", "1"))
    return out, losses


# Tolerance as in test_parallel.py: collectives sum the ranks' gradients in another order than
# one process's mean, float32 rounding (~1e-7 relative) amplified a little by AdamW's steps;
# 1e-4 relative is far below what a step of training moves the loss (~1e-2).
def test_a_mixed_layout_matches_one_process(mixed_run, single):
    out, losses = mixed_run
    assert losses == pytest.approx(single[:4], rel=1e-4)
    saved = RunConfig.load(out / "config.yaml").train
    assert (saved.parallel, saved.layer_layouts) == ("fsdp", MIXED)
    assert (out / "checkpoints" / "step_4" / "model").is_dir()


def test_a_mixed_layout_resumes_in_one_process(tmp_path, mixed_run, single):
    """DCP reshards each layer's DTensors into the whole tensors one process holds."""
    out = tmp_path / "one"
    shutil.copytree(mixed_run[0], out)
    losses = train(out, 8, processes=1, parallel="none", resume=True,
                   extra=("--layer-layouts", "none"))
    assert losses == pytest.approx(single, rel=1e-4)


def test_train_follows_a_plan_of_mixed_layouts_in_two_stages(tmp_path, single):
    """`train --plan`: two stages of two ranks, each stage's layers sharded and replicated
    by turns (the embedding, block 1 sharded over 2; block 0, the head replicated twice)."""
    layers = [LayerPlan(layer.name, 1, *((1, 2) if index % 2 == 0 else (2, 1)),
                        layer.checkpoint) for index, layer in enumerate(micro_plan().layers)]
    plan = tmp_path / "plan.json"
    micro_plan(layers=tuple(layers)).save(plan)
    out = tmp_path / "run"
    losses = train(out, 4, processes=4, extra=("--plan", str(plan)))
    assert losses == pytest.approx(single[:4], rel=1e-4)
    saved = RunConfig.load(out / "config.yaml").train
    assert (saved.parallel, saved.pipeline_parallel, saved.layer_layouts) == (
        "fsdp", 2, "1x2,2x1,1x2,2x1")


def test_layouts_per_layer_need_fsdp_and_the_data_parallel_degree():
    cfg = micro_config()
    cfg.train = dataclasses.replace(cfg.train, layer_layouts="1x2,2x1,1x2,1x2")
    with pytest.raises(UserError, match="embedding is laid out as 1x2, the job as 2x1 under "
                                        "--parallel ddp; a layout per layer needs --parallel "
                                        "fsdp"):
        ParallelDims.for_mode("ddp", 2).check_model(cfg)
    with pytest.raises(UserError, match="embedding is laid out as 1x2 = 2 data-parallel ranks, "
                                        "but the job has 4"):
        ParallelDims.for_mode("fsdp", 4).check_model(cfg)
    ParallelDims.for_mode("fsdp", 2).check_model(cfg)
    with pytest.raises(UserError, match="gives 3 layouts, but the model has 4 layers"):
        RunConfig(model=cfg.model, train=TrainConfig(layer_layouts="1x2,2x1,1x2",
                                                     seq_len=64)).validate()
    with pytest.raises(UserError, match=r"train.layer_layouts='2-2' is not none or a list"):
        TrainConfig(layer_layouts="2-2")


# -- the planner ----------------------------------------------------------------------------

def wide_vocabulary_job() -> Job:
    """A model whose embedding and head (a 256k vocabulary) hold most of its weights, on 8
    GPUs of 4 GB: replicated, they do not fit; the blocks, small, are faster replicated (their
    gradients all-reduced once a step, behind the backward pass) than sharded (their weights
    gathered before every forward)."""
    model = ModelConfig(vocab_size=256_000, d_model=512, n_layers=16, n_heads=8,
                        max_seq_len=1024)
    return Job(model, world_size=8, global_batch=32, seq_len=1024)


def test_the_executable_search_mixes_layouts_where_that_pays_and_apply_plan_takes_them():
    inputs = CostInputs.from_hardware(get_hardware("h100"), memory_bytes=4e9)
    job = wide_vocabulary_job()
    plan = Plan.from_json(search_executable(job, inputs).to_json())
    layouts = [(layer.dp_replicate, layer.dp_shard) for layer in plan.layers]
    assert {layer.tp for layer in plan.layers} == {1}
    assert layouts == [(1, 8), *[(8, 1)] * 16, (1, 8)]  # the big layers sharded, blocks not
    uniform = search(job, inputs).uniform.plan  # the fastest plan of one strategy
    assert plan.predicted_step_s < 0.95 * uniform.predicted_step_s
    train_cfg = apply_plan(RunConfig(model=job.cfg), plan, 8).train
    assert (train_cfg.parallel, train_cfg.layouts(16)) == ("fsdp", layouts)
    assert (train_cfg.data_parallel_replicate, train_cfg.data_parallel_shard) == (8, 1)


def test_apply_plan_carries_layouts_and_refuses_tensor_parallel_degrees_that_differ():
    layers = list(micro_plan().layers)  # 2 stages of 2 replicas
    layers[0] = dataclasses.replace(layers[0], dp_replicate=1, dp_shard=2)
    train_cfg = apply_plan(micro_config(), micro_plan(layers=tuple(layers)), 4).train
    assert (train_cfg.parallel, train_cfg.layer_layouts) == ("fsdp", "1x2,2x1,2x1,2x1")
    assert (train_cfg.data_parallel_replicate, train_cfg.data_parallel_shard) == (2, 1)
    one_stage = micro_plan(mesh={"pp": 1, "dp_replicate": 1, "dp_shard": 2, "tp": 2, "ep": 1},
                           stages=(4,), micro_batches=2, micro_batch_size=4, layers=tuple(
                               dataclasses.replace(layer, tp=2 if index else 1, dp_shard=2,
                                                   dp_replicate=1 if index else 2)
                               for index, layer in enumerate(layers)))
    with pytest.raises(UserError, match=r"^burrow cannot execute the plan: embedding is spread "
                                        r"as dp_replicate 2 x dp_shard 2, block 0 as tp 2 x "
                                        r"dp_shard 2; burrow gives every layer one "
                                        r"tensor-parallel degree: give embedding tp 2, or make "
                                        r"the plan with burrow plan-parallel --executable$"):
        apply_plan(micro_config(), one_stage, 4)


if __name__ == "__main__":
    mixed_model_worker()
