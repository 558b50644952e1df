"""One validated object that says how a job is spread over processes (torchtitan's ParallelDims).

The degrees multiply to the world size: pp x dp_replicate x dp_shard x tp processes, laid out
in that order on one DeviceMesh with named dimensions, tensor parallelism innermost (consecutive
ranks, which share the fastest links on a machine). `ParallelDims` checks the degrees before a
process group is joined, builds the mesh, and is saved in the run directory (parallel.json) so
that a plan is a file a user can read. `LayerStrategy` is what a planner says of each layer
(the embedding, each block, the head): its layout on the data-parallel ranks, its
tensor-parallel degree, and whether it is recomputed.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from burrow.config import RunConfig, TrainConfig
from burrow.errors import UserError

MODES = ("none", "ddp", "fsdp")
# The mesh's dimensions, outermost first; a degree of 1 leaves its dimension out.
MESH_DIMS = ("pp", "dp_replicate", "dp_shard", "tp")


@dataclass(frozen=True)
class ParallelDims:
    """Degrees of parallelism; their product is the world size."""

    # Number of processes in the job.
    world_size: int = 1
    # Data-parallel replicas: each holds the whole model (ddp), or a copy of the shards (fsdp).
    dp_replicate: int = 1
    # Data-parallel shards (FSDP2): parameters, gradients and optimiser state split this many ways.
    dp_shard: int = 1
    # How the data-parallel ranks hold the model: "none", "ddp" or "fsdp".
    mode: str = "none"
    # Expert parallelism: each sparse layer's experts split over this many ranks (GShard).
    ep: int = 1
    # Tensor parallelism: each block's heads and hidden units split over this many ranks.
    tp: int = 1
    # Pipeline stages: the blocks cut into this many consecutive parts, one per group of ranks.
    pp: int = 1

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise UserError(f"train.parallel={self.mode!r} is not one of {', '.join(MODES)}")
        for name in ("world_size", "dp_replicate", "dp_shard", "ep", "tp", "pp"):
            if getattr(self, name) < 1:
                raise UserError(f"parallel {name} must be >= 1, got {getattr(self, name)}")
        if self.world_size % self.pp:
            raise UserError(f"train.pipeline_parallel={self.pp} must divide the number of "
                            f"processes ({self.world_size}); start a multiple of {self.pp} "
                            "with torchrun --nproc_per_node, or pass --pipeline-parallel 1")
        if self.world_size % self.tp:
            raise UserError(f"train.tensor_parallel={self.tp} must divide the number of "
                            f"processes ({self.world_size}); start a multiple of {self.tp} "
                            "with torchrun --nproc_per_node, or pass --tensor-parallel 1")
        if self.mode == "none" and self.world_size > self.tp * self.pp:
            split = "".join(f" and train.{name} is {degree}" for name, degree in
                            (("tensor_parallel", self.tp), ("pipeline_parallel", self.pp))
                            if degree > 1)
            raise UserError(f"{self.world_size} processes were started but train.parallel is "
                            f"none{split}; pass --parallel ddp or --parallel fsdp")
        if self.mode == "ddp" and self.dp_shard > 1:
            raise UserError(f"--parallel ddp replicates the whole model; dp_shard={self.dp_shard}"
                            " shards it: use --parallel fsdp (with --data-parallel-replicate for "
                            "replicas of the shards)")
        if self.mode == "ddp" and self.tp > 1:
            raise UserError(f"--parallel ddp cannot hold a tensor-parallel model (tp={self.tp}); "
                            "use --parallel fsdp, which keeps replicas with "
                            "--data-parallel-replicate")
        if self.pp * self.dp_replicate * self.dp_shard * self.tp != self.world_size:
            raise UserError(f"pp={self.pp} x dp_replicate={self.dp_replicate} x dp_shard="
                            f"{self.dp_shard} x tp={self.tp} does not equal the world size "
                            f"{self.world_size}")
        if self.world_size % self.ep:
            raise UserError(f"train.expert_parallel={self.ep} must divide the number of "
                            f"processes ({self.world_size}); start a multiple of {self.ep} "
                            "with torchrun --nproc_per_node")
        if self.ep > 1 and self.pp > 1:
            raise UserError(f"train.expert_parallel={self.ep} with train.pipeline_parallel="
                            f"{self.pp} is not supported; drop one of them")
        if self.ep > 1 and self.mode != "ddp":
            raise UserError(f"train.expert_parallel={self.ep} needs --parallel ddp; expert "
                            f"parallelism with {self.mode} is not supported")

    @classmethod
    def for_mode(cls, mode: str, world_size: int, ep: int = 1, *, tp: int = 1, pp: int = 1,
                 dp_replicate: int = 0, dp_shard: int = 0) -> ParallelDims:
        """The degrees of a job of `world_size` processes: `pp` pipeline stages, `tp` ranks
        splitting each layer, and the world / (pp x tp) data-parallel ranks of each stage all
        replicas (ddp) or all shards (fsdp), unless `dp_replicate` or `dp_shard` say how many
        (0: the rest). Experts split over `ep`."""
        data_parallel = max(1, world_size // max(tp * pp, 1))
        if mode == "ddp":
            dp_replicate, dp_shard = dp_replicate or data_parallel, dp_shard or 1
        elif mode == "fsdp":
            dp_replicate = dp_replicate or 1
            dp_shard = dp_shard or max(1, data_parallel // dp_replicate)
        else:
            dp_replicate, dp_shard = dp_replicate or 1, dp_shard or 1
        return cls(world_size, dp_replicate=dp_replicate, dp_shard=dp_shard, mode=mode, ep=ep,
                   tp=tp, pp=pp)

    @classmethod
    def for_train(cls, train: TrainConfig, world_size: int) -> ParallelDims:
        """The degrees a run's train config asks of a job of `world_size` processes."""
        return cls.for_mode(train.parallel, world_size, ep=train.expert_parallel,
                            tp=train.tensor_parallel, pp=train.pipeline_parallel,
                            dp_replicate=train.data_parallel_replicate,
                            dp_shard=train.data_parallel_shard)

    def check_model(self, cfg: RunConfig) -> None:
        """Raise UserError (one line, naming the fix) unless the run `cfg` can be spread as
        these degrees say: experts, tensor and pipeline parallelism each check their part."""
        from burrow.parallel.limits import check_pipeline, check_tensor_parallel

        self.check_experts(cfg.model.moe.num_experts)
        self.layer_strategies(cfg.train, cfg.model.n_layers)
        check_tensor_parallel(cfg.model, self.tp)
        check_pipeline(cfg, self)

    def layer_strategies(self, train: TrainConfig, n_layers: int) -> list[LayerStrategy]:
        """Each layer's strategy, the embedding first and the head last, of a model of
        `n_layers` blocks: the layout train.layer_layouts gives it (default: these degrees'),
        the blocks train.checkpoint_layers names recomputed; UserError (one line) unless
        this job can spread them so."""
        layouts = train.layouts(n_layers) or [(self.dp_replicate, self.dp_shard)] * (
            n_layers + 2)
        checkpointed = train.checkpointed(n_layers)
        flags = [False, *(block in checkpointed for block in range(n_layers)), False]
        layers = [LayerStrategy(replicas, shards, self.tp, flag)
                  for (replicas, shards), flag in zip(layouts, flags)]
        check_layers(layers, self, n_layers)
        return layers

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

    def dp_rank(self, rank: int) -> int:
        """Which share of the data global rank `rank` reads: the ranks of a tensor-parallel
        group compute one model on the same batch."""
        return rank // self.tp % self.dp_degree

    def pp_rank(self, rank: int) -> int:
        """The pipeline stage global rank `rank` runs (the outermost dimension of the mesh)."""
        return rank // (self.world_size // self.pp)

    @property
    def sharded(self) -> bool:
        """Whether a rank holds only part of the weights (then checkpoints are DCP shards)."""
        return self.mode == "fsdp" or self.tp > 1 or self.pp > 1

    def describe(self) -> str:
        """The layout in words, for the log: e.g. "fsdp, 2 replicas x 2 shards, tp 2"."""
        parts = [f"pp {self.pp}"] if self.pp > 1 else []
        parts += [self.mode] if self.mode != "none" else []
        if self.mode == "fsdp" and self.dp_replicate > 1:
            parts.append(f"{self.dp_replicate} replicas x {self.dp_shard} shards")
        if self.tp > 1:
            parts.append(f"tp {self.tp}")
        if self.ep > 1:
            parts.append(f"experts split over {self.ep} ranks")
        return ", ".join(parts) or self.mode

    def build_mesh(self, device_type: str):
        """The DeviceMesh (needs an initialised process group) over the dimensions of
        MESH_DIMS whose degree is above 1, and "dp_shard" always under fsdp (of size 1, FSDP2
        keeps replicas of whole weights: plain data parallelism). A world of one: ("dp_shard",).

        With expert parallelism it is (world / ep replicas of the experts, ep), each row of ep
        consecutive ranks holding all the experts between them.
        """
        from torch.distributed.device_mesh import init_device_mesh

        if self.ep > 1:
            return init_device_mesh(device_type, (self.world_size // self.ep, self.ep),
                                    mesh_dim_names=("ep_replicate", "ep"))
        names = tuple(name for name in MESH_DIMS if getattr(self, name) > 1
                      or (name == "dp_shard" and self.mode == "fsdp")) or ("dp_shard",)
        return init_device_mesh(device_type, tuple(getattr(self, name) for name in names),
                                mesh_dim_names=names)

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=1) + "\n")


