"""Muon's kernels (llmopt.optim.muon, BatchedMuon's fused path).

  muon_stack_              m <- lerp(m, g, 1 - mu), the (Nesterov) update into a bf16 stack, its sum(u^2)
  divide_stack_            each matrix of a bf16 stack divided by its own divisor (its norm)
"""

from __future__ import annotations

import torch

from llmopt.kernels.common import _addresses_at, _element_groups, _segment_sums, launch_shape, triton, triton_dtype

if triton is not None:
    import triton.language as tl

    from llmopt.kernels.common import _element_block, _flat_block, _lerp, _momentum_update, round_nearest

    @triton.jit
    def _muon_stack_kernel(m_addrs, g_addrs, stack, partials, numel, blocks_per_tensor, cols, matrix_stride,
                           row_stride, weight, momentum, DTYPE: tl.constexpr, NESTEROV: tl.constexpr,
                           BLOCK: tl.constexpr, ALIGNED: tl.constexpr):
        t, offsets, mask = _element_block(numel, blocks_per_tensor, BLOCK)
        u, g = _momentum_update(m_addrs, g_addrs, t, offsets, mask, weight, DTYPE, ALIGNED)
        if NESTEROV:
            u = round_nearest(_lerp(g, u, momentum), DTYPE).to(tl.float32)
        u = round_nearest(u, tl.bfloat16)  # torch: the update in p's dtype, then .bfloat16()
        window = t.to(tl.int64) * matrix_stride + (offsets // cols) * row_stride + offsets % cols
        tl.store(stack + window, u, mask=mask)
        u = u.to(tl.float32)
        tl.store(partials + tl.program_id(0), tl.sum(u * u, axis=0))

    @triton.jit
    def _divide_stack_kernel(stack, divisors, matrix_numel, total, BLOCK: tl.constexpr):
        offsets, mask = _flat_block(total, BLOCK)
        x = tl.load(stack + offsets, mask=mask, other=0.0).to(tl.float32)
        divisor = tl.load(divisors + offsets // matrix_numel, mask=mask, other=1.0)
        tl.store(stack + offsets, round_nearest(tl.math.div_rn(x, divisor), tl.bfloat16), mask=mask)


def muon_stack_(momenta: list[torch.Tensor], grads: list[torch.Tensor], stack: torch.Tensor, momentum: float,
                nesterov: bool) -> torch.Tensor:
    """Muon's element-wise work for n same-shape, same-dtype matrices in one pass: m <- lerp(m, g, 1 - momentum)
    in place, and the update u = lerp(g, m, momentum) (nesterov) or m, rounded to bf16, into the window
    stack[i, :rows, :cols] of a bf16 stack [n, R >= rows, C >= cols]. Returns each u's sum of squares (fp32)."""
    if len({m.shape for m in momenta}) != 1:
        shapes = sorted({tuple(m.shape) for m in momenta})
        raise ValueError(f"muon_stack_: the matrices must share one shape, got {shapes}")
    shape = launch_shape(stack.device)
    groups, n_blocks, first, counts = _element_groups(momenta, shape["ELEMENTS_PER_PROGRAM"])
    partials = torch.empty(n_blocks, dtype=torch.float32, device=stack.device)
    for idx, _, numel, blocks, _ in groups:  # one group, the list in order: t is the matrix's index in the stack
        tables, tensors_aligned = _addresses_at(idx, momenta, grads)
        _muon_stack_kernel[(blocks * len(idx),)](
            *tables, stack, partials, numel, blocks, momenta[0].size(1), stack.stride(0), stack.stride(1),
            1 - momentum, momentum, DTYPE=triton_dtype(momenta[0].dtype), NESTEROV=nesterov,
            BLOCK=shape["ELEMENTS_PER_PROGRAM"], ALIGNED=tensors_aligned, num_warps=shape["ELEMENT_WARPS"])
    return _segment_sums(partials, first, counts)


def divide_stack_(stack: torch.Tensor, divisors: torch.Tensor) -> None:
    """stack[i] <- stack[i] / divisors[i] for a contiguous bf16 stack and fp32 divisors, rounded as torch's
    bf16 division (correctly rounded fp32 quotient, then bf16)."""
    total, shape = stack.numel(), launch_shape(stack.device)
    _divide_stack_kernel[(triton.cdiv(total, shape["ELEMENTS_PER_PROGRAM"]),)](
        stack, divisors, stack[0].numel(), total, BLOCK=shape["ELEMENTS_PER_PROGRAM"], num_warps=shape["ELEMENT_WARPS"])
