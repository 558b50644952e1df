"""Expert parallelism under torchrun on CPU (gloo): split experts against the whole layer.

Run as a script under torchrun, this file is the worker of the layer test.
"""

import copy
import json
import math
import os
import re
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from burrow import UserError
from burrow.config import ModelConfig, MoEConfig, TrainConfig
from burrow.model.context import ForwardContext, Init
from burrow.parallel import ParallelDims
from burrow.train.metrics import MetricsLog
from test_parallel import train

# The layers the worker splits: tokens dropped over capacity, and dropless top-2 routing,
# where the ranks' capacities differ and must be agreed on.
LAYERS = [dict(ffn="swiglu", moe=dict(capacity_factor=0.5)),
          dict(ffn="gelu", moe=dict(top_k=2, dropless=True))]


def probed_loss(layer, x: torch.Tensor, probe: torch.Tensor, seed: int):
    """A loss that reaches every output value and the router's losses; and the layer's output.
    `seed`: the random draws of top-2 routing (GShard's random routing), the same for a rank's
    tokens in the whole layer and the split one."""
    torch.manual_seed(seed)
    ctx = ForwardContext(torch.arange(x.shape[1]))
    y = layer(x, ctx)
    stats = {term.name: term.value for term in ctx.aux}
    loss = (y * probe).sum() + stats["balance_loss"] + stats["router_z_loss"]
    return loss, y, SimpleNamespace(dropped=stats["dropped"])


def switch_layer_worker() -> None:
    """Each rank sends its own tokens through the split layer and checks the outputs and the
    gradients against the whole layer run on every rank's tokens in this one process.

    Everything is float64: the split layer sums an expert's gradient over ep x C rows in one
    matmul and the router's over ranks by all-reduce, where the whole layer sums them in
    another order, so the two differ by float64 rounding (~1e-16 relative). rtol 1e-10 leaves
    a wide margin for that, while a token sent to the wrong expert or a wrong 1/W factor
    changes values at order one.
    """
    import torch.distributed as dist

    from burrow.model.moe import SwitchMLP
    from burrow.parallel.expert import (
        clip_grad_norm_,
        full_expert_weights,
        local_experts,
        reduce_expert_gradients,
        shard_experts,
    )

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = ParallelDims.for_mode("ddp", world, ep=2).build_mesh("cpu")
    first = rank - rank % 2  # a row of the mesh: two consecutive ranks hold all the experts
    assert dist.get_process_group_ranks(mesh.get_group("ep")) == [first, first + 1]
    close = dict(rtol=1e-10, atol=1e-12)
    for layer in LAYERS:
        torch.manual_seed(0)
        cfg = ModelConfig(vocab_size=64, d_model=16, n_layers=1, n_heads=2, d_ff=24,
                          max_seq_len=32, ffn=layer["ffn"],
                          moe=MoEConfig(num_experts=4, every=1, **layer["moe"]))
        whole = SwitchMLP(cfg, layer=0).double()
        whole.router.init_weights(Init("gpt2", 1))
        whole.experts.init_weights(Init("gpt2", 1))
        split = copy.deepcopy(whole)
        shard_experts(split, mesh)
        tokens = torch.randn(world, 2, 8, 16, dtype=torch.float64)  # the same on every rank
        probe = torch.randn(2, 8, 16, dtype=torch.float64)
        # One process: the global loss is the mean of the ranks' losses (DDP's average).
        everything = tokens.clone().requires_grad_()
        results = [probed_loss(whole, everything[r], probe, seed=r) for r in range(world)]
        (sum(result[0] for result in results) / world).backward()
        # Split: this rank's loss; the dense router's gradient averaged as DDP would.
        mine = tokens[rank].clone().requires_grad_()
        local_loss, y, stats = probed_loss(split, mine, probe, seed=rank)
        local_loss.backward()
        for weight in split.router.parameters():
            dist.all_reduce(weight.grad)
            weight.grad /= world
        reduce_expert_gradients(split)

        if layer["moe"].get("capacity_factor", 1.0) < 1.0:
            assert float(stats.dropped) > 0  # the comparison covers dropped tokens
        torch.testing.assert_close(y, results[rank][1], **close)
        torch.testing.assert_close(mine.grad / world, everything.grad[rank], **close)
        torch.testing.assert_close(split.router.weight.grad, whole.router.weight.grad, **close)
        per_rank = 4 // 2
        rows = slice(rank % 2 * per_rank, (rank % 2 + 1) * per_rank)
        for name, weight in split.experts.named_parameters():
            full = getattr(whole.experts, name)
            torch.testing.assert_close(weight.grad, full.grad[rows], **close)
        # Checkpoints: gathering gives the whole layer's weights, slicing this rank's again.
        full_weights = {name: weight.detach() for name, weight in whole.named_parameters()}
        gathered = full_expert_weights(split)
        assert sorted(gathered) == sorted(n for n in full_weights if n.startswith("experts."))
        for name, tensor in gathered.items():
            torch.testing.assert_close(tensor, full_weights[name], rtol=0, atol=0)
        for name, tensor in local_experts(split, full_weights).items():
            torch.testing.assert_close(tensor, split.get_parameter(name).detach(), rtol=0, atol=0)
        # The clipping norm is the whole layer's gradient norm.
        expected = torch.nn.utils.get_total_norm([p.grad for p in whole.parameters()])
        torch.testing.assert_close(clip_grad_norm_(split, math.inf), expected, **close)
    dist.barrier()  # no rank tears down its connections while a peer still uses them
    dist.destroy_process_group()


