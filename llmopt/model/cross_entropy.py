"""lm_head + cross-entropy with the logits' gradient made in the forward pass: one pass over the [tokens, vocab]
logits (a read and a write) instead of a forward pass that reads them and a backward pass that reads and writes them.

Forward: logits = hidden @ weight^T (cuBLAS), then one Triton program per token reads its row of logits, takes
the loss (logsumexp - target logit, in fp32) and writes softmax - onehot over the row, in place: the logits
buffer becomes the gradient of the summed loss. Backward: the loss's gradient g (a scalar: the trainer's
1/tokens) rides on the small operands, grad_hidden = G (g W) and grad_weight = G^T (g hidden), so the big
tensor is never scaled. Tokens with target -100 have loss 0 and gradient 0.

The softmax is in fp32 from the logits as the matmul rounds them (bf16 in bf16 training), as
F.cross_entropy(logits.float()) computes it; the gradient is rounded once to the logits' dtype, as there.
"""

from __future__ import annotations

import torch

from llmopt.kernels.common import INTERPRET, triton, triton_dtype

if triton is not None:
    import triton.language as tl

    from llmopt.kernels.common import round_nearest

    @triton.jit
    def _cross_entropy_rows(logits_ptr, targets_ptr, losses_ptr, V, ignore_index, DTYPE: tl.constexpr,
                            BLOCK: tl.constexpr, ONE_BLOCK: tl.constexpr, WRITE_GRAD: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        base = logits_ptr + row * V
        cols = tl.arange(0, BLOCK)
        target = tl.load(targets_ptr + row)
        valid = target != ignore_index
        if ONE_BLOCK:  # the whole row stays on chip: one read
            x = tl.load(base + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
            m = tl.max(x, 0)
            e = tl.exp(x - m)  # kept for the gradient: one exponential per entry
            s = tl.sum(e, 0)
            lse = m + tl.log(s)
        else:  # online max and sum over blocks, then a second read (mostly from L2) for the gradient
            m = float("-inf")
            s = 0.0
            for start in range(0, V, BLOCK):
                x = tl.load(base + start + cols, mask=start + cols < V, other=float("-inf")).to(tl.float32)
                m_new = tl.maximum(m, tl.max(x, 0))
                s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), 0)
                m = m_new
            lse = m + tl.log(s)
        safe_target = tl.where(valid, target, 0)
        x_target = tl.load(base + safe_target).to(tl.float32)
        tl.store(losses_ptr + row, tl.where(valid, lse - x_target, 0.0))
        if WRITE_GRAD:
            if ONE_BLOCK:
                grad = e * (1.0 / s) - tl.where(cols == target, 1.0, 0.0)
                grad = tl.where(valid, grad, 0.0)
                tl.store(base + cols, round_nearest(grad, DTYPE), mask=cols < V)
            else:
                for start in range(0, V, BLOCK):
                    x = tl.load(base + start + cols, mask=start + cols < V, other=0.0).to(tl.float32)
                    grad = tl.exp(x - lse) - tl.where(start + cols == target, 1.0, 0.0)
                    grad = tl.where(valid, grad, 0.0)
                    tl.store(base + start + cols, round_nearest(grad, DTYPE), mask=start + cols < V)


# launch shapes, measured on an H100 at 65280 tokens x 32000 (benchmarks/RESULTS.md): a row of up to ONE_BLOCK_MAX
# (padded) entries is read once and kept on chip, one warp per 1024 entries (32 warps: 13.2 ms for the forward and
# backward with the matmuls, 16: 13.4, 8: 15.0); longer rows loop in blocks (4096-wide blocks: 13.6 ms there)
# (H200, 32768 x 32000 bf16, the kernel alone, scripts/bench_loss_head.py: 32 and 16 warps 62-63% of the memory
# floor, 4 and 8 warps 37-38%)
ONE_BLOCK_MAX = 32768
LOOP_BLOCK, LOOP_WARPS = 4096, 8


def _launch(logits: torch.Tensor, targets: torch.Tensor, write_grad: bool, warps: int | None = None) -> torch.Tensor:
    """Per-token losses (fp32); with write_grad, `logits` is overwritten by softmax - onehot. `warps` overrides the
    launch's warp count (a sweep: scripts/bench_loss_head.py)."""
    rows, vocab = logits.shape
    losses = torch.empty(rows, dtype=torch.float32, device=logits.device)
    padded = triton.next_power_of_2(vocab)
    one_block = padded <= ONE_BLOCK_MAX
    block, default_warps = (padded, max(4, min(32, padded // 1024))) if one_block else (LOOP_BLOCK, LOOP_WARPS)
    warps = warps or default_warps
    _cross_entropy_rows[(rows,)](logits, targets, losses, vocab, -100, DTYPE=triton_dtype(logits.dtype), BLOCK=block,
                                 ONE_BLOCK=one_block, WRITE_GRAD=write_grad, num_warps=warps)
    return losses


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = hidden @ weight.t()
        losses = _launch(logits, targets, write_grad=True)
        ctx.save_for_backward(hidden, weight, logits)  # logits: now d(sum of losses)/d(logits)
        return losses.sum()

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        hidden, weight, grad_logits = ctx.saved_tensors
        # g stays fp32 (a 0-dim tensor does not change the product's dtype): rounded to bf16 it would bias the
        # whole gradient by up to 0.4%; here each scaled operand entry is rounded once
        return grad_logits @ (weight * grad_loss), grad_logits.t() @ (hidden * grad_loss), None


def kernel_runs_on(device: torch.device) -> bool:
    return triton is not None and (device.type == "cuda" or (device.type == "cpu" and INTERPRET))


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """sum over tokens of cross_entropy(hidden @ weight^T, targets, ignore_index=-100), fp32; hidden [N, d],
    weight [V, d], targets [N]. hidden and weight must share a dtype (cast them first under autocast)."""
    if hidden.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"linear_cross_entropy: the kernel takes fp32, bf16 or fp16 tensors, not {hidden.dtype}")
    if hidden.dtype != weight.dtype:
        raise ValueError(f"linear_cross_entropy: hidden is {hidden.dtype} and weight {weight.dtype}; cast both to "
                         f"the compute dtype first")
    if not kernel_runs_on(hidden.device):
        raise ValueError(f"linear_cross_entropy runs a Triton kernel, which needs a CUDA device (the tensors are on "
                         f"{hidden.device.type}; on CPU only under TRITON_INTERPRET=1)")
    targets = targets.contiguous()
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(hidden.contiguous(), weight, targets)
    return _launch(hidden @ weight.t(), targets, write_grad=False).sum()
