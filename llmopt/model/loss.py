"""The training objective as a module, so DDP/FSDP/compile wrap one forward that returns the loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llmopt.model.attention import causal_rows
from llmopt.model.cross_entropy import kernel_runs_on, linear_cross_entropy

LOSS_HEADS = ("auto", "plain", "one_pass", "chunked")
# float32: the softmax in fp32 from the logits as lm_head rounds them (transformers' loss does the same); a deliberate
#   deviation from the papers' pure bf16: a bf16 log-softmax rounds each token's loss and gradient by up to 2^-8
#   relative, noise that a comparison of optimizers does not need
# logits: F.cross_entropy on the logits in their own dtype, as the papers' modeling file computes it (bf16 in pure bf16;
#   under autocast torch runs it in fp32 either way)
LOSS_DTYPES = ("float32", "logits")


def check_loss(head: str, loss_dtype: str) -> None:
    """Refuse an unknown trainer.loss_head or trainer.loss_dtype, or a pair that does not go together."""
    if head not in LOSS_HEADS:
        raise ValueError(f"unknown loss head {head!r} (trainer.loss_head); choose one of {list(LOSS_HEADS)}")
    if loss_dtype not in LOSS_DTYPES:
        raise ValueError(f"unknown trainer.loss_dtype {loss_dtype!r}; choose one of {list(LOSS_DTYPES)}")
    if loss_dtype == "logits" and head not in ("auto", "plain"):
        raise ValueError(f"trainer.loss_dtype=logits is F.cross_entropy on lm_head's logits (trainer.loss_head=plain); "
                         f"trainer.loss_head={head} takes the softmax in fp32. Set trainer.loss_head to auto or plain, "
                         f"or trainer.loss_dtype=float32")


class CausalLMLoss(nn.Module):
    """Sum of next-token cross-entropies over target tokens (labels != -100), and their count.

    Padding is on the right, so causal attention needs no mask: the non-pad positions see exactly
    what they would with the reference code's attention_mask, and the fast causal kernels stay on.
    The softmax is in fp32 from the logits as lm_head rounds them, as transformers' own loss does; with
    loss_dtype="logits" in the logits' dtype, as the papers' modeling file (LOSS_DTYPES).

    `head` says how lm_head and the cross-entropy run (the same loss each way):
      plain     lm_head, then F.cross_entropy on the fp32-upcast logits (torch.compile fuses the upcast)
      one_pass  llmopt.model.cross_entropy: the logits' gradient made in the forward pass, one read and one
                write of the [tokens, vocab] logits in all (Triton: CUDA, or CPU under TRITON_INTERPRET=1)
      chunked   liger-kernel's fused linear cross-entropy, in chunks of tokens: the logits are never held
                whole, which saves their memory when the vocabulary dwarfs the hidden size
      auto      one_pass on CUDA, plain elsewhere (and with loss_dtype="logits")
    """

    def __init__(self, lm: nn.Module, head: str = "auto", loss_dtype: str = "float32"):
        super().__init__()
        check_loss(head, loss_dtype)
        self.lm = lm  # a transformers LlamaForCausalLM
        self.loss_dtype = loss_dtype
        device = lm.lm_head.weight.device
        if head == "auto":
            fused = device.type == "cuda" and kernel_runs_on(device) and loss_dtype == "float32"
            head = "one_pass" if fused else "plain"
        if head != "plain" and not kernel_runs_on(device):
            raise ValueError(f"trainer.loss_head={head} runs Triton kernels, which need triton and a CUDA device "
                             f"(the model is on {device.type}; CPU only under TRITON_INTERPRET=1); set "
                             f"trainer.loss_head=plain")
        self.head = head
        if head == "chunked":
            self._chunked = chunked_linear_cross_entropy()

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # each row is one causal sequence: with llmopt's attention (use_attention), said so explicitly
        rows = causal_rows(self.lm, input_ids)
        hidden = self.lm.model(input_ids=input_ids, attention_mask=rows).last_hidden_state[:, :-1]
        targets = labels[:, 1:]
        weight = self.lm.lm_head.weight
        if self.head == "plain":
            logits = self.lm.lm_head(hidden).flatten(0, 1)
            if self.loss_dtype == "float32":
                loss_sum = F.cross_entropy(logits.float(), targets.flatten(), ignore_index=-100, reduction="sum")
            else:  # each token's loss as the papers' mean averages it; summed in fp32 (a bf16 sum would round it)
                loss_sum = F.cross_entropy(logits, targets.flatten(), ignore_index=-100, reduction="none").float().sum()
        elif self.head == "one_pass":
            device = hidden.device.type
            if torch.is_autocast_enabled(device):  # the matmul in the autocast dtype, as lm_head would run it
                dtype = torch.get_autocast_dtype(device)
                hidden, weight = hidden.to(dtype), weight.to(dtype)
            loss_sum = linear_cross_entropy(hidden.flatten(0, 1), weight, targets.flatten())
        else:
            loss_sum = self._chunked(weight, hidden.flatten(0, 1), targets.flatten())
        return loss_sum, (targets != -100).sum()


def chunked_linear_cross_entropy() -> nn.Module:
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except ImportError as e:
        raise ImportError("trainer.loss_head=chunked needs liger-kernel (pip install 'llmopt[gpu]' or "
                          "pip install liger-kernel); or set trainer.loss_head=plain") from e
    # fp32 accumulation of the lm_head gradient across chunks, as one unchunked matmul would accumulate it
    loss = LigerFusedLinearCrossEntropyLoss(ignore_index=-100, reduction="sum", accum_dtype=torch.float32)
    # its own Triton kernels, run outside torch.compile's graph (dynamo cannot trace its chunk loop)
    return torch.compiler.disable(loss)
