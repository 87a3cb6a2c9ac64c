"""Throughput, MFU and memory readings."""

from __future__ import annotations

import resource
import sys

import torch

# dense bf16 peak FLOP/s by device-name fragment, the first match wins (the H100's PCIe and NVL cards before
# the SXM's "NVIDIA H100 80GB HBM3")
PEAK_BF16_FLOPS = {"H100 PCIe": 756e12, "H100 NVL": 835e12, "H100": 989e12, "H200": 989e12, "GH200": 989e12,
                   "A100": 312e12, "L40S": 362e12, "A40": 150e12, "B200": 2250e12}


def peak_flops(device: torch.device) -> float | None:
    """The accelerator's bf16 peak, or None where unknown (then MFU is not reported)."""
    if device.type != "cuda":
        return None
    return peak_flops_of(torch.cuda.get_device_name(device))


def peak_flops_of(device_name: str) -> float | None:
    return next((flops for fragment, flops in PEAK_BF16_FLOPS.items() if fragment in device_name), None)


def peak_memory_bytes(device: torch.device) -> int:
    """Peak allocated accelerator memory; on the CPU the process's peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def device_memory_bytes(device: torch.device) -> int | None:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    try:
        import os
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None
