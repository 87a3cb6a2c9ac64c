"""Tensor ids and the device-side reductions the diagnostics are made of (no host sync in any)."""

from __future__ import annotations

import math
import re

import torch

_IN_BLOCK = {
    "self_attn.q_proj.weight": "q", "self_attn.k_proj.weight": "k", "self_attn.v_proj.weight": "v",
    "self_attn.o_proj.weight": "o", "mlp.gate_proj.weight": "gate", "mlp.up_proj.weight": "up",
    "mlp.down_proj.weight": "down", "input_layernorm.weight": "attn_norm",
    "post_attention_layernorm.weight": "mlp_norm",
}
_BLOCK_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.(.+)$")


def _sanitize(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_]+", "_", name).strip("_")


def tensor_id(name: str) -> str:
    """The stable id of a parameter in the keys: "3/q", "0/attn_norm", "embed", "head", "final_norm"."""
    m = _BLOCK_RE.search(name)
    if m and m.group(2) in _IN_BLOCK:
        return f"{m.group(1)}/{_IN_BLOCK[m.group(2)]}"
    if re.search(r"(?:^|\.)embed_tokens\.weight$", name):
        return "embed"
    if re.search(r"(?:^|\.)lm_head\.weight$", name):
        return "head"
    if re.search(r"(?:^|\.)norm\.weight$", name) and not m:
        return "final_norm"
    return f"other/{_sanitize(name)}"


def layer_of(tid: str) -> str:
    """The layer of a tensor id: the block index, "embed", "head", "final_norm" or "other"."""
    return tid.split("/", 1)[0]


def _local(t):
    """The local shard of a DTensor (FSDP2), the tensor itself otherwise."""
    if t is None:
        return None
    to_local = getattr(t, "to_local", None)
    return to_local() if to_local is not None and type(t).__name__ == "DTensor" else t


def _sq_norms(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Squared l2 norms (float64, 1-D) of same-device tensors, batched per dtype; fp32 accumulation
    for low-precision tensors, native for float64."""
    if not tensors:
        return torch.zeros(0, dtype=torch.float64)
    out: list = [None] * len(tensors)
    by_dtype: dict = {}
    for i, t in enumerate(tensors):
        by_dtype.setdefault(t.dtype, []).append(i)
    for dtype, idx in by_dtype.items():
        kw = {} if dtype == torch.float64 else {"dtype": torch.float32}
        norms = torch._foreach_norm([tensors[i] for i in idx], 2, **kw)
        for i, n in zip(idx, norms):
            out[i] = n
    return torch.stack([n.double() for n in out]).square()


def _scatter(n: int, idx: list[int], tensors: list[torch.Tensor], device) -> torch.Tensor:
    """[n] float64 on `device`: the squared norms of `tensors` at positions `idx`, zeros elsewhere
    (built by stacking: no index tensor is copied to the device, so no host sync)."""
    zero = torch.zeros((), dtype=torch.float64, device=device)
    values = list(_sq_norms(tensors).to(device).unbind()) if tensors else []
    slots = [zero] * n
    for i, v in zip(idx, values):
        slots[i] = v
    return torch.stack(slots)


def _device_quantiles(x: torch.Tensor, qs: list[float]) -> torch.Tensor:
    """Linear-interpolation quantiles (torch.quantile's default) of a 1-D tensor, float64, without a
    host sync (torch.quantile checks its q tensor on the device)."""
    xs = torch.sort(x.reshape(-1)).values.double()
    n = xs.numel()
    out = []
    for q in qs:
        pos = q * (n - 1)
        lo = int(math.floor(pos))
        hi = min(lo + 1, n - 1)
        out.append(xs[lo] + (xs[hi] - xs[lo]) * (pos - lo))
    return torch.stack(out)


def _unwrap(optimizer):
    """Accelerate's AcceleratedOptimizer -> the optimizer it wraps."""
    while type(optimizer).__name__ == "AcceleratedOptimizer" and hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return optimizer


def _nested_optimizers(optimizer) -> list:
    """The optimizer and every optimizer inside it (EMANesterov.base, MuonWithAdamW.inner, ...)."""
    seen, order, todo = set(), [], [optimizer]
    while todo:
        opt = todo.pop(0)
        if opt is None or id(opt) in seen:
            continue
        seen.add(id(opt))
        order.append(opt)
        inner = list(getattr(opt, "inner", None) or [])
        for attr in ("base", "muon", "adamw", "lowrank", "optimizer"):
            sub = getattr(opt, attr, None)
            if isinstance(sub, torch.optim.Optimizer):
                inner.append(sub)
        todo.extend(inner)
    return order


def _dist():
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return None
    return torch.distributed


def _ratio(a: float, b: float) -> float:
    if b == 0:
        return math.inf if a > 0 else math.nan
    return a / b


def _quantile(sorted_values: list[float], q: float) -> float:
    """Linear-interpolation quantile (numpy's and torch's default) of sorted values."""
    pos = q * (len(sorted_values) - 1)
    lo = int(math.floor(pos))
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)
