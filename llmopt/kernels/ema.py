"""EMA-Nesterov's kernel (llmopt.optim.ema_nesterov).

  ema_momentum_            m <- gamma m + (1 - gamma)(p - prev); prev <- p, one pass
"""

from __future__ import annotations

import torch

from llmopt.kernels.common import _addresses_at, _by_dtype, _element_groups, launch_shape, triton, triton_dtype

if triton is not None:
    import triton.language as tl

    from llmopt.kernels.common import _element_block, _load, round_nearest

    @triton.jit
    def _ema_momentum_kernel(m_addrs, prev_addrs, p_addrs, numel, blocks_per_tensor, gamma, DTYPE: tl.constexpr,
                             M_DTYPE: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr):
        t, offsets, mask = _element_block(numel, blocks_per_tensor, BLOCK)
        _, p = _load(p_addrs, t, offsets, mask, DTYPE, ALIGNED)
        prev_ptrs, prev = _load(prev_addrs, t, offsets, mask, DTYPE, ALIGNED)
        m_ptrs, m = _load(m_addrs, t, offsets, mask, M_DTYPE, ALIGNED)
        tl.store(m_ptrs, round_nearest(gamma * m + (1.0 - gamma) * (p - prev), M_DTYPE), mask=mask)
        tl.store(prev_ptrs, p.to(DTYPE), mask=mask)  # exact: p was a DTYPE value


def ema_momentum_(momenta: list[torch.Tensor], prev: list[torch.Tensor], params: list[torch.Tensor],
                  gamma: float) -> None:
    """m <- gamma m + (1 - gamma)(p - prev); prev <- p, in one pass over the three lists. prev has p's dtype; m
    may be wider (fp32 under bf16 parameters), one dtype for all parameters of one dtype."""
    shape = launch_shape(params[0].device)
    for dtype, (ps, prevs, ms), _ in _by_dtype(params, prev, momenta):
        for idx, _, numel, blocks, _ in _element_groups(ps, shape["EMA_ELEMENTS_PER_PROGRAM"])[0]:
            tables, tensors_aligned = _addresses_at(idx, ms, prevs, ps)
            _ema_momentum_kernel[(blocks * len(idx),)](
                *tables, numel, blocks, gamma, DTYPE=triton_dtype(dtype), M_DTYPE=triton_dtype(ms[0].dtype),
                BLOCK=shape["EMA_ELEMENTS_PER_PROGRAM"], ALIGNED=tensors_aligned,
                num_warps=shape["EMA_ELEMENT_WARPS"])
