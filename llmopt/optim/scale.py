"""SCALE: Stochastic Column-normalized Last-layer momEntum (arXiv 2506.16659).

Column-normalized SGD for the hidden matrices and the embedding, EMA momentum on the output layer
only, and AdamW for 1-D parameters. The update rule follows the authors' released optimizer
(protocol.md section 2):

  matrix / embedding:  p <- p (1 - lr wd) - lr * D(g)
  output (lm_head):    m <- beta m + (1 - beta) g;   p <- p (1 - lr wd) - lr * D(m)
  vector (1-D):        AdamW with eps added to the uncorrected sqrt(v), as the authors' code does

D is the normalization. "column" divides each output unit (row of a torch nn.Linear weight) by its
RMS, floored at 1e-8: every normalized row has RMS 1 (not unit l2 norm; the released learning rates
depend on this). The embedding [vocab, hidden] is a Linear's transpose, so its output units are its
columns: one scale per hidden unit. The ablation normalizations are scaled to the same unit RMS so
one learning rate means the same step size for all of them:
  row       RMS over the other dimension;  sign  sign(g);
  spectral  Newton-Schulz U V^T (Muon's coefficients, 5 steps) times sqrt(max(rows, cols));
  none      g itself.
`momentum_on` moves the momentum: "output" (SCALE), "all" (every matrix), "none".
`fused`: the row normalization, the output layer's momentum and the update in one Triton kernel launch per
row length, the embedding's update in one pass after its column RMS (llmopt/kernels/rows.py); None uses them on CUDA,
True insists, False keeps the eager foreach and per-tensor code.

The vector groups' lr is `adam_lr` (their own peak): a schedule that scales every group's initial
lr gives them adam_lr * lr_t / lr_peak, as the authors' code does. State dtype = parameter dtype.
"""

from __future__ import annotations

import math

import torch

from llmopt.kernels import common as kernel_common
from llmopt.kernels import rows
from llmopt.optim.common import (
    check_choice,
    check_nonnegative,
    check_unit_interval,
    evaluate_closure,
    newton_schulz,
    role_groups,
    with_grads,
)
from llmopt.optim.registry import groups_by_role, register

NORMALIZATIONS = ("column", "row", "sign", "spectral", "none")
MOMENTUM_ON = ("output", "all", "none")


def unit_dim(kind: str, transposed: bool) -> int:
    """The dimension "column"/"row" normalization reduces over. "column": one scale per output unit;
    output units are rows of [out, in], columns when the weight is stored transposed (the embedding)."""
    return 1 if (kind == "column") != transposed else 0


def rms_scale(g: torch.Tensor, dim: int) -> torch.Tensor:
    """sqrt(mean(g^2)) over `dim`, floored at 1e-8, in one pass over g (a norm accumulates in fp32)."""
    return torch.linalg.vector_norm(g, dim=dim, keepdim=True).div_(math.sqrt(g.size(dim))).clamp_min_(1e-8)


def normalize(g: torch.Tensor, kind: str, transposed: bool = False) -> torch.Tensor:
    """The normalized direction of a 2-D tensor; `transposed` for weights stored [in, out] (embedding)."""
    if kind == "column" or kind == "row":
        return g / rms_scale(g, unit_dim(kind, transposed))
    if kind == "sign":
        return torch.sign(g)
    if kind == "spectral":
        return newton_schulz(g) * math.sqrt(max(g.shape))
    return g


