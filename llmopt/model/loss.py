"""The training objective as a module, so DDP/FSDP/compile wrap one forward that returns the loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class CausalLMLoss(nn.Module):
    """Sum of next-token cross-entropies over target tokens (labels != -100), and their count.

    Padding is on the right, so causal attention needs no mask: the non-pad positions see exactly
    what they would with the reference code's attention_mask, and the fast causal kernels stay on.
    The logits are upcast to fp32 for the cross-entropy, as transformers' own loss does.
    """

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm  # a transformers LlamaForCausalLM

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.lm.model(input_ids=input_ids).last_hidden_state
        logits = self.lm.lm_head(hidden[:, :-1])
        targets = labels[:, 1:]
        loss_sum = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100,
                                   reduction="sum")
        return loss_sum, (targets != -100).sum()
