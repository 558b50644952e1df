"""What one layer costs under one strategy: time per micro-batch, time once per step, memory.

Galvatron (Miao et al., VLDB 2023, §4) estimates each layer's time and memory under each
strategy and the cost of changing strategy between consecutive layers; the search (search.py)
adds them up. A strategy here is one layer's data-parallel replicas (DDP), sharded data-parallel
degree (ZeRO-3 / FSDP), tensor-parallel degree (Megatron's column- then row-wise split with
sequence parallelism) and activation checkpointing; pipeline parallelism is chosen outside, for
the whole model.

Devices are laid out as [pipeline stage][data-parallel rank][tensor-parallel rank]: TP groups
are consecutive GPUs, so they stay inside a node, and the pipeline is outermost, so stages are
whole nodes once a stage has a node's worth of GPUs (Galvatron §3 puts PP across nodes and
TP within one for the same reason: TP talks most, PP least).

Communication follows the alpha-beta model of ring collectives over n GPUs (Thakur et al.
2005; NCCL's rings): an all-reduce moves 2(n-1)/n of the bytes through every GPU's link in
2(n-1) steps, an all-gather or a reduce-scatter (n-1)/n of the gathered bytes in n-1 steps, an
all-to-all (n-1)/n of each GPU's buffer; a group within a node uses NVLink, one across nodes
InfiniBand. All numbers about the machine come from one CostInputs.
"""

from __future__ import annotations

from dataclasses import dataclass

from burrow.errors import UserError
from burrow.parallel.planner.hardware import CostInputs
from burrow.parallel.planner.layers import ELEMENT_BYTES, STATE_BYTES_PER_PARAM, LayerShape


@dataclass(frozen=True)
class Strategy:
    """How one layer is spread over the GPUs of its pipeline stage."""

    # Tensor-parallel degree: the layer's weights split over this many consecutive GPUs.
    tp: int = 1
    # Data-parallel replicas: each holds the TP shard whole; gradients all-reduced once a step.
    dp_replicate: int = 1
    # Sharded data parallelism (ZeRO-3): weights, gradients, optimiser state split this many ways.
    dp_shard: int = 1
    # Keep only the layer's input and recompute the rest in the backward pass.
    checkpoint: bool = False

    def __post_init__(self) -> None:
        for name in ("tp", "dp_replicate", "dp_shard"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be >= 1, got {getattr(self, name)}")

    @property
    def dp(self) -> int:
        """Data-parallel degree: ranks that read different sequences."""
        return self.dp_replicate * self.dp_shard

    @property
    def devices(self) -> int:
        return self.tp * self.dp

    def label(self) -> str:
        """'tp 8 x dp_shard 8 + checkpoint', 'dp_replicate 64', 'tp 8'."""
        parts = [f"{name} {degree}" for name, degree in (("tp", self.tp), ("dp_replicate",
                 self.dp_replicate), ("dp_shard", self.dp_shard)) if degree > 1]
        return " x ".join(parts or ["1 GPU"]) + (" + checkpoint" if self.checkpoint else "")


@dataclass(frozen=True)
class Step:
    """What a layer's cost depends on besides its strategy: the step its stage runs."""

    # Tokens per sequence.
    seq_len: int
    # Sequences per micro-batch over all of the stage's GPUs; a layer with data-parallel degree
    # d gives each of its TP groups micro_batch_size / d of them.
    micro_batch_size: int
    # Micro-batches per step (gradient accumulation; the pipeline's micro-batches).
    micro_batches: int
    # Micro-batches whose activations the stage holds at once: 1F1B's stage i of p keeps
    # min(p - i, micro_batches) (Narayanan et al. 2021, §2.2).
    in_flight: int
    # GPUs of the pipeline stage.
    devices: int
    # "bf16" (mixed precision) or "fp32".
    precision: str = "bf16"


@dataclass(frozen=True)
class LayerCost:
    """One layer under one strategy."""

    # Seconds of one micro-batch's forward pass, exposed communication included.
    forward_s: float
    # Seconds of one micro-batch's backward pass (recomputation and overlapped FSDP traffic
    # included).
    backward_s: float
    # Seconds once per step: the part of DDP's gradient all-reduce that the backward pass of
    # the last micro-batch does not hide.
    sync_s: float
    # Bytes per GPU: model state plus the activations of the micro-batches in flight.
    memory_bytes: float

    def step_seconds(self, micro_batches: int) -> float:
        """The layer's share of a step that runs `micro_batches` micro-batches."""
        return micro_batches * (self.forward_s + self.backward_s) + self.sync_s


COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "p2p")