def layer_names(n_layers: int) -> list[str]:
    """The layers a plan gives strategies to, in order: the embedding, the blocks, the head."""
    return ["embedding", *(f"block {index}" for index in range(n_layers)), "head"]


@dataclass(frozen=True)
class LayerStrategy:
    """How one layer is spread and recomputed: a planner's answer for that layer (Galvatron).

    The product dp_replicate x dp_shard x tp is the number of ranks of a pipeline stage. The
    embedding's and the head's checkpoint flags change nothing: the embedding keeps no
    activations to recompute, and burrow's fused loss keeps no logits.
    """

    # Data-parallel replicas of this layer's weights.
    dp_replicate: int = 1
    # Data-parallel shards of this layer's weights (FSDP2).
    dp_shard: int = 1
    # Tensor-parallel split of this layer's heads and hidden units (or vocabulary).
    tp: int = 1
    # Recompute this block's activations in the backward pass instead of keeping them.
    checkpoint: bool = False

    @property
    def layout(self) -> tuple[int, int]:
        """(dp_replicate, dp_shard): how the layer's weights lie on the data-parallel ranks."""
        return self.dp_replicate, self.dp_shard

    @classmethod
    def uniform(cls, dims: ParallelDims, n_layers: int,
                checkpointed: frozenset[int] = frozenset()) -> list[LayerStrategy]:
        """Every layer (the embedding, `n_layers` blocks, the head) as `dims` says, the
        blocks in `checkpointed` recomputed."""
        flags = [False, *(block in checkpointed for block in range(n_layers)), False]
        return [cls(dims.dp_replicate, dims.dp_shard, dims.tp, flag) for flag in flags]


