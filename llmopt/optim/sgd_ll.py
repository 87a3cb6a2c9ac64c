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
"""

from __future__ import annotations

import math

import torch

from llmopt.optim.common import check_nonnegative, check_unit_interval, evaluate_closure, role_groups


class SGDLL(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 100.0, momentum: float = 0.9, tau: float | None = 5e-4,
                 delta: float | None = 1e-3):
        check_nonnegative(lr=lr, tau=tau, delta=delta)
        check_unit_interval(momentum=momentum)
        super().__init__(role_groups(params), dict(lr=lr, momentum=momentum, tau=tau, delta=delta))

    @torch.no_grad()
    def step(self, closure=None):
        loss = evaluate_closure(closure)
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            lr, tau, delta = group["lr"], group["tau"], group["delta"]
            for p in params:
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                    state["rms_clipped"] = torch.zeros((), device=p.device)
                    state["rms_clip_count"] = torch.zeros((), device=p.device)
            momenta = [self.state[p]["momentum_buffer"] for p in params]
            torch._foreach_lerp_(momenta, [p.grad for p in params], 1 - group["momentum"])
            # clip statistics in at least fp32 (bf16 norms are too coarse), fp64 stays fp64
            stat_dtype = torch.promote_types(params[0].dtype, torch.float32)
            updates = momenta
            if group["role"] == "output" and delta is not None:
                updates = [self._clip_rows(m, delta, self.state[p], stat_dtype) for m, p in zip(momenta, params)]
            if tau is None:
                torch._foreach_add_(params, updates, alpha=-lr)
                continue
            # every tensor's step RMS, lr * RMS(u), at once: one multi-tensor norm, then [tensors]-sized math
            step_rms = torch._foreach_norm(updates, 2, dtype=stat_dtype)
            torch._foreach_mul_(step_rms, [lr / math.sqrt(u.numel()) for u in updates])
            step_rms = torch.stack(step_rms)
            fired = step_rms > tau
            factors = torch.where(fired, tau / step_rms, 1.0).to(params[0].dtype).unbind()
            fired = fired.float().unbind()
            torch._foreach_copy_([self.state[p]["rms_clipped"] for p in params], fired)
            torch._foreach_add_([self.state[p]["rms_clip_count"] for p in params], fired)
            for p, update, factor in zip(params, updates, factors):
                p.addcmul_(update, factor, value=-lr)  # the clipped update is never materialized
        return loss

    @staticmethod
    def _clip_rows(m: torch.Tensor, delta: float, state: dict, stat_dtype) -> torch.Tensor:
        """u_v = m_v * min(1, delta / ||m_v||) for every row (vocabulary token) v."""
        row_norm = m.norm(dim=1, keepdim=True, dtype=stat_dtype)
        factor = (delta / row_norm).clamp_(max=1.0)  # inf (zero rows) -> 1
        state["row_clip_fraction"] = (factor < 1).float().mean()
        return m * factor.to(m.dtype)