def collective_seconds(kind: str, nbytes: float, group: int, spans_nodes: bool,
                       inputs: CostInputs) -> float:
    """Alpha-beta time of a collective over `group` GPUs. `nbytes` is the whole tensor for
    all-reduce, the gathered (unsharded) size for all-gather and reduce-scatter, one GPU's
    buffer for all-to-all, the message for p2p."""
    if kind not in COLLECTIVES:
        raise ValueError(f"unknown collective {kind!r}")
    if group <= 1 or nbytes <= 0:
        return 0.0
    # A profile's fit for this kind and group size is the measured answer (measured.py).
    fit = inputs.measured.collective(kind, group) if inputs.measured is not None else None
    if fit is not None:
        return fit.seconds(nbytes)
    bandwidth, latency = inputs.link(spans_nodes)
    if kind == "p2p":
        return latency + nbytes / bandwidth
    share = (group - 1) / group
    steps = group - 1
    if kind == "all-reduce":  # a reduce-scatter, then an all-gather
        share, steps = 2 * share, 2 * steps
    return steps * latency + share * nbytes / bandwidth


def overlapped(compute_s: float, communication_s: float, slowdown: float) -> float:
    """Seconds for computation and communication running side by side. Galvatron's cost model
    (bct_dp_overlap) slows both by the same factor while they overlap; the shorter finishes
    after slowdown x its time, the rest of the longer runs alone: max + (slowdown - 1) x min."""
    return (max(compute_s, communication_s)
            + (slowdown - 1) * min(compute_s, communication_s))


def layer_cost(shape: LayerShape, strategy: Strategy, step: Step,
               inputs: CostInputs) -> LayerCost:
    """Time and memory of `shape` under `strategy` in a stage running `step`."""
    if step.micro_batch_size % strategy.dp:
        raise UserError(f"{shape.name}: data-parallel degree {strategy.dp} does not divide the "
                        f"micro-batch of {step.micro_batch_size} sequences")
    tp, nodes = strategy.tp, inputs.gpus_per_node
    tokens = step.micro_batch_size // strategy.dp * step.seq_len  # one TP group's, a micro-batch
    forward_compute, backward_compute, kept = compute_and_activations(shape, strategy, tokens,
                                                                      inputs)

    # Megatron with sequence parallelism (Korthikanti et al. 2022, §4.2.2): all-gathers and
    # reduce-scatters of the TP group's activation, on the critical path; the recomputed
    # forward repeats its own.
    gather_activation = collective_seconds("all-gather", shape.boundary_bytes_per_token * tokens,
                                           tp, tp > nodes, inputs)
    tp_forward = shape.tp_collectives * gather_activation
    tp_backward = tp_forward * (1 + strategy.checkpoint)

    # Data parallelism's groups hold one GPU per TP rank across the whole stage.
    spans = step.devices > nodes
    weight_bytes = shape.params / tp * ELEMENT_BYTES[step.precision]
    # FSDP gathers the weights before each micro-batch's forward and again for its backward,
    # and reduce-scatters the gradients after it. Galvatron (§4; TimeCostModel in its code) counts
    # the forward gather as exposed and hides the backward traffic behind backward compute.
    gather = collective_seconds("all-gather", weight_bytes, strategy.dp_shard, spans, inputs)
    scatter = collective_seconds("reduce-scatter", weight_bytes, strategy.dp_shard, spans,
                                 inputs)
    slowdown = inputs.overlap_slowdown
    forward = forward_compute + tp_forward + gather
    backward = tp_backward + overlapped(backward_compute, gather + scatter, slowdown)
    # DDP accumulates gradients locally and all-reduces them once, during the last
    # micro-batch's backward pass, which hides what it can.
    all_reduce = collective_seconds("all-reduce", weight_bytes, strategy.dp_replicate, spans,
                                    inputs)
    sync = overlapped(backward_compute, all_reduce, slowdown) - backward_compute

    states = shape.params / tp * STATE_BYTES_PER_PARAM[step.precision] / strategy.dp_shard
    return LayerCost(forward, backward, sync, states + step.in_flight * kept)