# 2 processes: one group of two ranks splits the experts. 4 processes: two such groups, each
# expert replicated twice, so that the expert gradients are also summed over the replicas.
@pytest.mark.parametrize("processes", [2, 4])
def test_split_switch_layer_matches_the_whole_one(processes):
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                             "--nproc_per_node", str(processes), __file__],
                            capture_output=True, text=True, timeout=120, env=os.environ.copy())
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]


# A tiny sparse model: both blocks with 4 experts. Dropless routing and no balance loss make
# one process on 8 sequences compute what two ranks on 4 sequences each do: with a capacity
# factor, each rank would drop its own overflow (which tokens depends on the batch each sees),
# and the balance loss alpha N sum f_i P_i is a product of means over the batch, so the mean
# of the ranks' values is not the value over the whole batch. The router z-loss is a mean over
# tokens and stays on.
MOE = ("--set", "model.moe.num_experts=4", "--set", "model.moe.every=1",
       "--set", "model.moe.dropless=true", "--set", "model.moe.balance_loss=0")
EXPERT_PARALLEL = (*MOE, "--expert-parallel", "2")


def grad_norms(out) -> list[float]:
    rows = MetricsLog(out / "metrics.jsonl").rows()
    return [row["grad_norm"] for row in rows if row["split"] == "train"]


# Tolerance as in test_parallel.py: the ranks' gradients are combined by collectives instead of
# one mean over the batch, so they agree to float32 rounding, which eight AdamW steps amplify
# a little; 1e-4 relative is far below what a step of training moves the loss (~1e-2).
def test_expert_parallel_training_matches_one_process_and_resumes(tmp_path):
    single = tmp_path / "single"
    expected = train(single, 8, extra=MOE)
    out = tmp_path / "run"
    train(out, 2, processes=2, parallel="ddp", extra=EXPERT_PARALLEL)
    assert json.loads((out / "parallel.json").read_text())["ep"] == 2
    # The checkpoint holds every expert, and their AdamW moments, whatever the split.
    checkpoint = out / "checkpoints" / "step_2"
    name = "blocks.0.mlp.experts.up_proj"
    assert load_file(checkpoint / "model.safetensors")[name].shape[0] == 4
    optimizer = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    assert optimizer["state"][name]["exp_avg"].shape[0] == 4
    # Split -> FSDP shards -> split again, each resuming the previous (one process reads the
    # split's whole safetensors as it reads any run's).
    train(out, 5, processes=2, parallel="fsdp", resume=True, extra=(*MOE, "--expert-parallel", "1"))
    losses = train(out, 8, processes=2, parallel="ddp", resume=True, extra=EXPERT_PARALLEL)
    assert losses == pytest.approx(expected, rel=1e-4)
    assert grad_norms(out) == pytest.approx(grad_norms(single), rel=1e-4)


def test_parallel_dims_with_experts():
    dims = ParallelDims.for_mode("ddp", 4, ep=2)
    assert (dims.ep, dims.dp_replicate, dims.dp_degree) == (2, 4, 4)
    assert ParallelDims.for_mode("ddp", 2).ep == 1


@pytest.mark.parametrize("make,words", [
    (lambda: ParallelDims.for_mode("ddp", 4, ep=3), "train.expert_parallel=3 must divide the "
                                                    "number of processes (4)"),
    (lambda: ParallelDims.for_mode("ddp", 1, ep=2), "start a multiple of 2 with torchrun"),
    (lambda: ParallelDims.for_mode("fsdp", 2, ep=2), "needs --parallel ddp"),
    (lambda: ParallelDims.for_mode("ddp", 2, ep=0), "ep must be >= 1"),
    (lambda: TrainConfig(expert_parallel=0), "train.expert_parallel must be positive"),
    (lambda: ParallelDims.for_mode("ddp", 6, ep=3).check_experts(4),
     "train.expert_parallel=3 must divide model.moe.num_experts=4"),
    (lambda: ParallelDims.for_mode("ddp", 2, ep=2).check_experts(0), "needs a sparse model"),
])
def test_bad_expert_parallel_degrees_are_one_line_user_errors(make, words):
    with pytest.raises(UserError, match=re.escape(words)) as error:
        make()
    assert "\n" not in str(error.value)


if __name__ == "__main__":
    switch_layer_worker()
