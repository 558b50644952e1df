"""Tensor parallelism, hybrid sharding and activation checkpointing against one process (CPU,
gloo). Run as a script under torchrun, this file is the worker of the model test.
"""

import copy
import json
import os
import re
import subprocess
import sys

import pytest
import torch

from burrow import UserError
from burrow.config import ModelConfig, MoEConfig, RetroConfig, RunConfig, TrainConfig
from burrow.model import Transformer
from burrow.parallel import LayerStrategy, ParallelDims, check_tensor_parallel, parallelize
from conftest import burrow_command, tiny_run_config
from test_parallel import train

# Each kind of model the split must compute exactly: the micro preset's (RoPE, RMSNorm, SwiGLU,
# serial blocks, untied head) and one change at a time.
VARIANTS = [{}, {"z_loss": 1e-2}, {"tie_embeddings": True},
            {"ffn": "gelu", "norm": "layernorm", "bias": True}, {"block": "parallel"},
            {"positions": "learned"}, {"n_heads": 4, "n_kv_heads": 2}]


def tiny_model(**change) -> ModelConfig:
    fields = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=2, d_ff=48, max_seq_len=16)
    return ModelConfig(**{**fields, **change})


def split_model_worker() -> None:
    """Each rank splits a copy of one model with tp = the world size and checks its loss and
    every gradient against the whole model's on the same batch, with the loss computed on
    logits split over the vocabulary (loss_parallel) and without (DTensor gathers them).

    Tolerance: float32, where the split model adds the ranks' partial products of the row-split
    projections and the softmax's sums over vocabulary shards in another order than one matmul
    does: they differ by float32 rounding (~1e-7 relative, measured <= 1e-6 of the largest
    gradient). rtol 1e-4 with atol 1e-6 leaves a wide margin, while a head attending with
    another's keys or a missing all-reduce changes values at order one.
    """
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from burrow.parallel.tensor import apply_tensor_parallel, loss_parallel_context

    dist.init_process_group("gloo")
    world = dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("tp",))
    close = dict(rtol=1e-4, atol=1e-6)
    for change in VARIANTS:
        cfg = tiny_model(**change)
        check_tensor_parallel(cfg, world)
        torch.manual_seed(0)
        whole = Transformer(cfg)
        split = copy.deepcopy(whole)
        apply_tensor_parallel(split, mesh)
        ids, labels = torch.randint(0, 64, (2, 16)), torch.randint(0, 64, (2, 16))
        labels[0, :3] = -100  # positions without a target
        expected = whole(ids, labels)
        expected.loss.backward()
        for degree in (world, 1):  # with loss_parallel, then without it
            split.zero_grad()
            with loss_parallel_context(degree):
                out = split(ids, labels)
                out.loss.backward()
            torch.testing.assert_close(out.loss, expected.loss, **close)
            torch.testing.assert_close(out.cross_entropy, expected.cross_entropy, **close)
            for (name, weight), reference in zip(split.named_parameters(), whole.parameters()):
                grad = weight.grad.full_tensor()
                torch.testing.assert_close(grad, reference.grad, **close, msg=f"{change} {name}")
    dist.barrier()  # no rank tears down its connections while a peer still uses them
    dist.destroy_process_group()


def test_split_models_compute_the_whole_ones():
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                             "--nproc_per_node", "2", __file__],
                            capture_output=True, text=True, timeout=180, env=os.environ.copy())
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]


# Tolerance as in test_parallel.py: collectives combine the ranks' partial sums in another
# order than one process's matmuls, so the losses agree to float32 rounding (~1e-7 relative),
# which eight AdamW steps amplify a little; 1e-4 relative is far below what a step of training
# moves the loss (~1e-2).
def test_tensor_parallel_matches_one_process_and_resumes_across_plans(tmp_path, single):
    """tp=2 -> one process -> tp=2 again, each resuming the previous checkpoint (DCP shards,
    safetensors, then DCP): the losses of one process. (FSDP's shards are resumed across
    layouts in test_parallel.py and test_pipeline_parallel.py.)"""
    out = tmp_path / "run"
    tp = ("--tensor-parallel", "2")
    train(out, 3, processes=2, data_parallel=1, extra=tp)
    assert json.loads((out / "parallel.json").read_text())["tp"] == 2
    assert (out / "checkpoints" / "step_3" / "model").is_dir()
    train(out, 6, resume=True, extra=("--tensor-parallel", "1"))
    assert (out / "checkpoints" / "step_6" / "model.safetensors").is_file()
    losses = train(out, 8, processes=2, data_parallel=1, resume=True, extra=tp)
    assert losses == pytest.approx(single, rel=1e-4)
    assert (out / "samples.txt").read_text().count("--- step 8,") == 1  # from a whole copy
    from burrow import load_run

    model, _, _ = load_run(out)  # the tp=2 run's sharded checkpoint, in one process
    assert sum(p.numel() for p in model.parameters()) == model.cfg.num_params()


