"""Devices' peak FLOP/s (datasheets), and a timed matmul where no datasheet applies.

MFU (flops.py) divides by these peaks; the Chinchilla planner turns FLOPs into wall-clock time
with them.
"""

from __future__ import annotations

import functools
import re
import time

import torch

from burrow.errors import UserError

# Dense peak FLOP/s (no structured sparsity) per chip, from the vendors' datasheets. "tf32" is
# what float32 matmuls get on NVIDIA tensor cores once torch.set_float32_matmul_precision("high")
# is set; "fp32" is the plain CUDA-core rate that float32 gets by default.
PEAK_FLOPS: dict[str, dict[str, float]] = {
    "B200": {"bf16": 2250e12, "fp16": 2250e12},
    "H200": {"bf16": 989e12, "fp16": 989e12, "tf32": 494.5e12, "fp32": 67e12},
    "H200 NVL": {"bf16": 835.5e12, "fp16": 835.5e12, "tf32": 417.5e12, "fp32": 60e12},
    "H100 SXM": {"bf16": 989e12, "fp16": 989e12, "tf32": 494.5e12, "fp32": 67e12},
    "H100 NVL": {"bf16": 835.5e12, "fp16": 835.5e12, "tf32": 417.5e12, "fp32": 60e12},
    "H100 PCIe": {"bf16": 756e12, "fp16": 756e12, "tf32": 378e12, "fp32": 51e12},
    "A100": {"bf16": 312e12, "fp16": 312e12, "tf32": 156e12, "fp32": 19.5e12},
    "L40S": {"bf16": 362.05e12, "fp16": 362.05e12, "tf32": 183e12, "fp32": 91.6e12},
    "L4": {"bf16": 121e12, "fp16": 121e12, "tf32": 60e12, "fp32": 30.3e12},
    "A10": {"bf16": 125e12, "fp16": 125e12, "tf32": 62.5e12, "fp32": 31.2e12},
    # AWS's variant of the A10 (g5 instances): fewer tensor-core FLOPs, no public datasheet.
    "A10G": {"bf16": 70e12, "fp16": 70e12},
    "RTX 4090": {"bf16": 165.2e12, "fp16": 165.2e12, "tf32": 82.6e12, "fp32": 82.6e12},
    "RTX 3090": {"bf16": 71e12, "fp16": 71e12, "tf32": 35.6e12, "fp32": 35.6e12},
    # Volta and Turing have fp16 tensor cores and no bfloat16.
    "V100 SXM": {"fp16": 125e12, "fp32": 15.7e12},
    "V100 PCIe": {"fp16": 112e12, "fp32": 14e12},
    "T4": {"fp16": 65e12, "fp32": 8.1e12},
    "TPU v3": {"bf16": 123e12},
    "TPU v4": {"bf16": 275e12},
    "TPU v5e": {"bf16": 197e12},
    "TPU v5p": {"bf16": 459e12},
}

# torch.cuda.get_device_name() strings, e.g. "NVIDIA H100 80GB HBM3" (SXM), "NVIDIA H100 PCIe",
# "NVIDIA A100-SXM4-80GB", "Tesla V100-SXM2-16GB", "NVIDIA GeForce RTX 4090". First match wins,
# so the more specific pattern of a pair comes first ("A10G" before "A10", "A100" too).
_DEVICE_PATTERNS: tuple[tuple[str, str], ...] = (
    (r"B200", "B200"),
    (r"H200.*NVL", "H200 NVL"),
    (r"H200", "H200"),
    (r"H100.*NVL", "H100 NVL"),
    (r"H[18]00.*PCIe", "H100 PCIe"),
    (r"H100|H800|GH200", "H100 SXM"),
    (r"A100|A800", "A100"),
    (r"L40S", "L40S"),
    (r"\bL4\b", "L4"),
    (r"A10G", "A10G"),
    (r"\bA10\b", "A10"),
    (r"RTX 4090", "RTX 4090"),
    (r"RTX 3090", "RTX 3090"),
    (r"V100.*PCI", "V100 PCIe"),
    (r"V100", "V100 SXM"),
    (r"\bT4\b", "T4"),
    (r"TPU v3", "TPU v3"),
    (r"TPU v4", "TPU v4"),
    (r"TPU v5 ?(e|lite)", "TPU v5e"),
    (r"TPU v5p", "TPU v5p"),
)

