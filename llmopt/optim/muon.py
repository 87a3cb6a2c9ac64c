"""Muon baseline: torch.optim.Muon on the hidden matrices, AdamW on everything else, as ONE optimizer.

torch.optim.Muon takes 2-D parameters only; the embedding, lm_head and 1-D parameters go to
torch.optim.AdamW (the usual Muon recipe). `MuonWithAdamW` presents both as one optimizer: one
`step`, one `state_dict`, and the param groups of both visible to a scheduler (AdamW's groups carry
their own peak lr, `adam_lr`). Muon's defaults here are the protocol's: Newton-Schulz (3.4445,
-4.7750, 2.0315), 5 steps, momentum 0.95, Nesterov; weight decay is explicit (torch's default is 0.1).
adjust_lr: "original" scales the lr by sqrt(max(1, rows/cols)); "match_rms_adamw" by
0.2 * sqrt(max(rows, cols)).
"""

from __future__ import annotations

import torch

from llmopt.optim.common import OptimizerWrapper, check_choice, check_nonnegative, check_unit_interval, evaluate_closure

ADJUST_LR = ("original", "match_rms_adamw")


class MuonWithAdamW(OptimizerWrapper):
    def __init__(self, matrix_groups: list[dict], other_groups: list[dict], lr: float = 0.02,
                 momentum: float = 0.95, nesterov: bool = True, ns_steps: int = 5,
                 weight_decay: float = 0.0, adjust_lr: str = "original", adam_lr: float = 1e-3,
                 adam_betas: tuple[float, float] = (0.9, 0.95), adam_eps: float = 1e-8,
                 adam_weight_decay: float = 0.0):
        check_nonnegative(lr=lr, adam_lr=adam_lr, weight_decay=weight_decay, adam_eps=adam_eps,
                          adam_weight_decay=adam_weight_decay)
        check_unit_interval(momentum=momentum, adam_beta1=adam_betas[0], adam_beta2=adam_betas[1])
        check_choice("adjust_lr", adjust_lr, ADJUST_LR)
        if ns_steps < 1:
            raise ValueError(f"ns_steps must be >= 1, got {ns_steps}")
        self.muon = torch.optim.Muon(matrix_groups, lr=lr, weight_decay=weight_decay, momentum=momentum,
                                     nesterov=nesterov, ns_steps=ns_steps, adjust_lr_fn=adjust_lr)
        self.adamw = torch.optim.AdamW(other_groups, lr=adam_lr, betas=tuple(adam_betas), eps=adam_eps,
                                       weight_decay=adam_weight_decay)
        self.inner = [self.muon, self.adamw]
        self._init_wrapper()

    @torch.no_grad()
    def step(self, closure=None):
        loss = evaluate_closure(closure)
        self.muon.step()
        self.adamw.step()
        return loss

    def state_dict(self) -> dict:
        return {"muon": self.muon.state_dict(), "adamw": self.adamw.state_dict()}

    def load_state_dict(self, state_dict: dict) -> None:
        self.muon.load_state_dict(state_dict["muon"])
        self.adamw.load_state_dict(state_dict["adamw"])
