"""SGD-LL's kernels (llmopt.optim.sgd_ll): the momentum with its sums of squares, then the clipped update.

  lerp_sumsq_              pass 1: m <- lerp(m, g, w) and sum(m^2) per tensor (deterministic)
  scaled_sub_              pass 2: p <- p - lr * factor[i] * u_i, factor a device vector (u_i's rows
                           optionally scaled first: the output layer's per-row clip)
  row_lerp_sumsq_          pass 1 for the output layer: m <- lerp(m, g, w) and each row's sum(m^2)
"""

from __future__ import annotations

import torch

from llmopt.kernels.common import (
    _addresses_at,
    _by_dtype,
    _element_groups,
    _row_launch,
    _segment_sums,
    device_tensor,
    launch_shape,
    rows_aligned,
    triton,
    triton_dtype,
)

if triton is not None:
    import triton.language as tl

    from llmopt.kernels.common import _element_block, _load, _momentum_update, _row_tile, round_nearest

    @triton.jit
    def _lerp_sumsq_kernel(m_addrs, g_addrs, partials, numel, blocks_per_tensor, weight, DTYPE: tl.constexpr,
                           BLOCK: tl.constexpr, ALIGNED: tl.constexpr):
        t, offsets, mask = _element_block(numel, blocks_per_tensor, BLOCK)
        m, _ = _momentum_update(m_addrs, g_addrs, t, offsets, mask, weight, DTYPE, ALIGNED)
        tl.store(partials + tl.program_id(0), tl.sum(m * m, axis=0))

    @triton.jit
    def _scaled_sub_kernel(p_addrs, u_addrs, factors, list_index, numel, blocks_per_tensor, lr, DTYPE: tl.constexpr,
                           BLOCK: tl.constexpr, ALIGNED: tl.constexpr):
        t, offsets, mask = _element_block(numel, blocks_per_tensor, BLOCK)
        p_ptrs, p = _load(p_addrs, t, offsets, mask, DTYPE, ALIGNED)
        _, u = _load(u_addrs, t, offsets, mask, DTYPE, ALIGNED)
        # the tensor's factor (factors in list order, t its index in the group), in the parameter dtype as eager;
        # read after the data's loads are issued, so that its two dependent loads wait beside them, not before
        factor = round_nearest(tl.load(factors + tl.load(list_index + t)), DTYPE).to(tl.float32)
        tl.store(p_ptrs, round_nearest(p + (-lr) * u * factor, DTYPE), mask=mask)

    @triton.jit
    def _row_scaled_sub_kernel(p, u, factor, row_factors, n_rows, n_cols, lr, DTYPE: tl.constexpr, ROWS: tl.constexpr,
                               BLOCK: tl.constexpr):
        """One tensor: p <- p - lr * factor * round(u * row_factors[row]), as the eager m * row_factor, addcmul_."""
        rows, offsets, mask = _row_tile(tl.program_id(0), n_rows, n_cols, ROWS, BLOCK)
        x = tl.load(p + offsets, mask=mask, other=0.0).to(tl.float32)
        update = tl.load(u + offsets, mask=mask, other=0.0).to(tl.float32)
        scale = tl.load(row_factors + rows, mask=rows < n_rows, other=0.0).to(tl.float32)
        update = round_nearest(update * scale[:, None], DTYPE).to(tl.float32)
        factor = round_nearest(tl.load(factor), DTYPE).to(tl.float32)
        tl.store(p + offsets, round_nearest(x + (-lr) * update * factor, DTYPE), mask=mask)

    @triton.jit
    def _row_lerp_sumsq_kernel(m_addrs, g_addrs, row_sq, n_rows, n_cols, weight, DTYPE: tl.constexpr,
                               ROWS: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr):
        rows, offsets, mask = _row_tile(tl.program_id(0), n_rows, n_cols, ROWS, BLOCK)
        m, _ = _momentum_update(m_addrs, g_addrs, 0, offsets, mask, weight, DTYPE, ALIGNED)
        tl.store(row_sq + rows, tl.sum(m * m, axis=1), mask=rows < n_rows)