class SCALE(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 1e-3, momentum: float = 0.9, adam_lr: float = 1e-3,
                 adam_betas: tuple[float, float] = (0.9, 0.999), adam_eps: float = 1e-8,
                 weight_decay: float = 0.0, normalization: str = "column", momentum_on: str = "output",
                 fused: bool | None = None):
        check_nonnegative(lr=lr, adam_lr=adam_lr, adam_eps=adam_eps, weight_decay=weight_decay)
        check_unit_interval(momentum=momentum, adam_beta1=adam_betas[0], adam_beta2=adam_betas[1])
        check_choice("normalization", normalization, NORMALIZATIONS)
        check_choice("momentum_on", momentum_on, MOMENTUM_ON)
        groups = role_groups(params)
        for group in groups:
            if group["role"] == "vector":
                group.setdefault("lr", adam_lr)
        defaults = dict(lr=lr, momentum=momentum, adam_betas=tuple(adam_betas), adam_eps=adam_eps,
                        weight_decay=weight_decay, normalization=normalization, momentum_on=momentum_on)
        super().__init__(groups, defaults)
        self.fused = fused

    def _uses_momentum(self, group: dict) -> bool:
        on = group["momentum_on"]
        return on == "all" or (on == "output" and group["role"] == "output")

    @torch.no_grad()
    def step(self, closure=None):
        loss = evaluate_closure(closure)
        for group in self.param_groups:
            params, grads = with_grads(group)
            if not params:
                continue
            if group["role"] == "vector":
                self._adamw(group, params, grads)
                continue
            lr, wd, kind = group["lr"], group["weight_decay"], group["normalization"]
            decay = 1 - lr * wd
            transposed = group["role"] == "embedding"
            momentum = self._uses_momentum(group)
            directions = grads
            if momentum:
                states = [self.state[p] for p in params]
                for p, state in zip(params, states):
                    if "momentum_buffer" not in state:
                        state["momentum_buffer"] = torch.zeros_like(p)
                directions = [state["momentum_buffer"] for state in states]
            dim = unit_dim(kind, transposed) if kind in ("column", "row") else None
            kernel_tensors = params + grads + (directions if momentum else [])
            if dim is not None and kernel_common.use_kernels(self.fused, kernel_tensors, "SCALE"):
                if dim == 1 and max(p.shape[1] for p in params) <= kernel_common.MAX_ROW:
                    # one pass per row: the momentum (if any), the row RMS and the update
                    rows.row_normalized_update_(params, directions, lr, decay=decay,
                                                grads=grads if momentum else None, weight=1 - group["momentum"])
                    continue
                if dim == 0:  # the embedding: the column RMS (one reduction), then the update in one pass
                    if momentum:
                        torch._foreach_lerp_(directions, grads, 1 - group["momentum"])
                    for p, direction in zip(params, directions):
                        rows.column_normalized_update_(p, direction, rms_scale(direction, 0), lr, decay=decay)
                    continue
            if momentum:
                torch._foreach_lerp_(directions, grads, 1 - group["momentum"])
            for p, direction in zip(params, directions):
                if wd:
                    p.mul_(decay)
                if dim is not None:  # fused: the normalized direction is never materialized
                    p.addcdiv_(direction, rms_scale(direction, dim), value=-lr)
                else:
                    p.add_(normalize(direction, kind, transposed), alpha=-lr)
        return loss

    def _adamw(self, group: dict, params: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
        """AdamW with multi-tensor (foreach) ops: a handful of launches for every 1-D parameter."""
        beta1, beta2 = group["adam_betas"]
        lr, wd, eps = group["lr"], group["weight_decay"], group["adam_eps"]
        states = [self.state[p] for p in params]
        for p, state in zip(params, states):
            if "step" not in state:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
            state["step"] += 1
        # the bias corrections differ only if parameters joined at different steps: one step size each
        step_sizes = [lr * math.sqrt(1 - beta2 ** s["step"]) / (1 - beta1 ** s["step"]) for s in states]
        exp_avgs, exp_avg_sqs = [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states]
        torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
        # one rounding, as the authors' lerp_: under bf16, mul_ then addcmul_ drifts further from the EMA
        torch._foreach_lerp_(exp_avg_sqs, torch._foreach_mul(grads, grads), 1 - beta2)
        if wd:
            torch._foreach_mul_(params, 1 - lr * wd)
        denominators = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_add_(denominators, eps)
        torch._foreach_addcdiv_(params, exp_avgs, denominators, [-s for s in step_sizes])


@register("scale", cls=SCALE, whole_tensors=True, test_lr=1e-3,
          paper_states=lambda c: c["output"],                      # the lm_head momentum only
          llmopt_states=lambda c: c["output"] + 2 * c["vector"])   # + the norms' AdamW moments
def build_scale(roles, **hparams):
    return SCALE(groups_by_role(roles), **hparams)
