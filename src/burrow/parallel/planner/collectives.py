"""Time the collectives the cost model uses, by group size, on this machine.

Galvatron's hardware profiler times all-reduce and p2p for each group size (nccl-tests) and
the cost model reads the bandwidths. Here each group of n processes is spawned with
torch.multiprocessing on this machine (gloo on a CPU, NCCL on GPUs, one GPU per process), and
each collective is timed at a few message sizes and fitted as latency + bytes / bandwidth
(fit_alpha_beta), the bytes counted as costmodel.collective_seconds counts them: the whole
tensor for all-reduce, the gathered size for all-gather and reduce-scatter, one process's
buffer for all-to-all, the message for p2p (between ranks 0 and 1, half a round trip).
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from burrow.parallel.planner.measured import fit_alpha_beta

# Message sizes in bytes: 64 KiB to 16 MiB on a CPU, 1 MiB to 256 MiB on GPUs (where small
# messages are latency alone).
CPU_SIZES = tuple(2 ** p for p in range(16, 25, 2))
GPU_SIZES = tuple(2 ** p for p in range(20, 29, 2))
# Calls timed per size: enough for ~1e8 bytes moved, at least 3, at most 50.
MOVED_BYTES = 1e8
BATCHES = 3


def repetitions(nbytes: int) -> int:
    """Calls per timed size: the same on every rank, so that the collectives match."""
    return int(min(50, max(3, MOVED_BYTES // nbytes)))


def _operations(world: int, rank: int, nbytes: int, device: torch.device
                ) -> dict[str, tuple[int, Callable[[], object]]]:
    """kind -> (the bytes the cost model counts, one call)."""
    elements = max(world, nbytes // 4 // world * world)  # float32, divisible by the group
    full = torch.ones(elements, device=device)
    shard = torch.ones(elements // world, device=device)
    out = torch.empty_like(full)
    size = full.numel() * 4

    def p2p() -> None:
        if rank == 0:
            dist.send(full, 1)
            dist.recv(full, 1)
        elif rank == 1:
            dist.recv(full, 0)
            dist.send(full, 0)

    return {"all-reduce": (size, lambda: dist.all_reduce(full)),
            "all-gather": (size, lambda: dist.all_gather_single(out, shard)),
            "reduce-scatter": (size, lambda: dist.reduce_scatter_single(shard, full)),
            "all-to-all": (size, lambda: dist.all_to_all_single(out, full)),
            # a round trip is two messages: the time per message is half the call's
            "p2p": (size, p2p)}


def _time_batch(call: Callable[[], object], calls: int, device: torch.device) -> float:
    """Seconds per call of `calls` calls, as the slowest rank saw them (the collective's)."""
    dist.barrier()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(calls):
        call()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = torch.tensor([(time.perf_counter() - start) / calls], device=device)
    dist.all_reduce(seconds, op=dist.ReduceOp.MAX)
    return seconds.item()


def _worker(rank: int, world: int, init_file: str, sizes: tuple[int, ...], result: str,
            device_type: str) -> None:
    """One process of a group: every collective at every size; rank 0 writes the timings."""
    torch.set_num_threads(1)
    device = torch.device("cuda", rank) if device_type == "cuda" else torch.device("cpu")
    if device_type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device_type == "cuda" else "gloo",
                            init_method=f"file://{init_file}", rank=rank, world_size=world)
    timings: dict[str, list[list[float]]] = {}
    for nbytes in sizes:
        for kind, (counted, call) in _operations(world, rank, nbytes, device).items():
            call()  # warm-up: connections and buffers
            # the fastest of BATCHES batches: a busy machine's pauses only ever add time
            best = min(_time_batch(call, repetitions(nbytes), device) for _ in range(BATCHES))
            timings.setdefault(kind, []).append([counted, best / (2 if kind == "p2p" else 1)])
    if rank == 0:
        Path(result).write_text(json.dumps(timings))
    dist.destroy_process_group()


def time_group(world: int, device_type: str, sizes: tuple[int, ...] | None = None
               ) -> dict[str, list[list[float]]]:
    """Spawn `world` processes and return kind -> [[bytes, seconds], ...]."""
    sizes = sizes or (GPU_SIZES if device_type == "cuda" else CPU_SIZES)
    with tempfile.TemporaryDirectory(prefix="burrow-collectives-") as folder:
        init_file, result = os.path.join(folder, "init"), os.path.join(folder, "timings.json")
        mp.spawn(_worker, args=(world, init_file, sizes, result, device_type), nprocs=world,
                 join=True)
        return json.loads(Path(result).read_text())


def measure_collectives(groups: list[int], device_type: str,
                        progress: Callable[[str], None] = print,
                        sizes: tuple[int, ...] | None = None) -> dict[str, dict[int, dict]]:
    """kind -> group size -> {"fit": {"latency", "bandwidth"}, "points": [[bytes, s], ...]}:
    the profile's collectives section for each group size in `groups`."""
    found: dict[str, dict[int, dict]] = {}
    for world in groups:
        for kind, points in time_group(world, device_type, sizes).items():
            fit = fit_alpha_beta([p[0] for p in points], [p[1] for p in points])
            found.setdefault(kind, {})[world] = {"fit": dataclasses.asdict(fit),
                                                 "points": points}
            progress(f"profile: {kind:<14} over {world}: {fit.latency * 1e6:7.1f} us + bytes / "
                     f"{fit.bandwidth / 1e9:.3g} GB/s")
    return found