def lerp_sumsq_(momenta: list[torch.Tensor], grads: list[torch.Tensor], weight: float) -> torch.Tensor:
    """m <- lerp(m, g, weight) for every pair; returns sum(m^2) of each new m (fp32, in list order)."""
    sums = None
    shape = launch_shape(momenta[0].device)
    for dtype, (ms, gs), idx_dtype in _by_dtype(momenta, grads):
        groups, n_blocks, first, counts = _element_groups(ms, shape["ELEMENTS_PER_PROGRAM"])
        partials = torch.empty(n_blocks, dtype=torch.float32, device=ms[0].device)
        for idx, _, numel, blocks, start in groups:
            tables, tensors_aligned = _addresses_at(idx, ms, gs)
            _lerp_sumsq_kernel[(blocks * len(idx),)](
                *tables, partials[start:], numel, blocks, weight, DTYPE=triton_dtype(dtype),
                BLOCK=shape["ELEMENTS_PER_PROGRAM"], ALIGNED=tensors_aligned, num_warps=shape["ELEMENT_WARPS"])
        out = _segment_sums(partials, first, counts)
        if len(idx_dtype) == len(momenta):
            return out
        if sums is None:  # several dtypes: gather each one's sums into list order
            sums = torch.empty(len(momenta), dtype=torch.float32, device=out.device)
        sums[device_tensor(tuple(idx_dtype), torch.int64, out.device)] = out
    return sums


def scaled_sub_(params: list[torch.Tensor], updates: list[torch.Tensor], factors: torch.Tensor,
                lr: float, row_factors: list[torch.Tensor] | None = None) -> None:
    """p_i <- p_i - lr * factors[i] * u_i for every i; `factors` a device vector (fp32). With `row_factors`
    (per tensor a [rows] vector in its dtype; 2-D tensors, rows at most MAX_ROW long), u_i is first its rows scaled,
    round(u_i[r] * row_factors[i][r])."""
    shape = launch_shape(params[0].device)
    if row_factors is not None:  # one launch per tensor (SGD-LL's output layer: usually one)
        for i, (p, u, rf) in enumerate(zip(params, updates, row_factors)):
            (n_rows, n_cols), (block, rows_per_program, warps) = p.shape, _row_launch(p.size(1), shape)
            _row_scaled_sub_kernel[(triton.cdiv(n_rows, rows_per_program),)](
                p, u, factors[i:i + 1].float(), rf.contiguous(), n_rows, n_cols, lr, DTYPE=triton_dtype(p.dtype),
                ROWS=rows_per_program, BLOCK=block, num_warps=warps)
        return
    for dtype, (ps, us), idx_dtype in _by_dtype(params, updates):
        group_factors = factors  # with several dtypes, this one's
        if len(idx_dtype) < len(params):
            group_factors = factors[device_tensor(tuple(idx_dtype), torch.int64, factors.device)]
        group_factors = group_factors.float().contiguous()
        for idx, index_table, numel, blocks, _ in _element_groups(ps, shape["ELEMENTS_PER_PROGRAM"])[0]:
            tables, tensors_aligned = _addresses_at(idx, ps, us)
            _scaled_sub_kernel[(blocks * len(idx),)](*tables, group_factors, index_table, numel, blocks, lr,
                                                     DTYPE=triton_dtype(dtype), BLOCK=shape["ELEMENTS_PER_PROGRAM"],
                                                     ALIGNED=tensors_aligned, num_warps=shape["ELEMENT_WARPS"])


def row_lerp_sumsq_(momentum: torch.Tensor, grad: torch.Tensor, weight: float) -> torch.Tensor:
    """m <- lerp(m, g, weight) for one 2-D tensor (rows at most MAX_ROW long); returns each row's sum of
    squares of the new m (fp32, [rows])."""
    n_rows, n_cols = momentum.shape
    block, rows_per_program, warps = _row_launch(n_cols, launch_shape(momentum.device))
    row_sq = torch.empty(n_rows, dtype=torch.float32, device=momentum.device)
    tables, tensors_aligned = _addresses_at((0,), [momentum], [grad])
    _row_lerp_sumsq_kernel[(triton.cdiv(n_rows, rows_per_program),)](
        *tables, row_sq, n_rows, n_cols, weight, DTYPE=triton_dtype(momentum.dtype), ROWS=rows_per_program,
        BLOCK=block, ALIGNED=tensors_aligned and rows_aligned(n_cols, momentum.dtype), num_warps=warps)
    return row_sq
