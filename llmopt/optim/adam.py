"""Adam and AdamW: torch.optim's, one param group per role."""

from __future__ import annotations

import torch

from llmopt.optim.common import check_nonnegative
from llmopt.optim.registry import groups_by_role, register


def torch_fused(groups: list[dict], fused: bool | None) -> bool | None:
    """fused=None: torch's fused kernel where every parameter is on CUDA ("fused where available"), its foreach
    implementation elsewhere (torch's own None means foreach)."""
    if fused is None and all(p.is_cuda for g in groups for p in g["params"]):
        return True
    return fused


def two_moments(counts: dict[str, int]) -> int:
    return 2 * counts["total"]


def adam_builder(adam_class: type[torch.optim.Optimizer]):
    """The builder of torch's Adam or AdamW (they take the same arguments)."""
    def build(roles, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, fused=None):
        check_nonnegative(lr=lr)
        groups = groups_by_role(roles)
        return adam_class(groups, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                          fused=torch_fused(groups, fused))
    return build


build_adamw = register("adamw", paper_states=two_moments, test_lr=1e-3)(adam_builder(torch.optim.AdamW))
build_adam = register("adam", paper_states=two_moments, test_lr=1e-3)(adam_builder(torch.optim.Adam))
