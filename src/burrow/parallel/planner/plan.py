"""A parallel plan: the planner's output, a file a user can read and a trainer can follow.

It says, for one model on one number of GPUs, how the layers are cut into pipeline stages, how
many micro-batches a step runs, and each layer's strategy (tensor-parallel degree, data-parallel
replicas or shards, checkpointing), with the step time and memory the cost model predicts.
`Plan.from_json` refuses a plan that cannot work (degrees that do not multiply to the stage's
GPUs or do not divide the heads or the micro-batch) and `Plan.check` one made for another
model or another number of GPUs, each in one line that says what to fix.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from burrow.errors import UserError
from burrow.parallel.dims import layer_names
from burrow.parallel.planner.costmodel import Strategy

if TYPE_CHECKING:
    from burrow.config import ModelConfig

# The mesh's named dimensions, outermost first (torchtitan's ParallelDims names).
MESH_DIMS = ("pp", "dp_replicate", "dp_shard", "tp", "ep")
# The model's fields a plan depends on; a plan made for other values does not apply.
SHAPE_FIELDS = ("n_layers", "d_model", "n_heads", "vocab_size", "seq_len")
_FIX = "make a new one with burrow plan-parallel"


def model_fingerprint(cfg: ModelConfig, seq_len: int, preset: str | None = None) -> dict:
    """The preset's name (when there is one) and the shape fields a plan depends on."""
    return {"preset": preset, "n_layers": cfg.n_layers, "d_model": cfg.d_model,
            "n_heads": cfg.n_heads, "vocab_size": cfg.vocab_size, "seq_len": seq_len}


@dataclass(frozen=True)
class LayerPlan:
    """One layer's strategy."""

    name: str
    tp: int
    dp_replicate: int
    dp_shard: int
    checkpoint: bool

    @classmethod
    def of(cls, name: str, strategy: Strategy) -> LayerPlan:
        return cls(name, strategy.tp, strategy.dp_replicate, strategy.dp_shard,
                   strategy.checkpoint)

    @property
    def strategy(self) -> Strategy:
        return Strategy(self.tp, self.dp_replicate, self.dp_shard, self.checkpoint)


