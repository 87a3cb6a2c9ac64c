"""Momentum SGD: torch.optim.SGD, one param group per role."""

from __future__ import annotations

import torch

from llmopt.optim.common import check_nonnegative
from llmopt.optim.registry import groups_by_role, register


@register("sgd", paper_states=lambda c: c["total"], test_lr=0.05)
def build_sgd(roles, lr=0.5, momentum=0.9, dampening=0.0, nesterov=False, weight_decay=0.0):
    """torch.optim.SGD: sum-form momentum (m = mu m + g), unlike SGD-LL's EMA form."""
    check_nonnegative(lr=lr)
    return torch.optim.SGD(groups_by_role(roles), lr=lr, momentum=momentum, dampening=dampening,
                           nesterov=nesterov, weight_decay=weight_decay)
