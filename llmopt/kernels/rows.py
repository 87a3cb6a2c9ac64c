"""SCALE's kernels (llmopt.optim.scale): each row of a matrix normalized by its RMS, the embedding by its columns'.

  row_normalized_update_   p <- p * decay - lr * d / RMS_row(d), one pass (a row stays on chip); with
                           momentum (lm_head) d <- lerp(d, g, w) in the same pass
  column_normalized_update_ the embedding: p <- p * decay - lr * d / rms[column], rms given
"""

from __future__ import annotations

import torch

from llmopt.kernels.common import (
    _addresses_at,
    _by_dtype,
    _indices_by,
    _row_launch,
    launch_shape,
    rows_aligned,
    triton,
    triton_dtype,
)

if triton is not None:
    import triton.language as tl

    from llmopt.kernels.common import _flat_block, _load, _momentum_update, _row_tile, round_nearest

    @triton.jit
    def _row_update_kernel(p_addrs, d_addrs, g_addrs, n_rows, blocks_per_tensor, n_cols, lr, decay, sqrt_cols, weight,
                           DTYPE: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr, DECAY: tl.constexpr,
                           MOMENTUM: tl.constexpr, ALIGNED: tl.constexpr):
        pid = tl.program_id(0)  # tensors of one shape: program -> tensor, block of ROWS rows
        t = pid // blocks_per_tensor
        _, offsets, mask = _row_tile(pid - t * blocks_per_tensor, n_rows, n_cols, ROWS, BLOCK)
        if MOMENTUM:  # d is a momentum buffer: d <- lerp(d, g, weight) first
            d, _ = _momentum_update(d_addrs, g_addrs, t, offsets, mask, weight, DTYPE, ALIGNED)
        else:
            _, d = _load(d_addrs, t, offsets, mask, DTYPE, ALIGNED)
        p_ptrs, p = _load(p_addrs, t, offsets, mask, DTYPE, ALIGNED)  # issued before the reduction waits
        # as the eager code: the row norm and the RMS are tensors of the parameter dtype, floored at 1e-8
        norm = round_nearest(tl.sqrt(tl.sum(d * d, axis=1)), DTYPE).to(tl.float32)
        rms = tl.maximum(round_nearest(norm / sqrt_cols, DTYPE).to(tl.float32), 1e-8)
        if DECAY:
            p = round_nearest(p * decay, DTYPE).to(tl.float32)
        tl.store(p_ptrs, round_nearest(p + (-lr) * (d / rms[:, None]), DTYPE), mask=mask)

    @triton.jit
    def _column_update_kernel(p, d, rms, n_cols, total, lr, decay, DTYPE: tl.constexpr, BLOCK: tl.constexpr,
                              DECAY: tl.constexpr):
        offsets, mask = _flat_block(total, BLOCK)
        x = tl.load(p + offsets, mask=mask, other=0.0).to(tl.float32)
        direction = tl.load(d + offsets, mask=mask, other=0.0).to(tl.float32)
        scale = tl.load(rms + offsets % n_cols, mask=mask, other=1.0).to(tl.float32)
        if DECAY:
            x = round_nearest(x * decay, DTYPE).to(tl.float32)
        tl.store(p + offsets, round_nearest(x + (-lr) * (direction / scale), DTYPE), mask=mask)


def row_normalized_update_(params: list[torch.Tensor], directions: list[torch.Tensor], lr: float,
                           decay: float = 1.0, grads: list[torch.Tensor] | None = None, weight: float = 0.0) -> None:
    """p <- p * decay - lr * d / max(RMS(d row), 1e-8) for 2-D tensors, every row normalized over its
    columns (SCALE's "column" normalization of an nn.Linear weight). With `grads`, the directions are
    momentum buffers, first updated in the same pass: d <- lerp(d, g, weight). Rows must be at most
    MAX_ROW long."""
    momentum = grads is not None
    shape = launch_shape(params[0].device)
    for dtype, (ps, ds, gs), _ in _by_dtype(params, directions, grads if momentum else directions):
        for (n_rows, n_cols), idx in _indices_by(tuple(p.shape for p in ps)).items():  # one launch per shape
            block, rows_per_program, warps = _row_launch(n_cols, shape)
            blocks = -(-n_rows // rows_per_program)
            (p_addrs, d_addrs, g_addrs), tensors_aligned = _addresses_at(idx, ps, ds, gs)
            _row_update_kernel[(blocks * len(idx),)](
                p_addrs, d_addrs, g_addrs, n_rows, blocks, n_cols, lr, decay, float(n_cols) ** 0.5, weight,
                DTYPE=triton_dtype(dtype), ROWS=rows_per_program, BLOCK=block, DECAY=decay != 1.0,
                MOMENTUM=momentum, ALIGNED=tensors_aligned and rows_aligned(n_cols, dtype), num_warps=warps)


def column_normalized_update_(param: torch.Tensor, direction: torch.Tensor, rms: torch.Tensor, lr: float,
                              decay: float = 1.0) -> None:
    """p <- p * decay - lr * d / rms[column] for one contiguous 2-D tensor and its per-column scales `rms`
    (SCALE's embedding: its output units are columns), rounded as the eager mul_ and addcdiv_."""
    total, shape = param.numel(), launch_shape(param.device)
    _column_update_kernel[(triton.cdiv(total, shape["ELEMENTS_PER_PROGRAM"]),)](
        param, direction, rms.contiguous(), param.size(1), total, lr, decay, DTYPE=triton_dtype(param.dtype),
        BLOCK=shape["ELEMENTS_PER_PROGRAM"], DECAY=decay != 1.0, num_warps=shape["ELEMENT_WARPS"])
