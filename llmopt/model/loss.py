"""The training objective as a module, so DDP/FSDP/compile wrap one forward that returns the loss."""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn


class CausalLMLoss(nn.Module):
    """Sum of next-token cross-entropies over target tokens (labels != -100), and their count.

    Padding is on the right, so causal attention needs no mask: the non-pad positions see exactly
    what they would with the reference code's attention_mask, and the fast causal kernels stay on.
    The logits are upcast to fp32 for the cross-entropy, as transformers' own loss does.

    fused_ce=True computes lm_head and the cross-entropy together in chunks of tokens (liger-kernel's
    fused linear cross-entropy): the [tokens, vocab] logits are never held whole, which saves their
    memory (and its traffic) when the vocabulary dwarfs the hidden size. Same loss, fp32 softmax.
    """

    def __init__(self, lm: nn.Module, fused_ce: bool = False):
        super().__init__()
        self.lm = lm  # a transformers LlamaForCausalLM
        self.fused_ce = fused_ce
        if fused_ce:
            self._fused = fused_linear_cross_entropy(lm.lm_head.weight.device)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.lm.model(input_ids=input_ids).last_hidden_state[:, :-1]
        targets = labels[:, 1:]
        if self.fused_ce:
            loss_sum = self._fused(self.lm.lm_head.weight, hidden.flatten(0, 1), targets.flatten())
        else:
            logits = self.lm.lm_head(hidden)
            loss_sum = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100,
                                       reduction="sum")
        return loss_sum, (targets != -100).sum()


def fused_linear_cross_entropy(device: torch.device) -> nn.Module:
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"trainer.fused_ce=true runs Triton kernels, which need a CUDA device (the model is on "
                         f"{device.type}); set trainer.fused_ce=false")
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except ImportError as e:
        raise ImportError("trainer.fused_ce=true needs liger-kernel (pip install 'llmopt[gpu]' or "
                          "pip install liger-kernel); or set trainer.fused_ce=false") from e
    # fp32 accumulation of the lm_head gradient across chunks, as one unchunked matmul would accumulate it
    loss = LigerFusedLinearCrossEntropyLoss(ignore_index=-100, reduction="sum", accum_dtype=torch.float32)
    # its own Triton kernels, run outside torch.compile's graph (dynamo cannot trace its chunk loop)
    return torch.compiler.disable(loss)