def check_layers(layers: list[LayerStrategy], dims: ParallelDims, n_layers: int) -> None:
    """UserError (one line) unless `layers` gives each layer of a model of `n_layers` blocks
    the job's tensor-parallel degree and a layout of its data-parallel ranks: any
    dp_replicate x dp_shard of the job's data-parallel degree under fsdp, the job's own
    under ddp or none."""
    if len(layers) != n_layers + 2:
        raise UserError(f"the plan describes {len(layers)} layers, the model has "
                        f"{n_layers + 2} (the embedding, {n_layers} blocks, the head)")
    for name, layer in zip(layer_names(n_layers), layers):
        replicas, shards = layer.layout
        if layer.tp != dims.tp:
            raise UserError(f"the plan splits {name} over tp {layer.tp}, the job over tp "
                            f"{dims.tp}; one tensor-parallel degree for every layer is "
                            "supported")
        if replicas * shards != dims.dp_degree:
            raise UserError(f"{name} is laid out as {replicas}x{shards} = {replicas * shards} "
                            f"data-parallel ranks, but the job has {dims.dp_degree}; give "
                            "each layer of train.layer_layouts REPLICASxSHARDS of product "
                            f"{dims.dp_degree}, or pass --layer-layouts none")
        if layer.layout != (dims.dp_replicate, dims.dp_shard) and dims.mode != "fsdp":
            raise UserError(f"{name} is laid out as {replicas}x{shards}, the job as "
                            f"{dims.dp_replicate}x{dims.dp_shard} under --parallel {dims.mode}; "
                            "a layout per layer needs --parallel fsdp")
