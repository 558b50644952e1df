"""A profile of this machine: what profile.py measured, kept as JSON, read without torch.

Galvatron plans from measurements, not datasheets: its profiler times each kind of layer at a
few batch sizes and fits a line, and times collectives per group size (its released code runs
nccl-tests for all-reduce and p2p per group size). A profile here holds the same:

- per model (its layers are the model's real modules) and per tensor-parallel degree, each
  layer kind's (embedding, block, head) forward and backward seconds, with and without
  activation checkpointing, as lines in the tokens of a micro-batch, and the bytes it keeps for
  the backward pass, a line in tokens too;
- per collective (all-reduce, all-gather, reduce-scatter, all-to-all, p2p) and group size, an
  alpha-beta fit: seconds = latency + bytes / bandwidth, bytes counted as collective_seconds
  counts them (costmodel.py), so the fit is that function's answer for the group.

The file is a cache keyed by the machine (`machine()`: CPU or GPU model and count, torch
version), `$BURROW_CACHE/profiles/<key>.json`; a profile measured elsewhere is refused, never
used. Nothing here imports torch: planning from a cached profile starts at once.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from burrow.errors import UserError
from burrow.parallel.planner.hardware import CostInputs

if TYPE_CHECKING:
    from burrow.config import ModelConfig

FORMAT = 1
LAYER_KINDS = ("embedding", "block", "head")


@dataclass(frozen=True)
class Line:
    """y = intercept + slope * x, never below zero (a fit's intercept may be slightly negative)."""

    intercept: float
    slope: float

    def __call__(self, x: float) -> float:
        return max(0.0, self.intercept + self.slope * x)


def fit_line(xs: list[float], ys: list[float]) -> Line:
    """Least-squares line through (xs, ys); a single x gives a line through the origin."""
    if not xs or len(xs) != len(ys):
        raise ValueError("fit_line needs as many ys as xs, at least one")
    n = len(xs)
    mean_x, mean_y = sum(xs) / n, sum(ys) / n
    spread = sum((x - mean_x) ** 2 for x in xs)
    if spread == 0:
        return Line(0.0, mean_y / mean_x if mean_x else 0.0)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / spread
    return Line(mean_y - slope * mean_x, slope)


@dataclass(frozen=True)
class AlphaBeta:
    """A collective's time for `nbytes`: latency + nbytes / bandwidth (Hockney's model)."""

    latency: float
    bandwidth: float

    def seconds(self, nbytes: float) -> float:
        return self.latency + nbytes / self.bandwidth


def fit_alpha_beta(sizes: list[float], seconds: list[float]) -> AlphaBeta:
    """The alpha-beta fit of timings at several message sizes: a least-squares line, its
    intercept the latency (at least zero) and the inverse of its slope the bandwidth. Where
    noise hides the growth with size (a busy machine, small messages), the latency is the
    fastest call and the bandwidth what the largest message got beyond it."""
    line = fit_line(sizes, seconds)
    if line.slope > 0:
        return AlphaBeta(max(0.0, line.intercept), 1.0 / line.slope)
    latency = min(seconds)
    largest = max(range(len(sizes)), key=lambda i: sizes[i])
    beyond = max(seconds[largest] - latency, 1e-3 * seconds[largest])
    return AlphaBeta(latency, sizes[largest] / beyond)


@dataclass(frozen=True)
class LayerProfile:
    """One kind of layer at one tensor-parallel degree: each figure a Line in the tokens of
    one micro-batch (one TP group's sequences x sequence length), per GPU."""

    forward: Line
    backward: Line
    # The backward pass of a checkpointed layer: its forward again, then its backward.
    backward_checkpointed: Line
    # Bytes kept for the backward pass, without and with checkpointing.
    activation: Line
    checkpointed_activation: Line


@dataclass(frozen=True)
class Measured:
    """What the cost model reads from a profile (CostInputs.measured): one model's layers,
    per kind and TP degree, and the machine's collectives, per kind and group size."""

    layers: dict[str, dict[int, LayerProfile]] = field(default_factory=dict)
    collectives: dict[str, dict[int, AlphaBeta]] = field(default_factory=dict)

    def layer(self, kind: str, tp: int) -> LayerProfile | None:
        return self.layers.get(kind, {}).get(tp)

    def collective(self, kind: str, group: int) -> AlphaBeta | None:
        return self.collectives.get(kind, {}).get(group)


def cpu_name() -> str:
    """The CPU's model name as /proc/cpuinfo gives it (Linux), else platform's."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def gpu_names() -> list[str]:
    """Names of the NVIDIA GPUs this process may use (nvidia-smi, no torch), [] without one.
    CUDA_VISIBLE_DEVICES is honoured by counting the devices it names."""
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    names = [line.strip() for line in out.splitlines() if line.strip()]
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        names = names[:len([part for part in visible.split(",") if part.strip()])]
    return names


def machine() -> dict[str, Any]:
    """What a profile is valid for: device kind, its model name and count, torch's version."""
    try:
        torch_version = metadata.version("torch")
    except metadata.PackageNotFoundError:
        torch_version = "none"
    gpus = gpu_names()
    if gpus:
        return {"device": "cuda", "name": gpus[0], "count": len(gpus), "torch": torch_version}
    return {"device": "cpu", "name": cpu_name(), "count": os.cpu_count() or 1,
            "torch": torch_version}


def machine_key(spec: dict[str, Any]) -> str:
    """'cpu-amd-epyc-x2-torch-2-13-0-cpu': the cache file's name for a machine."""
    text = f"{spec['device']}-{spec['name']}-x{spec['count']}-torch-{spec['torch']}"
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def describe_machine(spec: dict[str, Any]) -> str:
    """'2 x AMD EPYC (cpu cores), torch 2.13.0+cpu'."""
    unit = "cpu cores" if spec["device"] == "cpu" else "GPUs"
    return f"{spec['count']} x {spec['name']} ({unit}), torch {spec['torch']}"


def model_key(cfg: ModelConfig, seq_len: int) -> str:
    """A model's entry in a profile: its layers' measurements depend on every field."""
    text = json.dumps({"model": dataclasses.asdict(cfg), "seq_len": seq_len}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def profile_path(spec: dict[str, Any] | None = None) -> Path:
    """$BURROW_CACHE/profiles/<machine key>.json."""
    from burrow.data.cache import cache_dir

    return cache_dir() / "profiles" / f"{machine_key(spec or machine())}.json"


@dataclass
class Profile:
    """One machine's profile: its collectives and the layers of the models measured on it."""

    machine: dict[str, Any]
    # "cpu" or "cuda"; training precision measured ("fp32" on a CPU, "bf16" on a GPU).
    precision: str
    # Memory per device: the GPU's, or on a CPU the RAM that all processes share.
    memory_bytes: float
    # CPU threads each measuring process used (torchrun gives each of several processes one).
    threads: int = 1
    # Collective kind -> group size -> {"fit": AlphaBeta, "points": [[bytes, seconds], ...]}.
    collectives: dict[str, dict[int, dict]] = field(default_factory=dict)
    # model_key -> {"model": fields, "seq_len": int, "layers": kind -> tp -> {...}}.
    models: dict[str, dict] = field(default_factory=dict)

    def check_machine(self, source: str) -> None:
        """UserError unless the profile was measured on this machine."""
        here = machine()
        if self.machine != here:
            raise UserError(f"{source} was measured on {describe_machine(self.machine)}, not on "
                            f"this machine ({describe_machine(here)}); re-profile here with "
                            "burrow plan-parallel --preset NAME --gpus N --profile-only")

    def group_sizes(self) -> set[int]:
        return {group for groups in self.collectives.values() for group in groups}

    def measured(self, key: str) -> Measured:
        """The cost model's view of model `key` on this machine."""
        layers = {kind: {int(tp): LayerProfile(**{name: Line(**line) for name, line in
                                                  entry["fits"].items()})
                         for tp, entry in degrees.items()}
                  for kind, degrees in self.models[key]["layers"].items()}
        collectives = {kind: {int(group): AlphaBeta(**entry["fit"])
                              for group, entry in groups.items()}
                       for kind, groups in self.collectives.items()}
        return Measured(layers, collectives)

    def cost_inputs(self, key: str, processes: int,
                    memory_bytes: float | None = None) -> CostInputs:
        """The planner's inputs for model `key` on `processes` devices of this machine, all in
        one node. Memory per device: `memory_bytes`, else a GPU's, or on a CPU the RAM shared
        evenly. The ring model's bandwidth and latency (used for any collective or group the
        profile did not time) come from the all-reduce over the largest group timed: a ring
        all-reduce moves 2(n-1)/n of the bytes in 2(n-1) steps."""
        entry = self.models[key]
        if memory_bytes is None:
            memory_bytes = self.memory_bytes / (processes if self.machine["device"] == "cpu"
                                                else 1)
        bandwidth, latency = 1e9, 0.0
        reduces = self.collectives.get("all-reduce", {})
        if reduces:
            group = max(reduces)
            fit = AlphaBeta(**reduces[group]["fit"])
            bandwidth = 2 * (group - 1) / group * fit.bandwidth
            latency = fit.latency / (2 * (group - 1))
        flops = entry.get("flops_per_second") or entry["peak_flops"]
        name = f"{self.machine['name']} ({self.machine['device']}, profiled)"
        return CostInputs(gpus_per_node=processes, memory_bytes=memory_bytes,
                          flops_per_second=flops, intra_node_bandwidth=bandwidth,
                          inter_node_bandwidth=bandwidth, intra_node_latency=latency,
                          inter_node_latency=latency, name=name,
                          measured=self.measured(key))

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: Any, source: str) -> Profile:
        fix = "re-profile with burrow plan-parallel --profile-only"
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise UserError(f"{source} is not a burrow profile of format {FORMAT}; {fix}")
        names = [f.name for f in dataclasses.fields(cls)]
        try:
            profile = cls(**{name: data[name] for name in names if name in data})
            profile.collectives = {kind: {int(g): entry for g, entry in groups.items()}
                                   for kind, groups in profile.collectives.items()}
        except (TypeError, AttributeError) as error:
            raise UserError(f"{source} is malformed ({error}); {fix}") from None
        return profile

    def save(self, path: Path) -> None:
        """Write atomically: a half-written profile is never read."""
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f"{path.name}.tmp-{os.getpid()}")
        temporary.write_text(json.dumps(self.to_dict(), indent=1, sort_keys=True) + "\n")
        temporary.replace(path)

    @classmethod
    def load(cls, path: Path) -> Profile:
        """The profile in `path`, checked to be of this machine."""
        source = f"the profile {path}"
        try:
            data = json.loads(Path(path).read_text())
        except json.JSONDecodeError as error:
            raise UserError(f"{source} is not JSON ({error}); re-profile with burrow "
                            "plan-parallel --profile-only") from None
        profile = cls.from_dict(data, source)
        profile.check_machine(source)
        return profile


def read_cached(path: Path | None = None) -> Profile | None:
    """This machine's cached profile (or the one in `path`), None when there is none yet."""
    path = path or profile_path()
    return Profile.load(path) if path.exists() else None
