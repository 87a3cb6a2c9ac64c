"""Optimizers by name: `build_optimizer(model, name, **hparams)`.

Each builder takes the model's parameters by role (roles.py) and its own hyper-parameters, with the
protocol's defaults; an unknown name or hyper-parameter is refused with the list of valid ones.
To add an optimizer: write its file, add a builder here with `@register("name")`, add
configs/optimizer/<name>.yaml and a reference test.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch

from llmopt.optim.ema_nesterov import EMANesterov
from llmopt.optim.muon import MuonWithAdamW
from llmopt.optim.roles import ROLES, ParamRoles, classify_parameters
from llmopt.optim.scale import SCALE
from llmopt.optim.sgd_ll import SGDLL

BUILDERS: dict[str, Callable[..., torch.optim.Optimizer]] = {}


def register(name: str):
    def wrap(builder):
        BUILDERS[name] = builder
        return builder
    return wrap


def groups_by_role(roles: ParamRoles, which=ROLES) -> list[dict]:
    """One param group per non-empty role, tagged with it."""
    return [{"params": roles.params(r), "role": r} for r in which if roles.params(r)]


def _check_lr(**lrs: float) -> None:
    for name, value in lrs.items():
        if not value >= 0:
            raise ValueError(f"{name} must be >= 0, got {value}")


def torch_fused(groups: list[dict], fused: bool | None) -> bool | None:
    """fused=None: torch's fused kernel where every parameter is on CUDA ("fused where available"), its foreach
    implementation elsewhere (torch's own None means foreach)."""
    if fused is None and all(p.is_cuda for g in groups for p in g["params"]):
        return True
    return fused


@register("adamw")
def build_adamw(roles, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, fused=None):
    _check_lr(lr=lr)
    groups = groups_by_role(roles)
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                             fused=torch_fused(groups, fused))


@register("adam")
def build_adam(roles, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, fused=None):
    _check_lr(lr=lr)
    groups = groups_by_role(roles)
    return torch.optim.Adam(groups, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                            fused=torch_fused(groups, fused))


@register("sgd")
def build_sgd(roles, lr=0.5, momentum=0.9, dampening=0.0, nesterov=False, weight_decay=0.0):
    """torch.optim.SGD: sum-form momentum (m = mu m + g), unlike SGD-LL's EMA form."""
    _check_lr(lr=lr)
    return torch.optim.SGD(groups_by_role(roles), lr=lr, momentum=momentum, dampening=dampening,
                           nesterov=nesterov, weight_decay=weight_decay)


@register("muon")
def build_muon(roles, **hparams):
    return MuonWithAdamW(groups_by_role(roles, ["matrix"]),
                         groups_by_role(roles, ["embedding", "output", "vector"]), **hparams)


@register("sgd_ll")
def build_sgd_ll(roles, **hparams):
    return SGDLL(groups_by_role(roles), **hparams)


@register("scale")
def build_scale(roles, **hparams):
    return SCALE(groups_by_role(roles), **hparams)


def _lowrank_builder(method: str):
    def build(roles, **hparams):
        from llmopt.optim.lowrank import build_lowrank  # the authors' packages load only when asked
        return build_lowrank(method, roles, **hparams)
    build.__name__ = f"build_{method}"
    return build


for _method in ("galore", "fira", "apollo", "apollo_mini"):
    register(_method)(_lowrank_builder(_method))


def _accepted(name: str) -> list[str] | None:
    """Hyper-parameter names a builder accepts (None: checked by the optimizer class itself)."""
    builder = BUILDERS[name]
    target = {"muon": MuonWithAdamW, "sgd_ll": SGDLL, "scale": SCALE}.get(name, builder)
    params = inspect.signature(target).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return None
    skip = {"self", "roles", "params", "matrix_groups", "other_groups"}
    return [p for p in params if p not in skip]


def build_optimizer(model: torch.nn.Module, name: str, role_patterns: dict[str, str] | None = None,
                    lookahead: dict | None = None, **hparams) -> torch.optim.Optimizer:
    """Build optimizer `name` over the model's trainable parameters.

    lookahead: None, or the keyword arguments of EMANesterov (beta, gamma, start_step, end_step, init),
    which then wraps the optimizer.
    """
    if name not in BUILDERS:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {sorted(BUILDERS)}")
    accepted = _accepted(name)
    if accepted is not None:
        unknown = sorted(set(hparams) - set(accepted))
        if unknown:
            raise ValueError(f"unknown hyper-parameter(s) {unknown} for optimizer {name!r}; "
                             f"it takes {accepted}")
    roles = classify_parameters(model, role_patterns)
    optimizer = BUILDERS[name](roles, **hparams)
    _check_assignment(roles, optimizer)
    if lookahead:
        optimizer = EMANesterov(optimizer, **lookahead)
    return optimizer


def _check_assignment(roles: ParamRoles, optimizer: torch.optim.Optimizer) -> None:
    """Every trainable parameter lands in exactly one param group."""
    counts: dict[int, int] = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            counts[id(p)] = counts.get(id(p), 0) + 1
    names = roles.name_of()
    missing = [n for i, n in names.items() if counts.get(i, 0) == 0]
    doubled = [n for i, n in names.items() if counts.get(i, 0) > 1]
    if missing or doubled:
        raise RuntimeError(f"optimizer groups are inconsistent: missing {missing[:5]}, in several "
                           f"groups {doubled[:5]}")
