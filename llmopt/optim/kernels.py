"""Triton kernels for the optimizer steps whose eager form is launch- or pass-bound.

Each kernel covers a whole list of tensors in one launch: their addresses sit in a device table and
every program looks up which tensor, and which rows or elements of it, it owns (the multi-tensor
scheme of apex and torch's foreach kernels). All arithmetic is in fp32; values are rounded to the
tensors' dtype where the eager code rounds them, so a kernel's result equals the eager one within one
rounding of the last bit (tests/test_kernels.py).

  row_normalized_update_   SCALE: p <- p * decay - lr * d / RMS_row(d), one pass (a row stays on chip); with
                           momentum (lm_head) d <- lerp(d, g, w) in the same pass
  column_normalized_update_ SCALE's embedding: p <- p * decay - lr * d / rms[column], rms given
  lerp_sumsq_              SGD-LL pass 1: m <- lerp(m, g, w) and sum(m^2) per tensor (deterministic)
  scaled_sub_              SGD-LL pass 2: p <- p - lr * factor[i] * u_i, factor a device vector (u_i's rows
                           optionally scaled first: the output layer's per-row clip)
  row_lerp_sumsq_          SGD-LL pass 1 for the output layer: m <- lerp(m, g, w) and each row's sum(m^2)
  ema_momentum_            EMA-Nesterov: m <- gamma m + (1 - gamma)(p - prev); prev <- p, one pass
  muon_stack_              Muon: m <- lerp(m, g, 1 - mu), the (Nesterov) update into a bf16 stack, its sum(u^2)
  divide_stack_            Muon: each matrix of a bf16 stack divided by its own divisor (its norm)

The kernels run on CUDA tensors; on CPU tensors only under TRITON_INTERPRET=1 (Triton's interpreter,
how the tests check them without a GPU). `available(tensors)` says whether they can run.
"""

from __future__ import annotations

import functools
import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs without triton: the optimizers use their eager code
    triton = None

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# launch shapes, measured on an H100 (scripts/bench_optim.py; benchmarks/RESULTS.md, which has an H200 sweep too)
ELEMENTS_PER_PROGRAM, ELEMENT_WARPS = 2048, 4      # element-wise kernels
# row kernel: rows per program = ROW_ELEMENTS_PER_PROGRAM // padded row length; warps from launch sweeps on the
# 1B and 7B shapes (bf16): ROW_WARPS for rows padded to at most LONG_ROW elements (2048-wide: 77% of the floor
# against 71-74% with 8 warps; 4096-wide: 81% against 77% with 16), LONG_ROW_WARPS beyond (5461-wide: 66-72%
# against 45% with 16; 11008-wide: 71% against 62% with 16)
ROW_ELEMENTS_PER_PROGRAM, ROW_WARPS, LONG_ROW, LONG_ROW_WARPS = 2048, 4, 4096, 32
# the constants above that a launch sweep may change (scripts/bench_optim.py --launch)
LAUNCH_CONSTANTS = ("ELEMENTS_PER_PROGRAM", "ELEMENT_WARPS", "ROW_ELEMENTS_PER_PROGRAM", "ROW_WARPS", "LONG_ROW",
                    "LONG_ROW_WARPS")
MAX_ROW = 16384  # longest row the row kernel keeps on chip; longer rows take the eager path
_TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # fp64 stays eager: the kernels add in fp32


def available(tensors: list[torch.Tensor]) -> bool:
    """Whether the kernels can run on these tensors: contiguous, on CUDA (or on the CPU under Triton's
    interpreter), floating point."""
    if triton is None or not tensors:
        return False
    device = tensors[0].device
    if not (device.type == "cuda" or (device.type == "cpu" and INTERPRET)):
        return False
    # per step, for every tensor of a group: kept to the cheapest checks (sets of dtypes and device indices)
    return ({t.dtype for t in tensors} <= set(_TRITON_DTYPES) and len({t.get_device() for t in tensors}) == 1
            and all(t.is_contiguous() for t in tensors))


def use_kernels(fused: bool | None, tensors: list[torch.Tensor], who: str) -> bool:
    """An optimizer's `fused` switch: None = the kernels on CUDA tensors where they can run, True = the
    kernels or an error saying why not, False = eager."""
    if fused is None:
        return bool(tensors) and tensors[0].device.type == "cuda" and available(tensors)
    if fused:
        require(tensors, who)
    return bool(fused)


