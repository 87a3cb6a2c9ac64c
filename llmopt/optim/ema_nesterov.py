"""EMA-Nesterov (arXiv 2605.25395): a lookahead wrapper for any torch optimizer.

  x_{t+1} = A_t(x_t + beta_t m_t);      m_{t+1} = gamma m_t + (1 - gamma)(x_{t+1} - x_t)

As in the authors' code, the wrapper keeps prev = x_t and m (two parameter-sized buffers). `pre_forward()`
moves the parameters in place to the lookahead point y = x_t + beta_t m, once per optimizer step (call it
before the forward pass; calling it again for the next micro-batch does nothing); `step()` lets the base
optimizer step from y (its state sees the gradient at y), then updates m from x_{t+1} - x_t. The parameters
rest at x_{t+1} between steps, so evaluation and checkpoints need no swap.

prev is in the parameter dtype (an exact copy). m is fp32 by default (`momentum_dtype="float32"`; fp64
parameters keep fp64): the authors train with fp32 weights, and a bf16 m cannot follow the EMA (with gamma
0.999, gamma * m rounds back to m, so m never decays). `momentum_dtype="param"` keeps m in the parameter
dtype, as the package's buffers (2 bytes fewer per parameter under pure bf16).

beta_t = beta * lr_t / lr_peak inside [start_step, end_step) and 0 outside, where t counts completed
steps, lr_t is the base's first group lr when pre_forward runs, and lr_peak its "initial_lr" (set by
torch LR schedulers) or, without a scheduler, its lr at construction. m is updated on every step.
init="zero" starts from m = 0 (the package and the authors' LLaMA code); init="first_update" sets
m_1 = x_1 - x_0 (the authors' nanogpt code). gamma = 0 is classical Nesterov lookahead. `fused`: the
momentum update after each step as one Triton kernel over all parameters (llmopt/kernels/ema.py); None uses it on
CUDA, True insists, False uses foreach ops.
"""

from __future__ import annotations

import torch

from llmopt.kernels import common as kernel_common
from llmopt.kernels import ema
from llmopt.optim.common import OptimizerWrapper, check_choice, check_unit_interval
from llmopt.optim.memory import state_tensors
from llmopt.optim.registry import register_lookahead

INITS = ("zero", "first_update")
MOMENTUM_DTYPES = ("float32", "param")


