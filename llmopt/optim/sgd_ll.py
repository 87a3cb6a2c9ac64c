"""SGD-LL: momentum SGD at large learning rates (arXiv 2605.17787), after the authors' optimizer.

For every parameter, with the scheduled learning rate lr_t:
  1. m <- beta m + (1 - beta) g                       (EMA form: lr 100 here ~ lr 10 in torch's SGD)
  2. output layer only: u_v = m_v * min(1, delta / ||m_v||_2) for every vocabulary row v
  3. per tensor: if lr_t * RMS(u) > tau:  u <- u * tau / (lr_t * RMS(u))   (the update RMS is capped at tau)
  4. p <- p - lr_t u
The momentum keeps the unclipped value. No weight decay, no Nesterov. tau=None or delta=None turns
that clip off (tau=None, delta=None is plain EMA-momentum SGD).

Both clips are computed as min(1, ...) factors, so the step never syncs with the host. What fired is
kept in the state for diagnostics: "rms_clipped" (1.0 if the RMS clip fired this step),
"rms_clip_count" (steps it fired, cumulative) and, for the output layer, "row_clip_fraction" (share of
rows clipped this step). State dtype = parameter dtype (the diagnostics are float32 scalars).

`fused`: both passes as Triton kernels over all tensors of a group (llmopt/kernels/clipped.py: the momentum update
with each tensor's sum of squares, then the clipped update; for the output layer each row's sum of
squares, from which the row clip and the clipped update's norm follow, then the row-scaled update);
None uses them on CUDA, True insists, False keeps the foreach/per-tensor eager code.
"""

from __future__ import annotations

import math

import torch

from llmopt.kernels import clipped
from llmopt.kernels import common as kernel_common
from llmopt.optim.common import check_nonnegative, check_unit_interval, evaluate_closure, role_groups, with_grads
from llmopt.optim.registry import groups_by_role, register


class SGDLL(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 100.0, momentum: float = 0.9, tau: float | None = 5e-4,
                 delta: float | None = 1e-3, fused: bool | None = None):
        check_nonnegative(lr=lr, tau=tau, delta=delta)
        check_unit_interval(momentum=momentum)
        super().__init__(role_groups(params), dict(lr=lr, momentum=momentum, tau=tau, delta=delta))
        self.fused = fused

    def diagnostics(self, record) -> None:
        """Its clip rates of the step just made, for llmopt.metrics.diagnostics (keys there)."""
        from llmopt.metrics.diagnostics import keys

        fired = {p: self.state[p]["rms_clipped"] for g in self.param_groups for p in g["params"]
                 if torch.is_tensor(self.state.get(p, {}).get("rms_clipped"))}
        record.add_per_tensor(keys.RMS_CLIP_FRACTION_LAYERS, fired, role_key=keys.rms_clip_fraction)
        for group in self.param_groups:
            for p in group["params"]:
                rows = self.state.get(p, {}).get("row_clip_fraction")
                if torch.is_tensor(rows):
                    record.add_scalar(keys.ROW_CLIP_FRACTION, rows)

    @torch.no_grad()
    def step(self, closure=None):
        loss = evaluate_closure(closure)
        for group in self.param_groups:
            params, grads = with_grads(group)
            if not params:
                continue
            lr, tau, delta = group["lr"], group["tau"], group["delta"]
            states = [self.state[p] for p in params]
            for p, state in zip(params, states):
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                    state["rms_clipped"] = torch.zeros((), device=p.device)
                    state["rms_clip_count"] = torch.zeros((), device=p.device)
            momenta = [state["momentum_buffer"] for state in states]
            clip_rows = group["role"] == "output" and delta is not None
            fused = (tau is not None and kernel_common.use_kernels(self.fused, params + momenta + grads, "SGDLL")
                     and not (clip_rows and any(p.size(1) > kernel_common.MAX_ROW for p in params)))
            weight = 1 - group["momentum"]
            # pass 1: the momenta and every tensor's update RMS (clip statistics in at least fp32: bf16
            # norms are too coarse; fp64 stays fp64)
            stat_dtype = torch.promote_types(params[0].dtype, torch.float32)
            updates, row_factors = momenta, None
            if fused and clip_rows:
                # each row's sum of squares in the momentum pass; the clipped update's norm follows from them
                row_sq = [clipped.row_lerp_sumsq_(m, g, weight) for m, g in zip(momenta, grads)]
                row_factors = [self._row_factors(sq.sqrt(), delta, state).to(m.dtype)
                               for sq, state, m in zip(row_sq, states, momenta)]
                norms = torch.stack([(f.float().square() * sq).sum().sqrt() for f, sq in zip(row_factors, row_sq)])
            elif fused:
                norms = clipped.lerp_sumsq_(momenta, grads, weight).sqrt()
            else:
                torch._foreach_lerp_(momenta, grads, weight)
                if clip_rows:
                    updates = [m * self._row_factors(m.norm(dim=1, dtype=stat_dtype), delta, state)
                               .to(m.dtype)[:, None] for m, state in zip(momenta, states)]
                if tau is None:
                    torch._foreach_add_(params, updates, alpha=-lr)
                    continue
                norms = torch.stack(torch._foreach_norm(updates, 2, dtype=stat_dtype))
            # the step RMS, lr * RMS(u), and the clip factors as [tensors]-sized math on the device
            inverse_sqrt_numel = kernel_common.device_tensor(tuple(1 / math.sqrt(u.numel()) for u in updates),
                                                       norms.dtype, norms.device)
            step_rms = norms * inverse_sqrt_numel * lr
            fired = step_rms > tau
            factors = torch.where(fired, tau / step_rms, 1.0)
            fired = fired.float().unbind()
            torch._foreach_copy_([state["rms_clipped"] for state in states], fired)
            torch._foreach_add_([state["rms_clip_count"] for state in states], fired)
            # pass 2: p <- p - lr * factor * u; the clipped update is never materialized
            if fused:
                clipped.scaled_sub_(params, updates, factors, lr, row_factors=row_factors)
                continue
            for p, update, factor in zip(params, updates, factors.to(params[0].dtype).unbind()):
                p.addcmul_(update, factor, value=-lr)
        return loss

    @staticmethod
    def _row_factors(row_norm: torch.Tensor, delta: float, state: dict) -> torch.Tensor:
        """min(1, delta / ||m_v||) for every row (vocabulary token) v; the share clipped into the state."""
        factor = (delta / row_norm.clamp(min=1e-8)).clamp_(max=1.0)  # as the authors: a zero row gets 1 (0 if delta=0)
        state["row_clip_fraction"] = (factor < 1).float().mean()
        return factor


@register("sgd_ll", cls=SGDLL, whole_tensors=True, test_lr=10.0, paper_states=lambda c: c["total"])
def build_sgd_ll(roles, **hparams):
    return SGDLL(groups_by_role(roles), **hparams)