@dataclass(frozen=True)
class Plan:
    """How to train one model on `world_size` GPUs, and what the cost model predicts for it."""

    # The model it was made for: preset name and SHAPE_FIELDS (model_fingerprint).
    model: dict
    # Number of GPUs.
    world_size: int
    # The device grid: pp x dp_replicate x dp_shard x tp x ep = world_size, tp innermost. It is
    # the grid of the plan's most common layer strategy; a layer with another strategy regroups
    # the same GPUs of its stage (its TP group is still consecutive GPUs).
    mesh: dict
    # Layers (embedding, blocks, head) per pipeline stage, first stage first.
    stages: tuple[int, ...]
    # Micro-batches per step.
    micro_batches: int
    # Sequences per micro-batch over a stage's GPUs (micro_batches x micro_batch_size is the
    # global batch); a layer with data-parallel degree d gives each rank 1/d of them.
    micro_batch_size: int
    # Each layer's strategy, in order.
    layers: tuple[LayerPlan, ...]
    # Predicted seconds per step.
    predicted_step_s: float
    # Predicted bytes per GPU at the peak (the most loaded stage).
    peak_memory_bytes: float
    # The hardware the prediction is for.
    hardware: str = ""

    def __post_init__(self) -> None:
        self._check_mesh()
        self._check_layers()

    @property
    def pp(self) -> int:
        return self.mesh["pp"]

    @property
    def global_batch(self) -> int:
        """Sequences per step."""
        return self.micro_batches * self.micro_batch_size

    def strategies(self) -> list[Strategy]:
        return [layer.strategy for layer in self.layers]

    def _check_mesh(self) -> None:
        if sorted(self.mesh) != sorted(MESH_DIMS):
            raise UserError(f"plan: mesh must name {', '.join(MESH_DIMS)}, got "
                            f"{', '.join(self.mesh)}; {_FIX}")
        product = 1
        for dim in MESH_DIMS:
            if not isinstance(self.mesh[dim], int) or self.mesh[dim] < 1:
                raise UserError(f"plan: mesh {dim} must be a positive integer, got "
                                f"{self.mesh[dim]!r}")
            product *= self.mesh[dim]
        if product != self.world_size:
            sizes = " x ".join(f"{dim} {self.mesh[dim]}" for dim in MESH_DIMS)
            raise UserError(f"plan: the mesh {sizes} has {product} GPUs, not world_size "
                            f"{self.world_size}; {_FIX}")
        if len(self.stages) != self.pp or min(self.stages, default=0) < 1:
            raise UserError(f"plan: stages {list(self.stages)} must be {self.pp} positive layer "
                            f"counts, one per pipeline stage (mesh pp {self.pp}); {_FIX}")

    def _check_layers(self) -> None:
        n_layers, heads = self.model.get("n_layers"), self.model.get("n_heads")
        if not all(isinstance(self.model.get(name), int) and self.model[name] > 0
                   for name in SHAPE_FIELDS):
            raise UserError(f"plan: model must give positive integers {', '.join(SHAPE_FIELDS)}"
                            f"; {_FIX}")
        names = layer_names(n_layers)
        if [layer.name for layer in self.layers] != names:
            raise UserError(f"plan: layers must be {len(names)} entries named embedding, block 0 "
                            f"... block {n_layers - 1}, head for a model of {n_layers} blocks; "
                            f"{_FIX}")
        if sum(self.stages) != len(names):
            raise UserError(f"plan: stages {list(self.stages)} hold {sum(self.stages)} layers "
                            f"but the model has {len(names)} (embedding, {n_layers} blocks, "
                            f"head); make them add up")
        if self.micro_batches < 1 or self.micro_batch_size < 1:
            raise UserError("plan: micro_batches and micro_batch_size must be positive")
        stage_gpus = self.world_size // self.pp
        for layer in self.layers:
            strategy = layer.strategy
            if strategy.devices != stage_gpus:
                raise UserError(f"plan: {layer.name}: tp {layer.tp} x dp_replicate "
                                f"{layer.dp_replicate} x dp_shard {layer.dp_shard} = "
                                f"{strategy.devices} GPUs, but a stage has {stage_gpus}; make "
                                "the degrees multiply to world_size / pp")
            if heads % layer.tp:
                raise UserError(f"plan: {layer.name}: tp {layer.tp} does not divide the "
                                f"model's {heads} heads; use a tp that divides {heads}")
            if self.micro_batch_size % strategy.dp:
                raise UserError(f"plan: {layer.name}: data-parallel degree {strategy.dp} does "
                                f"not divide the micro-batch of {self.micro_batch_size} "
                                "sequences; change micro_batches or the degrees")

    def check(self, cfg: ModelConfig, world_size: int, seq_len: int) -> None:
        """Raise UserError unless the plan was made for this model shape and number of GPUs."""
        wanted = model_fingerprint(cfg, seq_len)
        differ = [f"{name} {self.model[name]} (this model: {wanted[name]})"
                  for name in SHAPE_FIELDS if self.model[name] != wanted[name]]
        if differ:
            made_for = self.model.get("preset") or "another model"
            raise UserError(f"the plan was made for {made_for}: {', '.join(differ)}; {_FIX} "
                            "for this model")
        if self.world_size != world_size:
            raise UserError(f"the plan is for {self.world_size} GPUs, not {world_size}; "
                            f"{_FIX} --gpus {world_size}")

    def to_dict(self) -> dict[str, Any]:
        result = asdict(self)
        result["stages"], result["layers"] = list(self.stages), list(result["layers"])
        return result

    @classmethod
    def from_dict(cls, data: Any) -> Plan:
        """A Plan from its to_dict(); UserError naming what is missing or malformed."""
        if not isinstance(data, dict):
            raise UserError(f"plan: expected a JSON object, got {type(data).__name__}")
        for name in ("model", "mesh"):
            if not isinstance(data.get(name), dict):
                raise UserError(f"plan: {name} must be an object; {_FIX}")
        names = [field.name for field in fields(cls)]
        missing = [name for name in names if name not in data and name != "hardware"]
        unknown = [name for name in data if name not in names]
        if missing or unknown:
            raise UserError(f"plan: missing {', '.join(missing) or 'nothing'}, unknown "
                            f"{', '.join(unknown) or 'nothing'}; {_FIX}")
        try:
            layers = tuple(LayerPlan(**layer) for layer in data["layers"])
            stages = tuple(int(count) for count in data["stages"])
        except (TypeError, ValueError) as error:
            raise UserError(f"plan: malformed layers or stages ({error}); {_FIX}") from None
        return cls(**{**data, "layers": layers, "stages": stages})

    def to_json(self) -> str:
        """Indented JSON with one layer per line."""
        head = self.to_dict()
        layers = head.pop("layers")
        body = json.dumps(head, indent=2)[:-2]  # without the closing "\n}"
        rows = ",\n".join("    " + json.dumps(layer) for layer in layers)
        return f'{body},\n  "layers": [\n{rows}\n  ]\n}}\n'

    @classmethod
    def from_json(cls, text: str) -> Plan:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise UserError(f"plan: not JSON ({error}); {_FIX}") from None
        return cls.from_dict(data)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        return cls.from_json(Path(path).read_text())


def mesh_of(strategies: list[Strategy], pp: int) -> dict[str, int]:
    """The mesh of a plan: pp, and the degrees of its most common layer strategy."""
    common = Counter((s.dp_replicate, s.dp_shard, s.tp) for s in strategies).most_common(1)[0][0]
    return dict(zip(MESH_DIMS, (pp, *common, 1)))