_PRECISIONS = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def device_family(device_name: str) -> str | None:
    """The PEAK_FLOPS key of a device name such as "NVIDIA H100 80GB HBM3", or None."""
    for pattern, family in _DEVICE_PATTERNS:
        if re.search(pattern, device_name, flags=re.IGNORECASE):
            return family
    return None


def _precision(dtype: torch.dtype | str) -> str:
    if isinstance(dtype, str):
        if dtype not in ("bf16", "fp16", "tf32", "fp32"):
            raise UserError(f"unknown precision {dtype!r}; use bf16, fp16, tf32 or fp32")
        return dtype
    if dtype not in _PRECISIONS:
        raise UserError(f"no peak FLOP/s for {dtype}; use bfloat16, float16 or float32")
    return _PRECISIONS[dtype]


def lookup_peak_flops(device_name: str, dtype: torch.dtype | str = torch.bfloat16) -> float | None:
    """Datasheet peak FLOP/s of a named device for matmuls in `dtype`, or None if not listed.

    `dtype` is a torch dtype or one of "bf16", "fp16", "tf32", "fp32".
    """
    family = device_family(device_name)
    if family is None:
        return None
    return PEAK_FLOPS[family].get(_precision(dtype))


def device_peak_flops(device: torch.device | str, dtype: torch.dtype | str) -> float:
    """Peak matmul FLOP/s of one device for `dtype`: the datasheet for known GPUs, else measured.

    On CUDA the name from torch.cuda.get_device_name() is looked up in PEAK_FLOPS; float32 is
    read as tf32 when torch.get_float32_matmul_precision() allows tensor cores. A CPU, an MPS
    device or a GPU not in the table is measured once per process with a timed matmul
    (measure_matmul_flops): that is the best the device reaches, not its datasheet peak, so
    MFU there reads higher than on a listed GPU.
    """
    device = torch.device(device)
    if device.type == "cuda":
        precision = _precision(dtype)
        if precision == "fp32" and torch.get_float32_matmul_precision() != "highest":
            precision = "tf32"
        peak = lookup_peak_flops(torch.cuda.get_device_name(device), precision)
        if peak is not None:
            return peak
    if isinstance(dtype, str):
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(dtype, torch.float32)
    return _measured_peak(str(device), dtype)


@functools.cache
def _measured_peak(device: str, dtype: torch.dtype) -> float:
    size = 1024 if device == "cpu" else 4096
    return measure_matmul_flops(size, size, size, dtype=dtype, device=device)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def measure_matmul_flops(m: int = 1024, k: int = 1024, n: int = 1024, *,
                         dtype: torch.dtype = torch.float32, seconds: float = 0.5,
                         device: torch.device | str = "cpu") -> float:
    """Best FLOP/s of an (m x k) @ (k x n) matmul over a few timed runs, in about `seconds`.

    The number of matmuls per run doubles until a run lasts a sixth of `seconds`; then three
    more runs of that length are timed and the fastest rate is returned (2·m·k·n FLOPs each).
    """
    device = torch.device(device)
    a = torch.randn(m, k, dtype=dtype, device=device)
    b = torch.randn(k, n, dtype=dtype, device=device)
    out = torch.empty(m, n, dtype=dtype, device=device)
    flops_per_matmul = 2.0 * m * k * n

    def timed(calls: int) -> float:
        _synchronize(device)
        start = time.perf_counter()
        for _ in range(calls):
            torch.mm(a, b, out=out)
        _synchronize(device)
        return time.perf_counter() - start

    timed(1)  # warm-up: allocation, kernel choice, thread pool
    run_seconds, calls = seconds / 6, 1
    while (elapsed := timed(calls)) < run_seconds:
        calls *= 2
    best = elapsed
    for _ in range(3):
        best = min(best, timed(calls))
    return calls * flops_per_matmul / best


def autocast_for(device: torch.device, precision: str, param_dtype: str = "fp32"):
    """bf16 autocast on CUDA by default (fp32 master weights); fp32 elsewhere. bf16 parameters
    compute in bf16 on every device (a CPU without bf16 units emulates it, slowly)."""
    use_bf16 = precision == "bf16" or (precision == "auto" and (device.type == "cuda"
                                                                or param_dtype == "bf16"))
    if not use_bf16:
        return None
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
