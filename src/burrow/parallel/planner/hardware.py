"""Accelerators and clusters to plan for without the hardware, and the numbers the cost model reads.

`HARDWARE` holds datasheet figures per GPU: dense bf16 peak, memory, NVLink and InfiniBand
bandwidth, GPUs per node. `CostInputs` is the one object the cost model (costmodel.py) reads:
it is made from a datasheet row and an assumed efficiency (`CostInputs.from_hardware`), or from
a profile measured on the machine (`measured.py`, `profile.py`), which adds each layer's timed
forward and backward passes and saved bytes, and each collective's fitted latency and bandwidth
per group size (`CostInputs.measured`); the cost model reads those where they are present.

Bandwidths are per GPU and per direction, the figure a ring collective is limited by: NVLink's
datasheet number is the sum of both directions, so it is halved here; InfiniBand's is one
NIC's line rate (a DGX node has one NIC per GPU, so a ring that crosses nodes moves each GPU's
share over its own NIC).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from burrow.errors import UserError

if TYPE_CHECKING:
    from burrow.parallel.planner.measured import Measured


@dataclass(frozen=True)
class Hardware:
    """One GPU model and the node it comes in, from the vendor's datasheets."""

    # Name as the datasheet writes it.
    name: str
    # Dense (no structured sparsity) bf16 tensor-core peak, FLOP/s per GPU.
    peak_flops: float
    # HBM per GPU, bytes.
    memory_bytes: float
    # NVLink bandwidth within a node, bytes/s per GPU in one direction.
    nvlink_bandwidth: float
    # InfiniBand bandwidth between nodes, bytes/s per GPU in one direction.
    network_bandwidth: float
    # GPUs per node (one NVLink domain).
    gpus_per_node: int


_GBIT = 1e9 / 8  # bytes/s in one Gb/s

HARDWARE: dict[str, Hardware] = {
    # NVIDIA H100 Tensor Core GPU datasheet, H100 SXM column: BF16 1,979 TFLOPS with sparsity
    # (989.5 dense), 80 GB HBM3, NVLink 900 GB/s (both directions). DGX H100 datasheet: 8 GPUs,
    # 8 single-port ConnectX-7 at 400 Gb/s NDR InfiniBand for the compute fabric.
    "h100": Hardware("H100 SXM", 989.5e12, 80e9, 450e9, 400 * _GBIT, 8),
    # NVIDIA H200 Tensor Core GPU datasheet, H200 SXM column: BF16 1,979 TFLOPS with sparsity,
    # 141 GB HBM3e, NVLink 900 GB/s. DGX H200 datasheet: 8 GPUs, 8 ConnectX-7 at 400 Gb/s.
    "h200": Hardware("H200 SXM", 989.5e12, 141e9, 450e9, 400 * _GBIT, 8),
    # NVIDIA A100 Tensor Core GPU datasheet, A100 80GB SXM column: BF16 624 TFLOPS with sparsity
    # (312 dense), 80 GB HBM2e, NVLink 600 GB/s. DGX A100 datasheet: 8 GPUs, 8 single-port
    # ConnectX-6 at 200 Gb/s HDR InfiniBand for the compute fabric.
    "a100": Hardware("A100 SXM 80GB", 312e12, 80e9, 300e9, 200 * _GBIT, 8),
    # The same datasheet's A100 40GB SXM column: the same peak and NVLink, 40 GB HBM2.
    "a100-40gb": Hardware("A100 SXM 40GB", 312e12, 40e9, 300e9, 200 * _GBIT, 8),
}

# Other spellings people use for the same parts.
_ALIASES = {"h100sxm": "h100", "h200sxm": "h200", "a100sxm": "a100", "a10080gb": "a100",
            "a100sxm80gb": "a100", "a100sxm40gb": "a100-40gb", "a10040gb": "a100-40gb"}


def get_hardware(name: str) -> Hardware:
    """The table's row for `name`, case-insensitively ("h100", "H100 SXM", "a100-40gb")."""
    key = name.strip().lower()
    squashed = "".join(ch for ch in key if ch.isalnum())
    found = HARDWARE.get(key) or HARDWARE.get(_ALIASES.get(squashed, squashed))
    if found is None:
        raise UserError(f"unknown hardware {name!r}; known: {', '.join(HARDWARE)}")
    return found


# What no datasheet gives, assumed (a profile will measure them):
# Share of the bf16 peak a transformer layer's matmuls and attention sustain. PaLM (appendix B)
# reaches 57.8% hardware FLOPs utilisation over a whole step, communication and bubbles
# included; a layer alone runs a little faster.
EFFICIENCY = 0.6
# Start-up time of one step of a ring collective (the alpha of the alpha-beta model): NCCL's
# small-message latency is a few microseconds over NVLink and about twice that over InfiniBand.
INTRA_NODE_LATENCY = 5e-6
INTER_NODE_LATENCY = 10e-6
# How much communication and computation slow each other when they overlap. Galvatron's
# overlap test measures 1.3 (its cost model's dp_overlap_coe and bct_overlap_coe).
OVERLAP_SLOWDOWN = 1.3


@dataclass(frozen=True)
class CostInputs:
    """Everything the cost model knows about the machine."""

    # GPUs that share NVLink; TP and the inner data-parallel ranks are placed within one.
    gpus_per_node: int
    # Memory per GPU the plan may use, bytes.
    memory_bytes: float
    # FLOP/s a layer's matmuls and attention sustain on one GPU.
    flops_per_second: float
    # Bytes/s per GPU per direction within a node and across nodes.
    intra_node_bandwidth: float
    inter_node_bandwidth: float
    # Seconds per step of a ring collective within a node and across nodes.
    intra_node_latency: float = INTRA_NODE_LATENCY
    inter_node_latency: float = INTER_NODE_LATENCY
    # Factor by which overlapped communication and computation each run slower.
    overlap_slowdown: float = OVERLAP_SLOWDOWN
    # Name of the machine, for reports.
    name: str = ""
    # Timed layers and collectives of a profile (measured.py); None: datasheet arithmetic.
    measured: Measured | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        for name in ("gpus_per_node", "memory_bytes", "flops_per_second",
                     "intra_node_bandwidth", "inter_node_bandwidth"):
            if not getattr(self, name) > 0:
                raise UserError(f"{name} must be positive, got {getattr(self, name)}")
        if self.overlap_slowdown < 1:
            raise UserError(f"overlap_slowdown must be >= 1, got {self.overlap_slowdown}")

    @classmethod
    def from_hardware(cls, hardware: Hardware, *, memory_bytes: float | None = None,
                      efficiency: float = EFFICIENCY) -> CostInputs:
        """A datasheet row with the assumed efficiency; `memory_bytes` defaults to the HBM."""
        if not 0 < efficiency <= 1:
            raise UserError(f"efficiency must be in (0, 1], got {efficiency}")
        return cls(gpus_per_node=hardware.gpus_per_node,
                   memory_bytes=hardware.memory_bytes if memory_bytes is None else memory_bytes,
                   flops_per_second=hardware.peak_flops * efficiency,
                   intra_node_bandwidth=hardware.nvlink_bandwidth,
                   inter_node_bandwidth=hardware.network_bandwidth, name=hardware.name)

    def link(self, spans_nodes: bool) -> tuple[float, float]:
        """(bandwidth, latency) of a group of GPUs within one node or across nodes."""
        if spans_nodes:
            return self.inter_node_bandwidth, self.inter_node_latency
        return self.intra_node_bandwidth, self.intra_node_latency