def test_four_processes_match_one_and_resume_across_plans(tmp_path, single):
    """FSDP over 2 ranks x tp=2 (block 1 recomputed), then HSDP: 2 replicas of 2 shards."""
    out = tmp_path / "run"
    train(out, 2, processes=4, parallel="fsdp", data_parallel=2,
          extra=("--tensor-parallel", "2", "--checkpoint-layers", "1"))
    assert json.loads((out / "parallel.json").read_text())["dp_shard"] == 2
    losses = train(out, 4, processes=4, parallel="fsdp", resume=True,
                   extra=("--tensor-parallel", "1", "--data-parallel-replicate", "2"))
    assert losses == pytest.approx(single[:4], rel=1e-4)
    plan = json.loads((out / "parallel.json").read_text())
    assert (plan["dp_replicate"], plan["dp_shard"], plan["tp"]) == (2, 2, 1)


def test_checkpointed_blocks_compute_the_same_loss_and_gradients():
    """Recomputing blocks (Switch experts with router jitter: the recomputation must draw the
    same noise) changes neither the loss nor a gradient: exactly, as the same kernels run on
    the same inputs. The parameters keep their names."""
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=3, n_heads=2, max_seq_len=16,
                      moe=MoEConfig(num_experts=4, every=2, jitter=0.1))
    torch.manual_seed(0)
    plain = Transformer(cfg)
    recomputed = copy.deepcopy(plain)
    dims = ParallelDims()
    parallelize(recomputed, dims, torch.device("cpu"), bf16=False,
                layers=LayerStrategy.uniform(dims, 3, frozenset({0, 1})))
    assert list(recomputed.state_dict()) == list(plain.state_dict())
    ids = torch.randint(0, 64, (2, 16))
    losses = []
    for model in (plain, recomputed):
        torch.manual_seed(1)
        out = model(ids, ids)
        out.loss.backward()
        losses.append(out.loss)
    assert torch.equal(losses[0], losses[1])
    for (name, a), b in zip(plain.named_parameters(), recomputed.parameters()):
        assert torch.equal(a.grad, b.grad), name


def test_checkpointing_leaves_a_run_unchanged(tmp_path):
    """The same losses and logged expert statistics with every block recomputed (a block's
    second forward must not report its statistics twice)."""
    from burrow.train.launch import train as run
    from burrow.train.metrics import MetricsLog

    rows = []
    for layers in ("none", "all"):
        cfg = tiny_run_config(max_steps=3, checkpoint_layers=layers)
        cfg.model.moe = MoEConfig(num_experts=4, every=2)
        run(cfg, tmp_path / layers, verbose=False)
        rows.append([row for row in MetricsLog(tmp_path / layers / "metrics.jsonl").rows()
                     if row["split"] == "train"])
    assert [row["loss"] for row in rows[0]] == [row["loss"] for row in rows[1]]
    assert [row["aux"] for row in rows[0]] == [row["aux"] for row in rows[1]]


def test_a_plan_per_layer_must_fit_the_job():
    dims = ParallelDims()
    layers = [LayerStrategy(), LayerStrategy(), LayerStrategy(tp=2), LayerStrategy()]
    with pytest.raises(UserError, match="the plan splits block 1 over tp 2, the job over tp 1"):
        parallelize(Transformer(tiny_model()), dims, torch.device("cpu"), False, layers=layers)
    with pytest.raises(UserError, match=r"describes 2 layers, the model has 4 \(the embedding, "
                                        r"2 blocks, the head\)"):
        parallelize(Transformer(tiny_model()), dims, torch.device("cpu"), False,
                    layers=layers[:2])


