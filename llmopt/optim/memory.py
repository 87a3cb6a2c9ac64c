"""Optimizer-state memory as held: the bytes in a live optimizer's state tensors (`state_bytes`), beside the papers'
accounting, which counts elements instead (llmopt.accounting).
"""

from __future__ import annotations

import torch


def _tensors_in(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors_in(v)]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors_in(v)]
    if hasattr(value, "__dict__"):  # e.g. GaLore's projector objects hold their matrices as attributes
        return [t for v in vars(value).values() if isinstance(v, torch.Tensor) for t in [v]]
    return []


def state_tensors(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """Every tensor of optimizer state (an optimizer may define `state_tensors()` to add its own)."""
    if hasattr(optimizer, "state_tensors"):
        return optimizer.state_tensors()
    return [t for s in optimizer.state.values() for t in _tensors_in(s)]


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes held in optimizer-state tensors (each storage counted once)."""
    seen, total = set(), 0
    for t in state_tensors(optimizer):
        key = (t.device, t.untyped_storage().data_ptr()) if t.device.type != "meta" else id(t)
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total
