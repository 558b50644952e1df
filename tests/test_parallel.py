"""Data parallelism under torchrun on CPU (gloo): DDP and FSDP2 against one process."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from burrow import UserError
from burrow.infer import generate
from burrow.parallel import ParallelDims
from burrow.train.metrics import MetricsLog
from conftest import CORPUS

# One optimiser step = 8 sequences of 64 tokens in every layout below: 8 in one process, or
# 4 on each of two ranks. A constant schedule makes a run of 4 steps + 4 resumed steps follow
# the same learning rates as 8 straight.
COMMON = ["--preset", "micro", "--data", str(CORPUS), "--set", "model.vocab_size=512",
          "--set", "model.max_seq_len=64", "--set", "data.val_fraction=0.25", "--seq-len", "64",
          "--batch-tokens", "512", "--warmup-steps", "2", "--schedule", "constant",
          "--eval-every", "0", "--eval-tokens", "1024", "--log-every", "1", "--device", "cpu"]


def train(out: Path, steps: int, processes: int = 1, parallel: str = "none",
          resume: bool = False, extra: tuple[str, ...] = (),
          data_parallel: int | None = None) -> list[float]:
    """The train losses of `burrow train` on the test corpus; `data_parallel` ranks (default:
    every process) share the step's 8 sequences."""
    if processes == 1:
        launcher = [sys.executable, "-m", "burrow"]
    else:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                    "--nproc_per_node", str(processes), "-m", "burrow"]
    args = [*launcher, "train", *COMMON, "--out", str(out), "--max-steps", str(steps),
            "--micro-batch-size", str(8 // (data_parallel or processes)), "--parallel", parallel,
            *extra]
    result = subprocess.run(args + (["--resume"] if resume else []), capture_output=True,
                            text=True, timeout=300, env=os.environ.copy())
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    rows = MetricsLog(out / "metrics.jsonl").rows()
    return [row["loss"] for row in rows if row["split"] == "train"]


@pytest.fixture(scope="module")
def fsdp_checkpoint(tmp_path_factory) -> Path:
    """Four steps sharded over two processes: a checkpoint of DCP shards at step 4."""
    out = tmp_path_factory.mktemp("fsdp") / "run"
    train(out, 4, processes=2, parallel="fsdp")
    return out


# Tolerance: the ranks' gradients are averaged by an all-reduce instead of one mean over the
# whole batch, so they agree with the single process to float32 rounding (~1e-7 relative);
# eight AdamW steps amplify that a little. 1e-4 relative is far below any real difference
# (one step of training moves the loss by ~1e-2).
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_match_one(tmp_path, single, parallel):
    losses = train(tmp_path / "run", 8, processes=2, parallel=parallel)
    assert losses == pytest.approx(single, rel=1e-4)
    plan = json.loads((tmp_path / "run" / "parallel.json").read_text())
    assert plan == {"world_size": 2, "dp_replicate": 2 if parallel == "ddp" else 1,
                    "dp_shard": 2 if parallel == "fsdp" else 1, "mode": parallel, "ep": 1,
                    "tp": 1, "pp": 1}


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_ddp_and_fsdp_run_in_one_process_without_torchrun(tmp_path, single, parallel):
    """A plain `burrow train --parallel ddp|fsdp` makes its own group of one process."""
    assert train(tmp_path / "run", 8, parallel=parallel) == pytest.approx(single, rel=1e-4)


# "fsdp": the run's own config, as `burrow train --out RUN --resume` reads it on a laptop
@pytest.mark.parametrize("resumed_as", ["none", "fsdp"])
def test_fsdp_checkpoint_resumes_with_one_process(tmp_path, single, fsdp_checkpoint,
                                                  resumed_as):
    out = tmp_path / "run"
    shutil.copytree(fsdp_checkpoint, out)
    checkpoint = out / "checkpoints" / "step_4"
    assert (checkpoint / "model").is_dir() and (checkpoint / "optimizer").is_dir()
    losses = train(out, 8, parallel=resumed_as, resume=True)
    assert losses == pytest.approx(single, rel=1e-4)
    from burrow import load_run

    model, _, _ = load_run(out)  # the final single-process checkpoint
    assert sum(p.numel() for p in model.parameters()) > 0


def test_single_checkpoint_resumes_with_two_processes(tmp_path, single):
    out = tmp_path / "run"
    train(out, 4)
    losses = train(out, 8, processes=2, parallel="ddp", resume=True)
    assert losses == pytest.approx(single, rel=1e-4)


def test_load_run_reads_a_sharded_checkpoint(fsdp_checkpoint):
    from burrow import load_run

    assert (fsdp_checkpoint / "checkpoints" / "step_4" / "model").is_dir()
    model, tokenizer, _ = load_run(fsdp_checkpoint)
    import torch

    ids = torch.tensor([tokenizer.encode("def ")])
    assert generate(model, ids, 4, temperature=0).shape[1] == ids.shape[1] + 4


def test_fsdp_in_bfloat16_with_big_matrices_writes_its_sample(tmp_path):
    """The run ends with a generated sample: its KV cache takes the dtype FSDP computes in
    (bfloat16), not the float32 of the stored shards, and the oneDNN decode path (for weights
    of 2^18 elements and more: the 512 x 512 head here) leaves sharded weights alone."""
    out = tmp_path / "run"
    train(out, 2, processes=2, parallel="fsdp",
          extra=("--precision", "bf16", "--set", "model.d_model=512"))
    assert (out / "samples.txt").read_text().count("--- step 2,") == 1


def test_parallel_dims_validation():
    assert ParallelDims.for_mode("fsdp", 4).dp_shard == 4
    assert ParallelDims.for_mode("ddp", 4).dp_degree == 4
    with pytest.raises(UserError, match="--parallel ddp"):
        ParallelDims.for_mode("none", 2)
    with pytest.raises(UserError, match="does not equal the world size"):
        ParallelDims(world_size=4, dp_replicate=3, mode="ddp")
    hybrid = ParallelDims.for_mode("fsdp", 4, dp_replicate=2)  # HSDP: 2 replicas of 2 shards
    assert (hybrid.dp_replicate, hybrid.dp_shard, hybrid.dp_degree) == (2, 2, 4)
    with pytest.raises(UserError, match=r"train\.parallel"):
        ParallelDims(mode="tp")