@register_lookahead("ema_nesterov", states=lambda c: 2 * c["total"])  # m and the anchor
class EMANesterov(OptimizerWrapper):
    def __init__(self, base_optimizer: torch.optim.Optimizer, beta: float = 0.5, gamma: float = 0.99,
                 start_step: int = 0, end_step: int | None = None, init: str = "zero", momentum_dtype: str = "float32",
                 fused: bool | None = None):
        check_unit_interval(beta=beta, gamma=gamma)
        check_choice("init", init, INITS)
        check_choice("momentum_dtype", momentum_dtype, MOMENTUM_DTYPES)
        if start_step < 0 or (end_step is not None and end_step < start_step):
            raise ValueError(f"the lookahead window [start_step={start_step}, end_step={end_step}) must "
                             "satisfy 0 <= start_step <= end_step")
        self.base = base_optimizer
        self.inner = [base_optimizer]
        self._init_wrapper()
        self.beta, self.gamma, self.init, self.momentum_dtype, self.fused = beta, gamma, init, momentum_dtype, fused
        self.start_step, self.end_step = start_step, end_step
        first = self.param_groups[0]
        self.lr_peak = first.get("initial_lr", first["lr"])
        self.params = [p for g in self.param_groups for p in g["params"]]
        with torch.no_grad():
            self.prev = [p.detach().clone() for p in self.params]
            self.momentum = [torch.zeros_like(p, dtype=torch.promote_types(p.dtype, torch.float32)
                                              if momentum_dtype == "float32" else p.dtype) for p in self.params]
        self.step_count = 0
        self._moved = False

    def current_beta(self, t: int | None = None) -> float:
        """beta_t after t completed steps (default: now)."""
        t = self.step_count if t is None else t
        inside = t >= self.start_step and (self.end_step is None or t < self.end_step)
        if not inside or self.lr_peak == 0:
            return 0.0
        return self.beta * self.param_groups[0]["lr"] / self.lr_peak

    @torch.no_grad()
    def pre_forward(self) -> None:
        """Move the parameters to the lookahead point; once per optimizer step."""
        if self._moved:
            return
        beta_t = self.current_beta()
        if beta_t != 0.0:
            torch._foreach_add_(self.params, self.momentum, alpha=beta_t)
        self._moved = True

    @torch.no_grad()
    def step(self, closure=None):
        if not self._moved and self.current_beta() != 0.0:
            raise RuntimeError("EMANesterov: call pre_forward() before the forward pass of every step "
                               "(the gradient must be taken at the lookahead point)")
        loss = self.base.step(closure)
        first_update = self.init == "first_update" and self.step_count == 0
        if kernel_common.use_kernels(self.fused, self.params + self.prev + self.momentum, "EMANesterov"):
            # m <- gamma m + (1 - gamma)(p - prev); prev <- p in one pass (gamma = 0: m_1 = x_1 - x_0)
            ema.ema_momentum_(self.momentum, self.prev, self.params, 0.0 if first_update else self.gamma)
        else:
            # d = x_{t+1} - x_t is formed in the prev buffer itself (as prev - p = -d): no temporary. In the
            # parameter dtype that difference is exact while |d| <= |x_t| (Sterbenz); m adds it in its own dtype
            torch._foreach_sub_(self.prev, self.params)
            if first_update:
                torch._foreach_copy_(self.momentum, self.prev)
                torch._foreach_neg_(self.momentum)
            else:
                torch._foreach_mul_(self.momentum, self.gamma)
                torch._foreach_add_(self.momentum, self.prev, alpha=-(1 - self.gamma))
            torch._foreach_copy_(self.prev, self.params)
        self.step_count += 1
        self._moved = False
        return loss

    def diagnostics(self, record) -> None:
        """Its beta_t of the step just made and ||m|| after it, for llmopt.metrics.diagnostics."""
        from llmopt.metrics.diagnostics import keys

        # the step just made: the scheduler has not moved lr yet
        record.add_scalar(keys.LOOKAHEAD_BETA, self.current_beta(self.step_count - 1))
        record.add_norm(keys.LOOKAHEAD_MOMENTUM_NORM, self.momentum)

    def state_tensors(self) -> list[torch.Tensor]:
        """Every tensor of optimizer state: the base's and the two lookahead buffers."""
        return state_tensors(self.base) + self.prev + self.momentum

    def state_dict(self) -> dict:
        return {"base": self.base.state_dict(), "step_count": self.step_count, "moved": self._moved,
                "prev": [t.clone() for t in self.prev], "momentum": [t.clone() for t in self.momentum]}

    @torch.no_grad()
    def load_state_dict(self, state_dict: dict) -> None:
        if len(state_dict["prev"]) != len(self.params):
            raise ValueError(f"EMANesterov state holds {len(state_dict['prev'])} buffers, this optimizer "
                             f"has {len(self.params)} parameters")
        self.base.load_state_dict(state_dict["base"])
        for mine, saved in zip(self.prev + self.momentum, state_dict["prev"] + state_dict["momentum"]):
            mine.copy_(saved)
        self.step_count = state_dict["step_count"]
        self._moved = state_dict.get("moved", False)

    def __repr__(self) -> str:
        return (f"EMANesterov(beta={self.beta}, gamma={self.gamma}, window=[{self.start_step}, "
                f"{self.end_step}), init={self.init}, momentum_dtype={self.momentum_dtype}, base={self.base!r})")