def require(tensors: list[torch.Tensor], who: str) -> None:
    """The one error for fused=True where the kernels cannot run."""
    if not available(tensors):
        why = ("triton is not installed" if triton is None else
               "the tensors are not all contiguous fp32/bf16/fp16 tensors on CUDA (CPU tensors need "
               "TRITON_INTERPRET=1)")
        raise RuntimeError(f"{who}: fused=True needs the Triton kernels, but {why}; pass fused=None "
                           "(kernels where possible) or fused=False (eager)")


def triton_dtype(dtype: torch.dtype):
    return {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}[dtype]


@functools.lru_cache(maxsize=256)
def device_tensor(values: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small constant tensor on `device`, uploaded once per distinct value (never modify it). The upload
    goes through pinned memory: a copy from pageable memory would wait for all queued GPU work first."""
    host = torch.tensor(values, dtype=dtype)
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


def _addresses(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The tensors' data pointers as a device table (cached: a model's parameters and states stay put)."""
    return device_tensor(tuple(t.data_ptr() for t in tensors), torch.int64, tensors[0].device)


@functools.lru_cache(maxsize=64)
def _block_table(sizes: tuple[int, ...], per_block: int, device: torch.device):
    """For blocks of `per_block` units (elements or rows) over tensors of `sizes` units: each block's
    tensor index and first unit, each tensor's first block and block count. Cached: the sizes of a
    model's parameter lists never change."""
    counts = torch.tensor([-(-s // per_block) for s in sizes], dtype=torch.int64)
    tensor = torch.repeat_interleave(torch.arange(len(sizes)), counts)
    first = torch.cumsum(counts, 0) - counts
    start = (torch.arange(len(tensor)) - first[tensor]) * per_block
    return tuple(x.to(device) for x in (tensor.int(), start, first, counts.int()))


def _by_dtype(*lists: list[torch.Tensor]):
    """The lists split by the first list's dtype (one kernel specialization per dtype)."""
    dtypes = {t.dtype for t in lists[0]}
    if len(dtypes) == 1:  # the usual case: the lists as they are (per-step host work kept small)
        return [(dtypes.pop(), list(lists), range(len(lists[0])))]
    by_dtype = {}
    for i, t in enumerate(lists[0]):
        by_dtype.setdefault(t.dtype, []).append(i)
    return [(dtype, [[lst[i] for i in idx] for lst in lists], idx) for dtype, idx in by_dtype.items()]


if triton is not None:

    @triton.jit
    def round_nearest(x, DTYPE: tl.constexpr):
        """fp32 -> DTYPE, rounding to nearest even. Spelled out for bf16 because Triton's interpreter
        (the CPU tests) truncates there, while the GPU rounds to nearest: this way both round alike."""
        if DTYPE == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            x = bits.to(tl.float32, bitcast=True)
        return x.to(DTYPE)

    @triton.jit
    def _pointer(addrs, t, DTYPE: tl.constexpr):
        """Tensor t's data pointer, from a table of addresses."""
        return tl.load(addrs + t).to(tl.pointer_type(DTYPE))

    @triton.jit
    def _load(addrs, t, offsets, mask, DTYPE: tl.constexpr):
        """Tensor t's pointer (from a table of addresses) and its values at `offsets`, in fp32."""
        ptr = _pointer(addrs, t, DTYPE)
        return ptr, tl.load(ptr + offsets, mask=mask, other=0.0).to(tl.float32)

    @triton.jit
    def _lerp(start, end, weight):
        """torch.lerp's two-sided formula, in fp32."""
        return tl.where(weight < 0.5, start + weight * (end - start), end - (end - start) * (1.0 - weight))

    @triton.jit
    def _momentum_update(m_addrs, g_addrs, t, offsets, mask, weight, DTYPE: tl.constexpr):
        """m <- lerp(m, g, weight) at tensor t's `offsets`, stored; returns the new m and g in fp32."""
        m_ptr, m = _load(m_addrs, t, offsets, mask, DTYPE)
        _, g = _load(g_addrs, t, offsets, mask, DTYPE)
        m = round_nearest(_lerp(m, g, weight), DTYPE)
        tl.store(m_ptr + offsets, m, mask=mask)
        return m.to(tl.float32), g

    @triton.jit
    def _flat_block(total, BLOCK: tl.constexpr):
        """A one-tensor element-wise kernel's program: its element offsets and mask."""
        offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        return offsets, offsets < total

    @triton.jit
    def _element_block(block_tensor, block_start, numel_of, BLOCK: tl.constexpr):
        """The element-wise kernels' program: its tensor, element offsets and mask."""
        t = tl.load(block_tensor + tl.program_id(0))
        offsets = tl.load(block_start + tl.program_id(0)) + tl.arange(0, BLOCK)
        return t, offsets, offsets < tl.load(numel_of + t)

    @triton.jit
    def _row_update_kernel(p_addrs, d_addrs, g_addrs, block_tensor, block_row, rows_of, n_cols, lr, decay,
                           sqrt_cols, weight, DTYPE: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr,
                           DECAY: tl.constexpr, MOMENTUM: tl.constexpr):
        pid = tl.program_id(0)
        t = tl.load(block_tensor + pid)
        rows = tl.load(block_row + pid) + tl.arange(0, ROWS)
        cols = tl.arange(0, BLOCK)
        mask = (rows[:, None] < tl.load(rows_of + t)) & (cols[None, :] < n_cols)
        offsets = rows[:, None].to(tl.int64) * n_cols + cols[None, :]
        if MOMENTUM:  # d is a momentum buffer: d <- lerp(d, g, weight) first
            d, _ = _momentum_update(d_addrs, g_addrs, t, offsets, mask, weight, DTYPE)
        else:
            _, d = _load(d_addrs, t, offsets, mask, DTYPE)
        p_ptr, p = _load(p_addrs, t, offsets, mask, DTYPE)  # issued before the reduction waits
        # as the eager code: the row norm and the RMS are tensors of the parameter dtype, floored at 1e-8
        norm = round_nearest(tl.sqrt(tl.sum(d * d, axis=1)), DTYPE).to(tl.float32)
        rms = tl.maximum(round_nearest(norm / sqrt_cols, DTYPE).to(tl.float32), 1e-8)
        if DECAY:
            p = round_nearest(p * decay, DTYPE).to(tl.float32)
        tl.store(p_ptr + offsets, round_nearest(p + (-lr) * (d / rms[:, None]), DTYPE), mask=mask)

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

    @triton.jit
    def _lerp_sumsq_kernel(m_addrs, g_addrs, partials, block_tensor, block_start, numel_of, weight,
                           DTYPE: tl.constexpr, BLOCK: tl.constexpr):
        t, offsets, mask = _element_block(block_tensor, block_start, numel_of, BLOCK)
        m, _ = _momentum_update(m_addrs, g_addrs, t, offsets, mask, weight, DTYPE)
        tl.store(partials + tl.program_id(0), tl.sum(m * m, axis=0))

    @triton.jit
    def _segment_sum_kernel(partials, first_block, blocks_of, out, BLOCK: tl.constexpr):
        """out[t] = sum of tensor t's block partials, in a fixed order (no atomics: reproducible)."""
        t = tl.program_id(0)
        first = tl.load(first_block + t)
        end = first + tl.load(blocks_of + t)
        acc = tl.zeros([BLOCK], tl.float32)
        for i in range(first, end, BLOCK):
            idx = i + tl.arange(0, BLOCK)
            acc += tl.load(partials + idx, mask=idx < end, other=0.0)
        tl.store(out + t, tl.sum(acc, axis=0))

    @triton.jit
    def _scaled_sub_kernel(p_addrs, u_addrs, factors, row_factors, n_cols, block_tensor, block_start, numel_of,
                           lr, DTYPE: tl.constexpr, BLOCK: tl.constexpr, ROW_FACTORS: tl.constexpr):
        t, offsets, mask = _element_block(block_tensor, block_start, numel_of, BLOCK)
        factor = round_nearest(tl.load(factors + t), DTYPE).to(tl.float32)  # eager: the factor in the parameter dtype
        p_ptr, p = _load(p_addrs, t, offsets, mask, DTYPE)
        _, u = _load(u_addrs, t, offsets, mask, DTYPE)
        if ROW_FACTORS:  # one tensor; u is its rows scaled first, rounded as the eager m * row_factor
            u = round_nearest(u * tl.load(row_factors + offsets // n_cols, mask=mask, other=0.0).to(tl.float32), DTYPE)
            u = u.to(tl.float32)
        tl.store(p_ptr + offsets, round_nearest(p + (-lr) * u * factor, DTYPE), mask=mask)

    @triton.jit
    def _row_lerp_sumsq_kernel(m_addrs, g_addrs, row_sq, n_rows, n_cols, weight, DTYPE: tl.constexpr,
                               ROWS: tl.constexpr, BLOCK: tl.constexpr):
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        cols = tl.arange(0, BLOCK)
        mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
        offsets = rows[:, None].to(tl.int64) * n_cols + cols[None, :]
        m, _ = _momentum_update(m_addrs, g_addrs, 0, offsets, mask, weight, DTYPE)
        tl.store(row_sq + rows, tl.sum(m * m, axis=1), mask=rows < n_rows)

    @triton.jit
    def _ema_momentum_kernel(m_addrs, prev_addrs, p_addrs, block_tensor, block_start, numel_of, gamma,
                             DTYPE: tl.constexpr, BLOCK: tl.constexpr):
        t, offsets, mask = _element_block(block_tensor, block_start, numel_of, BLOCK)
        _, p = _load(p_addrs, t, offsets, mask, DTYPE)
        prev_ptr, prev = _load(prev_addrs, t, offsets, mask, DTYPE)
        m_ptr, m = _load(m_addrs, t, offsets, mask, DTYPE)
        tl.store(m_ptr + offsets, round_nearest(gamma * m + (1.0 - gamma) * (p - prev), DTYPE), mask=mask)
        tl.store(prev_ptr + offsets, p.to(DTYPE), mask=mask)  # exact: p was a DTYPE value

    @triton.jit
    def _muon_stack_kernel(m_addrs, g_addrs, stack, partials, block_tensor, block_start, numel_of, cols,
                           matrix_stride, row_stride, weight, momentum, DTYPE: tl.constexpr,
                           NESTEROV: tl.constexpr, BLOCK: tl.constexpr):
        t, offsets, mask = _element_block(block_tensor, block_start, numel_of, BLOCK)
        u, g = _momentum_update(m_addrs, g_addrs, t, offsets, mask, weight, DTYPE)
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


def _elementwise_launch(tensors: list[torch.Tensor]):
    """Grid and tables for an element-wise kernel over `tensors` (one dtype)."""
    sizes = tuple(t.numel() for t in tensors)
    tensor, start, first, counts = _block_table(sizes, ELEMENTS_PER_PROGRAM, tensors[0].device)
    numel = device_tensor(sizes, torch.int64, tensors[0].device)
    return (len(tensor),), tensor, start, first, counts, numel


def _row_launch(n_cols: int) -> tuple[int, int, int]:
    """The row kernels' tile for rows of n_cols: padded row length, rows per program, warps."""
    block = triton.next_power_of_2(n_cols)
    rows_per_program = max(1, ROW_ELEMENTS_PER_PROGRAM // block)
    warps = ROW_WARPS if block <= LONG_ROW else LONG_ROW_WARPS
    return block, rows_per_program, warps


def _segment_sums(partials: torch.Tensor, first: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Each tensor's sum of its blocks' partial sums (fp32), in a fixed order."""
    out = torch.empty(len(counts), dtype=torch.float32, device=partials.device)
    _segment_sum_kernel[(len(counts),)](partials, first, counts, out, BLOCK=1024, num_warps=4)
    return out


def row_normalized_update_(params: list[torch.Tensor], directions: list[torch.Tensor], lr: float,
                           decay: float = 1.0, grads: list[torch.Tensor] | None = None, weight: float = 0.0) -> None:
    """p <- p * decay - lr * d / max(RMS(d row), 1e-8) for 2-D tensors, every row normalized over its
    columns (SCALE's "column" normalization of an nn.Linear weight). With `grads`, the directions are
    momentum buffers, first updated in the same pass: d <- lerp(d, g, weight). Rows must be at most
    MAX_ROW long."""
    momentum = grads is not None
    for dtype, (ps, ds, gs), _ in _by_dtype(params, directions, grads if momentum else directions):
        by_cols: dict[int, list[int]] = {}
        rows = [p.shape for p in ps]
        for i, (_, n_cols) in enumerate(rows):
            by_cols.setdefault(n_cols, []).append(i)
        for n_cols, idx in by_cols.items():
            block, rows_per_program, warps = _row_launch(n_cols)
            group_p, group_d = [ps[i] for i in idx], [ds[i] for i in idx]
            group_rows = tuple(rows[i][0] for i in idx)
            tensor, row, _, _ = _block_table(group_rows, rows_per_program, group_p[0].device)
            rows_of = device_tensor(group_rows, torch.int32, tensor.device)
            d_addrs = _addresses(group_d)
            _row_update_kernel[(len(tensor),)](
                _addresses(group_p), d_addrs, _addresses([gs[i] for i in idx]) if momentum else d_addrs, tensor,
                row, rows_of, n_cols, lr, decay, float(n_cols) ** 0.5, weight, DTYPE=triton_dtype(dtype),
                ROWS=rows_per_program, BLOCK=block, DECAY=decay != 1.0, MOMENTUM=momentum, num_warps=warps)


def column_normalized_update_(param: torch.Tensor, direction: torch.Tensor, rms: torch.Tensor, lr: float,
                              decay: float = 1.0) -> None:
    """p <- p * decay - lr * d / rms[column] for one contiguous 2-D tensor and its per-column scales `rms`
    (SCALE's embedding: its output units are columns), rounded as the eager mul_ and addcdiv_."""
    total = param.numel()
    _column_update_kernel[(triton.cdiv(total, ELEMENTS_PER_PROGRAM),)](
        param, direction, rms.contiguous(), param.size(1), total, lr, decay, DTYPE=triton_dtype(param.dtype),
        BLOCK=ELEMENTS_PER_PROGRAM, DECAY=decay != 1.0, num_warps=ELEMENT_WARPS)


def lerp_sumsq_(momenta: list[torch.Tensor], grads: list[torch.Tensor], weight: float) -> torch.Tensor:
    """m <- lerp(m, g, weight) for every pair; returns sum(m^2) of each new m (fp32, in list order)."""
    sums = None
    for dtype, (ms, gs), idx in _by_dtype(momenta, grads):
        grid, tensor, start, first, counts, numel = _elementwise_launch(ms)
        partials = torch.empty(grid[0], dtype=torch.float32, device=ms[0].device)
        _lerp_sumsq_kernel[grid](_addresses(ms), _addresses(gs), partials, tensor, start, numel, weight,
                                 DTYPE=triton_dtype(dtype), BLOCK=ELEMENTS_PER_PROGRAM, num_warps=ELEMENT_WARPS)
        out = _segment_sums(partials, first, counts)
        if len(idx) == len(momenta):
            return out
        if sums is None:  # several dtypes: gather each one's sums into list order
            sums = torch.empty(len(momenta), dtype=torch.float32, device=out.device)
        sums[device_tensor(tuple(idx), torch.int64, out.device)] = out
    return sums


def scaled_sub_(params: list[torch.Tensor], updates: list[torch.Tensor], factors: torch.Tensor,
                lr: float, row_factors: list[torch.Tensor] | None = None) -> None:
    """p_i <- p_i - lr * factors[i] * u_i for every i; `factors` a device vector (fp32). With `row_factors`
    (per tensor a [rows] vector in its dtype), u_i is first its rows scaled, round(u_i[r] * row_factors[i][r])."""
    if row_factors is not None:  # one launch per tensor (SGD-LL's output layer: usually one)
        for i, (p, u, rf) in enumerate(zip(params, updates, row_factors)):
            grid, tensor, start, _, _, numel = _elementwise_launch([p])
            _scaled_sub_kernel[grid](_addresses([p]), _addresses([u]), factors[i:i + 1].float(), rf.contiguous(),
                                     p.size(1), tensor, start, numel, lr, DTYPE=triton_dtype(p.dtype),
                                     BLOCK=ELEMENTS_PER_PROGRAM, ROW_FACTORS=True, num_warps=ELEMENT_WARPS)
        return
    for dtype, (ps, us), idx in _by_dtype(params, updates):
        grid, tensor, start, _, _, numel = _elementwise_launch(ps)
        group_factors = factors if len(idx) == len(params) else factors[device_tensor(tuple(idx), torch.int64,
                                                                                      factors.device)]
        group_factors = group_factors.float().contiguous()
        _scaled_sub_kernel[grid](_addresses(ps), _addresses(us), group_factors, group_factors, 1, tensor, start,
                                 numel, lr, DTYPE=triton_dtype(dtype), BLOCK=ELEMENTS_PER_PROGRAM,
                                 ROW_FACTORS=False, num_warps=ELEMENT_WARPS)


def row_lerp_sumsq_(momentum: torch.Tensor, grad: torch.Tensor, weight: float) -> torch.Tensor:
    """m <- lerp(m, g, weight) for one 2-D tensor (rows at most MAX_ROW long); returns each row's sum of
    squares of the new m (fp32, [rows])."""
    n_rows, n_cols = momentum.shape
    block, rows_per_program, warps = _row_launch(n_cols)
    row_sq = torch.empty(n_rows, dtype=torch.float32, device=momentum.device)
    _row_lerp_sumsq_kernel[(triton.cdiv(n_rows, rows_per_program),)](
        _addresses([momentum]), _addresses([grad]), row_sq, n_rows, n_cols, weight,
        DTYPE=triton_dtype(momentum.dtype), ROWS=rows_per_program, BLOCK=block, num_warps=warps)
    return row_sq


def ema_momentum_(momenta: list[torch.Tensor], prev: list[torch.Tensor], params: list[torch.Tensor],
                  gamma: float) -> None:
    """m <- gamma m + (1 - gamma)(p - prev); prev <- p, in one pass over the three lists."""
    for dtype, (ms, prevs, ps), _ in _by_dtype(momenta, prev, params):
        grid, tensor, start, _, _, numel = _elementwise_launch(ps)
        _ema_momentum_kernel[grid](_addresses(ms), _addresses(prevs), _addresses(ps), tensor, start, numel,
                                   gamma, DTYPE=triton_dtype(dtype), BLOCK=ELEMENTS_PER_PROGRAM,
                                   num_warps=ELEMENT_WARPS)


def muon_stack_(momenta: list[torch.Tensor], grads: list[torch.Tensor], stack: torch.Tensor, momentum: float,
                nesterov: bool) -> torch.Tensor:
    """Muon's element-wise work for n same-shape, same-dtype matrices in one pass: m <- lerp(m, g, 1 - momentum)
    in place, and the update u = lerp(g, m, momentum) (nesterov) or m, rounded to bf16, into the window
    stack[i, :rows, :cols] of a bf16 stack [n, R >= rows, C >= cols]. Returns each u's sum of squares (fp32)."""
    grid, tensor, start, first, counts, numel = _elementwise_launch(momenta)
    partials = torch.empty(grid[0], dtype=torch.float32, device=stack.device)
    _muon_stack_kernel[grid](_addresses(momenta), _addresses(grads), stack, partials, tensor, start, numel,
                             momenta[0].size(1), stack.stride(0), stack.stride(1), 1 - momentum, momentum,
                             DTYPE=triton_dtype(momenta[0].dtype), NESTEROV=nesterov, BLOCK=ELEMENTS_PER_PROGRAM,
                             num_warps=ELEMENT_WARPS)
    return _segment_sums(partials, first, counts)


def divide_stack_(stack: torch.Tensor, divisors: torch.Tensor) -> None:
    """stack[i] <- stack[i] / divisors[i] for a contiguous bf16 stack and fp32 divisors, rounded as torch's
    bf16 division (correctly rounded fp32 quotient, then bf16)."""
    total = stack.numel()
    _divide_stack_kernel[(triton.cdiv(total, ELEMENTS_PER_PROGRAM),)](
        stack, divisors, stack[0].numel(), total, BLOCK=ELEMENTS_PER_PROGRAM, num_warps=ELEMENT_WARPS)
