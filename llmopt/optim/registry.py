"""Optimizers by name: `build_optimizer(model, name, **hparams)`, and the facts other packages look up.

Each family file registers its builder with `@register(name, ...)`, next to the code it describes; the
registry imports every module of llmopt.optim once (`import_families`), so it names no family itself.
A builder takes the model's parameters by role (roles.py) and its own hyper-parameters, with the
protocol's defaults; an unknown name or hyper-parameter is refused with the list of valid ones.
To add an optimizer: write llmopt/optim/<name>.py with a registered builder, add
configs/optimizer/<name>.yaml and a reference test; the contract tests pick it up from `test_lr`.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass

import torch

from llmopt.optim.roles import ROLES, ParamRoles, classify_parameters

StateCount = Callable[[dict[str, int]], int]  # model.param_counts(...) -> optimizer-state elements


@dataclass(frozen=True)
class Spec:
    """An optimizer (or lookahead) and what the rest of llmopt needs to know about it."""
    name: str
    build: Callable[..., torch.optim.Optimizer]
    cls: type | None = None               # whose signature lists the hyper-parameters (None: the builder's)
    # its update reads whole columns, tensors or matrices: FSDP2 shards by rows (dim 0), so e.g. SCALE's
    # embedding normalization and SGD-LL's per-tensor RMS would see only shards, and Muon/GaLore would gather
    # every matrix for Newton-Schulz/SVD; such optimizers run under DDP, and the trainer refuses them under FSDP
    whole_tensors: bool = False
    paper_states: StateCount | None = None   # state elements as the papers count them (None: not accounted)
    llmopt_states: StateCount | None = None  # the states llmopt holds (None: the paper's count)
    test_lr: float | None = None          # lr of the contract tests (None: not in them, e.g. optional packages)

    @property
    def held_states(self) -> StateCount | None:
        return self.llmopt_states or self.paper_states


SPECS: dict[str, Spec] = {}
LOOKAHEADS: dict[str, Spec] = {}


def register(name: str, *, cls: type | None = None, whole_tensors: bool = False,
             paper_states: StateCount | None = None, llmopt_states: StateCount | None = None,
             test_lr: float | None = None):
    """Decorator for a builder `build(roles, **hparams) -> torch.optim.Optimizer`."""
    def wrap(build):
        if name in SPECS:
            raise ValueError(f"optimizer {name!r} is registered twice")
        SPECS[name] = Spec(name, build, cls, whole_tensors, paper_states, llmopt_states, test_lr)
        return build
    return wrap


def register_lookahead(name: str, *, states: StateCount):
    """Class decorator for a wrapper `cls(base_optimizer, **hparams)`; states: the elements it adds."""
    def wrap(cls):
        LOOKAHEADS[name] = Spec(name, cls, cls, paper_states=states)
        return cls
    return wrap


def import_families() -> None:
    """Import every module of llmopt.optim, so that each registers its optimizers."""
    import llmopt.optim as package
    for module in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"{package.__name__}.{module.name}")


def spec(name: str) -> Spec:
    if name not in SPECS:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {sorted(SPECS)}")
    return SPECS[name]


def lookahead_spec(name: str) -> Spec:
    if name not in LOOKAHEADS:
        raise ValueError(f"unknown lookahead {name!r}; choose none or one of {sorted(LOOKAHEADS)}")
    return LOOKAHEADS[name]


def groups_by_role(roles: ParamRoles, which=ROLES) -> list[dict]:
    """One param group per non-empty role, tagged with it."""
    return [{"params": roles.params(r), "role": r} for r in which if roles.params(r)]


def _accepted(entry: Spec) -> list[str] | None:
    """Hyper-parameter names a builder accepts (None: checked by the optimizer class itself)."""
    params = inspect.signature(entry.cls or entry.build).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return None
    skip = {"self", "roles", "params", "matrix_groups", "other_groups"}
    return [p for p in params if p not in skip]


def build_optimizer(model: torch.nn.Module, name: str, role_patterns: dict[str, str] | None = None,
                    lookahead: dict | None = None, lookahead_name: str = "ema_nesterov",
                    **hparams) -> torch.optim.Optimizer:
    """Build optimizer `name` over the model's trainable parameters.

    lookahead: None, or the keyword arguments of the lookahead `lookahead_name` (EMANesterov: beta, gamma,
    start_step, end_step, init), which then wraps the optimizer.
    """
    entry = spec(name)
    accepted = _accepted(entry)
    if accepted is not None:
        unknown = sorted(set(hparams) - set(accepted))
        if unknown:
            raise ValueError(f"unknown hyper-parameter(s) {unknown} for optimizer {name!r}; "
                             f"it takes {accepted}")
    roles = classify_parameters(model, role_patterns)
    optimizer = entry.build(roles, **hparams)
    _check_assignment(roles, optimizer)
    if lookahead:
        optimizer = lookahead_spec(lookahead_name).build(optimizer, **lookahead)
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