def compute_and_activations(shape: LayerShape, strategy: Strategy, tokens: int,
                            inputs: CostInputs) -> tuple[float, float, float]:
    """Seconds of a layer's forward and backward computation on one GPU for one micro-batch of
    `tokens` (its TP group's), and the bytes it keeps for the backward pass.

    From a profile's timed layer at this TP degree when there is one (the module built with
    1/tp of the heads and MLP units, measured whole: what one rank computes); otherwise from
    the layer's FLOPs and the FLOP rate, and Korthikanti et al.'s activation formula.
    """
    measured = inputs.measured.layer(shape.kind, strategy.tp) if inputs.measured else None
    if measured is not None:
        # A profile is measured in the precision the machine trains in; planning it in another
        # one is refused before this (commands.py).
        if strategy.checkpoint:
            return (measured.forward(tokens), measured.backward_checkpointed(tokens),
                    measured.checkpointed_activation(tokens))
        return measured.forward(tokens), measured.backward(tokens), measured.activation(tokens)
    forward = shape.forward_flops_per_token * tokens / strategy.tp / inputs.flops_per_second
    # Backward: two matmuls per forward one (PaLM appendix B); checkpointing reruns the forward.
    backward = (2 + strategy.checkpoint) * forward
    kept = shape.checkpoint_bytes_per_token if strategy.checkpoint else (
        shape.activation_bytes_per_token)
    # Sequence parallelism leaves each TP rank 1/tp of its group's tokens.
    return forward, backward, kept * tokens / strategy.tp


def transition_seconds(before: Strategy, after: Strategy, step: Step,
                       boundary_bytes_per_token: float, inputs: CostInputs) -> float:
    """Seconds per micro-batch to hand an activation from a layer under `before` to one under
    `after`, forward and its gradient backward (Galvatron §4: the transformation cost).

    Under sequence parallelism a GPU holds micro_batch_size x seq_len / devices tokens whatever
    the strategy; only which tokens changes with the TP degree. Going from TP degree t1 to t2
    regroups them with an all-to-all within groups of max/min GPUs. Between strategies of
    equal TP degree (DDP to FSDP, checkpointing on or off) nothing moves.
    """
    if before.tp == after.tp:
        return 0.0
    group = max(before.tp, after.tp) // min(before.tp, after.tp)
    local = step.micro_batch_size * step.seq_len * boundary_bytes_per_token / step.devices
    spans = max(before.tp, after.tp) > inputs.gpus_per_node
    return 2 * collective_seconds("all-to-all", local, group, spans, inputs)


def p2p_seconds(step: Step, boundary_bytes_per_token: float, spans_nodes: bool,
                inputs: CostInputs) -> float:
    """Seconds per micro-batch to send one stage boundary's activation (or its gradient) to the
    next stage: each GPU sends its own share."""
    local = step.micro_batch_size * step.seq_len * boundary_bytes_per_token / step.devices
    return collective_seconds("p2p", local, 2, spans_nodes, inputs)
