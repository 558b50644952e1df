"""One validated object that says how a job is spread over processes (torchtitan's ParallelDims).

It checks the degrees against the world size, builds the DeviceMesh, and is saved in the run
directory (parallel.json) so a plan is a file a user can read.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from burrow.errors import UserError

MODES = ("none", "ddp", "fsdp")


@dataclass(frozen=True)
class ParallelDims:
    """Degrees of parallelism; their product is the world size."""

    # Number of processes in the job.
    world_size: int = 1
    # Data-parallel replicas (DDP): each holds the whole model.
    dp_replicate: int = 1
    # Data-parallel shards (FSDP2): parameters, gradients and optimiser state split this many ways.
    dp_shard: int = 1
    # How the model is wrapped: "none", "ddp" or "fsdp".
    mode: str = "none"
    # Expert parallelism: each sparse layer's experts split over this many ranks (GShard).
    ep: int = 1

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise UserError(f"train.parallel={self.mode!r} is not one of {', '.join(MODES)}")
        for name in ("world_size", "dp_replicate", "dp_shard", "ep"):
            if getattr(self, name) < 1:
                raise UserError(f"parallel {name} must be >= 1, got {getattr(self, name)}")
        if self.mode == "none" and self.world_size > 1:
            raise UserError(f"{self.world_size} processes were started but train.parallel is "
                            "none; pass --parallel ddp or --parallel fsdp")
        if self.dp_replicate * self.dp_shard != self.world_size:
            raise UserError(f"dp_replicate={self.dp_replicate} x dp_shard={self.dp_shard} does "
                            f"not equal the world size {self.world_size}")
        hybrid = self.dp_replicate > 1 and self.dp_shard > 1
        if hybrid or (self.mode == "ddp" and self.dp_shard > 1) or (
                self.mode == "fsdp" and self.dp_replicate > 1):
            raise UserError(f"{self.mode} takes all {self.world_size} processes as "
                            f"{'replicas' if self.mode == 'ddp' else 'shards'}; hybrid sharding "
                            "(replicas of shards) is not supported yet")
        if self.world_size % self.ep:
            raise UserError(f"train.expert_parallel={self.ep} must divide the number of "
                            f"processes ({self.world_size}); start a multiple of {self.ep} "
                            "with torchrun --nproc_per_node")
        if self.ep > 1 and self.mode != "ddp":
            raise UserError(f"train.expert_parallel={self.ep} needs --parallel ddp; expert "
                            f"parallelism with {self.mode} is not supported")

    @classmethod
    def for_mode(cls, mode: str, world_size: int, ep: int = 1) -> ParallelDims:
        """The degrees of a data-parallel job: all replicas (ddp) or all shards (fsdp), the
        experts split over `ep` of the ranks."""
        if mode == "ddp":
            return cls(world_size, dp_replicate=world_size, mode=mode, ep=ep)
        if mode == "fsdp":
            return cls(world_size, dp_shard=world_size, mode=mode, ep=ep)
        return cls(world_size, mode=mode, ep=ep)

    def check_experts(self, num_experts: int) -> None:
        """Raise UserError unless the model's experts split evenly over the ep ranks."""
        if self.ep > 1 and num_experts == 0:
            raise UserError(f"train.expert_parallel={self.ep} needs a sparse model; set "
                            "model.moe.num_experts or drop --expert-parallel")
        if num_experts % self.ep:
            raise UserError(f"train.expert_parallel={self.ep} must divide "
                            f"model.moe.num_experts={num_experts}; change one of them")

    @property
    def dp_degree(self) -> int:
        """Processes that read different data."""
        return self.dp_replicate * self.dp_shard

    def build_mesh(self, device_type: str):
        """The DeviceMesh (needs an initialised process group): over the data-parallel ranks,
        or with expert parallelism (world / ep replicas of the experts, ep), each row of ep
        consecutive ranks holding all the experts between them."""
        from torch.distributed.device_mesh import init_device_mesh

        if self.ep > 1:
            return init_device_mesh(device_type, (self.world_size // self.ep, self.ep),
                                    mesh_dim_names=("ep_replicate", "ep"))
        return init_device_mesh(device_type, (self.world_size,), mesh_dim_names=("dp",))

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=1) + "\n")
