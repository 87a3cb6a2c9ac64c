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
            lr, tau, delta = group["lr"], group["tau"], group["delta"]
            clip_rows = group["role"] == "output" and delta is not None
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                    state["rms_clipped"] = torch.zeros((), device=p.device)
                    state["rms_clip_count"] = torch.zeros((), device=p.device)
                m = state["momentum_buffer"].lerp_(p.grad, 1 - group["momentum"])
                update = m
                # clip factors in at least fp32 (bf16 norms are too coarse), fp64 stays fp64
                stat_dtype = torch.promote_types(m.dtype, torch.float32)
                if clip_rows:
                    row_norm = m.norm(dim=1, keepdim=True, dtype=stat_dtype)
                    factor = (delta / row_norm).clamp_(max=1.0)  # inf (zero rows) -> 1
                    state["row_clip_fraction"] = (factor < 1).float().mean()
                    update = m * factor.to(m.dtype)
                if tau is not None:
                    rms = update.to(stat_dtype).square().mean().sqrt()
                    factor = (tau / (lr * rms)).clamp(max=1.0) if lr > 0 else torch.ones_like(rms)
                    fired = (factor < 1).float()
                    state["rms_clipped"] = fired
                    state["rms_clip_count"] += fired
                    update = update * factor.to(update.dtype)
                p.add_(update, alpha=-lr)
        return loss
