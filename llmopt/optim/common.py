"""Small pieces every optimizer family here shares: role-tagged param groups and argument checks."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable

import torch

from llmopt.optim.roles import ROLES


def role_groups(params: Iterable) -> list[dict]:
    """Param groups with a "role" key. Plain tensors (or groups without a role) get one from their
    shape: 2-D -> "matrix", 1-D -> "vector"; pass groups with role "embedding"/"output" explicitly."""
    params = list(params)
    if not params:
        raise ValueError("the optimizer got an empty parameter list")
    groups = params if isinstance(params[0], dict) else [{"params": params}]
    out = []
    for group in groups:
        group = dict(group)
        tensors = list(group["params"])
        if "role" in group:
            if group["role"] not in ROLES:
                raise ValueError(f"unknown role {group['role']!r}; roles are {list(ROLES)}")
            out.append({**group, "params": tensors})
            continue
        # split a role-less group by dimension
        for role, members in (("matrix", [p for p in tensors if p.ndim >= 2]),
                              ("vector", [p for p in tensors if p.ndim < 2])):
            if members:
                out.append({**group, "params": members, "role": role})
    return out


def evaluate_closure(closure):
    """torch optimizers' closure protocol: re-evaluate the loss, with gradients enabled."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


def with_grads(group: dict) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """A param group's parameters that have a gradient, and those gradients (each read once: per step)."""
    params, grads = [], []
    for p in group["params"]:
        grad = p.grad
        if grad is not None:
            params.append(p)
            grads.append(grad)
    return params, grads


def check_nonnegative(**values: float | None) -> None:
    for name, value in values.items():
        if value is not None and not value >= 0:
            raise ValueError(f"{name} must be >= 0, got {value}")


def check_unit_interval(**values: float) -> None:
    """beta-like coefficients: 0 <= value < 1."""
    for name, value in values.items():
        if not 0.0 <= value < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {value}")


def check_choice(name: str, value: str, choices: Iterable[str]) -> None:
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; choose one of {list(choices)}")


def newton_schulz(g: torch.Tensor, steps: int = 5, coefficients=(3.4445, -4.7750, 2.0315),
                  eps: float = 1e-7) -> torch.Tensor:
    """Muon's quintic Newton-Schulz iteration: an approximate U V^T of g (singular values near 1),
    in g's dtype. Batched over leading dimensions."""
    a, b, c = coefficients
    x = g / (g.norm(dim=(-2, -1), keepdim=True) + eps)
    transposed = g.size(-2) > g.size(-1)
    if transposed:
        x = x.mT
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.mT if transposed else x


class OptimizerWrapper(torch.optim.Optimizer):
    """An optimizer made of inner optimizers (`self.inner`), seen from outside as one: its
    param_groups are the inner ones' (the same dicts, so a scheduler on the wrapper drives them),
    its state their union. Subclasses set `self.inner` and call `_init_wrapper()` instead of
    torch.optim.Optimizer.__init__ (whose group copying would break that sharing)."""

    inner: list[torch.optim.Optimizer]

    def _init_wrapper(self) -> None:
        self._optimizer_step_pre_hooks = OrderedDict()
        self._optimizer_step_post_hooks = OrderedDict()
        self._optimizer_state_dict_pre_hooks = OrderedDict()
        self._optimizer_state_dict_post_hooks = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks = OrderedDict()
        self._optimizer_load_state_dict_post_hooks = OrderedDict()
        self._zero_grad_profile_name = f"Optimizer.zero_grad#{type(self).__name__}.zero_grad"

    @property
    def param_groups(self) -> list[dict]:
        return [group for opt in self.inner for group in opt.param_groups]

    @property
    def state(self) -> dict:
        return {p: s for opt in self.inner for p, s in opt.state.items()}

    @property
    def defaults(self) -> dict:
        return {k: v for opt in self.inner for k, v in opt.defaults.items()}

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.inner:
            opt.zero_grad(set_to_none=set_to_none)

    def __getstate__(self):
        return self.__dict__