def test_degrees_from_the_train_config():
    dims = ParallelDims.for_train(TrainConfig(parallel="fsdp", tensor_parallel=2), 8)
    assert (dims.dp_replicate, dims.dp_shard, dims.tp, dims.dp_degree) == (1, 4, 2, 4)
    assert [dims.dp_rank(rank) for rank in range(8)] == [0, 0, 1, 1, 2, 2, 3, 3]
    hybrid = ParallelDims.for_train(TrainConfig(parallel="fsdp", data_parallel_replicate=2), 8)
    assert (hybrid.dp_replicate, hybrid.dp_shard, hybrid.tp) == (2, 4, 1)
    assert ParallelDims.for_train(TrainConfig(tensor_parallel=2), 2).describe() == "tp 2"
    assert TrainConfig(checkpoint_layers="0, 2").checkpointed(3) == {0, 2}
    assert TrainConfig(checkpoint_layers="all").checkpointed(3) == {0, 1, 2}


def retro_model() -> ModelConfig:
    return ModelConfig(vocab_size=64, d_model=32, n_layers=3, n_heads=2, max_seq_len=64,
                       retro=RetroConfig(chunk_size=16, continuation=16, layers=[2]))


@pytest.mark.parametrize("make,words", [
    (lambda: ParallelDims.for_mode("fsdp", 4, tp=3), "train.tensor_parallel=3 must divide the "
                                                     "number of processes (4)"),
    (lambda: ParallelDims.for_mode("ddp", 4, tp=2), "--parallel ddp cannot hold a "
                                                    "tensor-parallel model"),
    (lambda: ParallelDims.for_mode("none", 4, tp=2), "4 processes were started but "
                                                     "train.parallel is none"),
    (lambda: ParallelDims.for_mode("fsdp", 8, tp=2, dp_replicate=3),
     "dp_replicate=3 x dp_shard=1 x tp=2 does not equal the world size 8"),
    (lambda: ParallelDims.for_mode("ddp", 4, dp_shard=2), "--parallel ddp replicates the whole"),
    (lambda: ParallelDims(world_size=3, pp=2, mode="none"),
     "train.pipeline_parallel=2 must divide the number of processes (3)"),
    (lambda: check_tensor_parallel(tiny_model(n_heads=4, n_kv_heads=1), 2),
     "train.tensor_parallel=2 must divide model.n_kv_heads=1"),
    (lambda: check_tensor_parallel(tiny_model(n_heads=4, d_ff=50), 4),
     "must divide model.d_ff=50"),
    (lambda: check_tensor_parallel(tiny_model(vocab_size=63), 2), "model.vocab_size=63"),
    (lambda: check_tensor_parallel(tiny_model(positions="relative"), 2),
     "relative positions are not split"),
    (lambda: check_tensor_parallel(tiny_model(dropout=0.1), 2), "set model.dropout=0"),
    (lambda: check_tensor_parallel(tiny_model(moe=MoEConfig(num_experts=4, every=2)), 2),
     "block 1 has the ffn 'switch', which tensor parallelism does not split"),
    (lambda: check_tensor_parallel(retro_model(), 2), "block 1 has the extra 'cca'"),
    (lambda: TrainConfig(tensor_parallel=0), "train.tensor_parallel must be positive"),
    (lambda: TrainConfig(data_parallel_shard=-1), "train.data_parallel_shard must be >= 0"),
    (lambda: TrainConfig(checkpoint_layers="first"), "train.checkpoint_layers='first' is not"),
    (lambda: RunConfig(model=tiny_model(), train=TrainConfig(checkpoint_layers="2", seq_len=16)
                       ).validate(), "names block 2, but the model has blocks 0 to 1"),
])
def test_bad_degrees_are_one_line_user_errors(make, words):
    with pytest.raises(UserError, match=re.escape(words)) as error:
        make()
    assert "\n" not in str(error.value)


def test_tensor_parallel_in_one_process_is_refused_at_once(tmp_path):
    result = subprocess.run(burrow_command("train", "--preset", "micro", "--out",
                                           str(tmp_path / "run"), "--tensor-parallel", "2"),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "burrow: error: train.tensor_parallel=2 must divide the number of processes (1); start "
        "a multiple of 2 with torchrun --nproc_per_node, or pass --tensor-parallel 1"]


if __name__ == "__main__":
    split_model_worker()
