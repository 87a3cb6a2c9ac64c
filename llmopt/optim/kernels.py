"""Triton kernels for the optimizer steps whose eager form is launch- or pass-bound.

Each kernel covers a whole list of tensors in one launch: their addresses sit in a device table and
every program looks up which tensor, and which rows or elements of it, it owns (the multi-tensor
scheme of apex and torch's foreach kernels). All arithmetic is in fp32; values are rounded to the
tensors' dtype where the eager code rounds them, so a kernel's result equals the eager one within one
rounding of the last bit (tests/test_kernels.py).

  row_normalized_update_   SCALE: p <- p * decay - lr * d / RMS_row(d), one pass (a row stays on chip)
  lerp_sumsq_              SGD-LL pass 1: m <- lerp(m, g, w) and sum(m^2) per tensor (deterministic)
  scaled_sub_              SGD-LL pass 2: p <- p - lr * factor[i] * u_i, factor a device vector
  ema_momentum_            EMA-Nesterov: m <- gamma m + (1 - gamma)(p - prev); prev <- p, one pass

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
# launch shapes, measured on an H100 (scripts/bench_optim.py; benchmarks/RESULTS.md)
ELEMENTS_PER_PROGRAM, ELEMENT_WARPS = 2048, 4      # element-wise kernels
ROW_ELEMENTS_PER_PROGRAM, ROW_WARPS = 2048, 8      # row kernel: rows per program = this // padded row length
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
    # per step, for every tensor of a group: kept to the cheapest checks (a set of dtypes, of devices)
    return ({t.dtype for t in tensors} <= set(_TRITON_DTYPES) and {t.device for t in tensors} == {device}
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


def _triton_dtype(dtype: torch.dtype):
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
    dtypes = {}
    for i, t in enumerate(lists[0]):
        dtypes.setdefault(t.dtype, []).append(i)
    return [(dtype, [[lst[i] for i in idx] for lst in lists], idx) for dtype, idx in dtypes.items()]


if triton is not None:

    @triton.jit
    def _round(x, DTYPE: tl.constexpr):
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
    def _element_block(block_tensor, block_start, numel_of, BLOCK: tl.constexpr):
        """The element-wise kernels' program: its tensor, element offsets and mask."""
        t = tl.load(block_tensor + tl.program_id(0))
        offsets = tl.load(block_start + tl.program_id(0)) + tl.arange(0, BLOCK)
        return t, offsets, offsets < tl.load(numel_of + t)

    @triton.jit
    def _row_update_kernel(p_addrs, d_addrs, block_tensor, block_row, rows_of, n_cols, lr, decay, sqrt_cols,
                           DTYPE: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr, DECAY: tl.constexpr):
        pid = tl.program_id(0)
        t = tl.load(block_tensor + pid)
        rows = tl.load(block_row + pid) + tl.arange(0, ROWS)
        cols = tl.arange(0, BLOCK)
        mask = (rows[:, None] < tl.load(rows_of + t)) & (cols[None, :] < n_cols)
        offsets = rows[:, None].to(tl.int64) * n_cols + cols[None, :]
        _, d = _load(d_addrs, t, offsets, mask, DTYPE)
        p_ptr, p = _load(p_addrs, t, offsets, mask, DTYPE)  # issued before the reduction waits
        # as the eager code: the row norm and the RMS are tensors of the parameter dtype, floored at 1e-8
        norm = _round(tl.sqrt(tl.sum(d * d, axis=1)), DTYPE).to(tl.float32)
        rms = tl.maximum(_round(norm / sqrt_cols, DTYPE).to(tl.float32), 1e-8)
        if DECAY:
            p = _round(p * decay, DTYPE).to(tl.float32)
        tl.store(p_ptr + offsets, _round(p + (-lr) * (d / rms[:, None]), DTYPE), mask=mask)

    @triton.jit
    def _lerp_sumsq_kernel(m_addrs, g_addrs, partials, block_tensor, block_start, numel_of, weight,
                           DTYPE: tl.constexpr, BLOCK: tl.constexpr):
        t, offsets, mask = _element_block(block_tensor, block_start, numel_of, BLOCK)
        m_ptr, m = _load(m_addrs, t, offsets, mask, DTYPE)
        _, g = _load(g_addrs, t, offsets, mask, DTYPE)
        # torch.lerp's two-sided formula
        m = _round(tl.where(weight < 0.5, m + weight * (g - m), g - (g - m) * (1.0 - weight)), DTYPE)
        tl.store(m_ptr + offsets, m, mask=mask)
        m = m.to(tl.float32)
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
    def _scaled_sub_kernel(p_addrs, u_addrs, factors, block_tensor, block_start, numel_of, lr,
                           DTYPE: tl.constexpr, BLOCK: tl.constexpr):
        t, offsets, mask = _element_block(block_tensor, block_start, numel_of, BLOCK)
        factor = _round(tl.load(factors + t), DTYPE).to(tl.float32)  # eager: the factor in the parameter dtype
        p_ptr, p = _load(p_addrs, t, offsets, mask, DTYPE)
        _, u = _load(u_addrs, t, offsets, mask, DTYPE)
        tl.store(p_ptr + offsets, _round(p + (-lr) * u * factor, DTYPE), mask=mask)

    @triton.jit
    def _ema_momentum_kernel(m_addrs, prev_addrs, p_addrs, block_tensor, block_start, numel_of, gamma,
                             DTYPE: tl.constexpr, BLOCK: tl.constexpr):
        t, offsets, mask = _element_block(block_tensor, block_start, numel_of, BLOCK)
        _, p = _load(p_addrs, t, offsets, mask, DTYPE)
        prev_ptr, prev = _load(prev_addrs, t, offsets, mask, DTYPE)
        m_ptr, m = _load(m_addrs, t, offsets, mask, DTYPE)
        tl.store(m_ptr + offsets, _round(gamma * m + (1.0 - gamma) * (p - prev), DTYPE), mask=mask)
        tl.store(prev_ptr + offsets, p.to(DTYPE), mask=mask)  # exact: p was a DTYPE value


def _elementwise_launch(tensors: list[torch.Tensor]):
    """Grid and tables for an element-wise kernel over `tensors` (one dtype)."""
    sizes = tuple(t.numel() for t in tensors)
    tensor, start, first, counts = _block_table(sizes, ELEMENTS_PER_PROGRAM, tensors[0].device)
    numel = device_tensor(sizes, torch.int64, tensors[0].device)
    return (len(tensor),), tensor, start, first, counts, numel


def row_normalized_update_(params: list[torch.Tensor], directions: list[torch.Tensor], lr: float,
                           decay: float = 1.0) -> None:
    """p <- p * decay - lr * d / max(RMS(d row), 1e-8) for 2-D tensors, every row normalized over its
    columns (SCALE's "column" normalization of an nn.Linear weight). Rows must be at most MAX_ROW long."""
    for dtype, (ps, ds), _ in _by_dtype(params, directions):
        by_cols: dict[int, list[int]] = {}
        for i, p in enumerate(ps):
            by_cols.setdefault(p.size(1), []).append(i)
        for n_cols, idx in by_cols.items():
            block = triton.next_power_of_2(n_cols)
            rows_per_program = max(1, ROW_ELEMENTS_PER_PROGRAM // block)
            group_p, group_d = [ps[i] for i in idx], [ds[i] for i in idx]
            tensor, row, _, _ = _block_table(tuple(p.size(0) for p in group_p), rows_per_program, group_p[0].device)
            rows_of = device_tensor(tuple(p.size(0) for p in group_p), torch.int32, tensor.device)
            _row_update_kernel[(len(tensor),)](
                _addresses(group_p), _addresses(group_d), tensor, row, rows_of, n_cols, lr, decay,
                float(n_cols) ** 0.5, DTYPE=_triton_dtype(dtype), ROWS=rows_per_program, BLOCK=block,
                DECAY=decay != 1.0,
                num_warps=min(32, ROW_WARPS * max(1, block * rows_per_program // ROW_ELEMENTS_PER_PROGRAM)))


def lerp_sumsq_(momenta: list[torch.Tensor], grads: list[torch.Tensor], weight: float) -> torch.Tensor:
    """m <- lerp(m, g, weight) for every pair; returns sum(m^2) of each new m (fp32, in list order)."""
    sums = None
    for dtype, (ms, gs), idx in _by_dtype(momenta, grads):
        grid, tensor, start, first, counts, numel = _elementwise_launch(ms)
        partials = torch.empty(grid[0], dtype=torch.float32, device=ms[0].device)
        _lerp_sumsq_kernel[grid](_addresses(ms), _addresses(gs), partials, tensor, start, numel, weight,
                                 DTYPE=_triton_dtype(dtype), BLOCK=ELEMENTS_PER_PROGRAM, num_warps=ELEMENT_WARPS)
        out = torch.empty(len(ms), dtype=torch.float32, device=ms[0].device)
        _segment_sum_kernel[(len(ms),)](partials, first, counts, out, BLOCK=1024, num_warps=4)
        if len(idx) == len(momenta):
            return out
        if sums is None:  # several dtypes: gather each one's sums into list order
            sums = torch.empty(len(momenta), dtype=torch.float32, device=out.device)
        sums[device_tensor(tuple(idx), torch.int64, out.device)] = out
    return sums


def scaled_sub_(params: list[torch.Tensor], updates: list[torch.Tensor], factors: torch.Tensor,
                lr: float) -> None:
    """p_i <- p_i - lr * factors[i] * u_i for every i; `factors` a device vector (fp32)."""
    for dtype, (ps, us), idx in _by_dtype(params, updates):
        grid, tensor, start, _, _, numel = _elementwise_launch(ps)
        group_factors = factors if len(idx) == len(params) else factors[device_tensor(tuple(idx), torch.int64,
                                                                                      factors.device)]
        group_factors = group_factors.float().contiguous()
        _scaled_sub_kernel[grid](_addresses(ps), _addresses(us), group_factors, tensor, start, numel, lr,
                                 DTYPE=_triton_dtype(dtype), BLOCK=ELEMENTS_PER_PROGRAM, num_warps=ELEMENT_WARPS)


def ema_momentum_(momenta: list[torch.Tensor], prev: list[torch.Tensor], params: list[torch.Tensor],
                  gamma: float) -> None:
    """m <- gamma m + (1 - gamma)(p - prev); prev <- p, in one pass over the three lists."""
    for dtype, (ms, prevs, ps), _ in _by_dtype(momenta, prev, params):
        grid, tensor, start, _, _, numel = _elementwise_launch(ps)
        _ema_momentum_kernel[grid](_addresses(ms), _addresses(prevs), _addresses(ps), tensor, start, numel,
                                   gamma, DTYPE=_triton_dtype(dtype), BLOCK=ELEMENTS_PER_PROGRAM,
                                   num_warps=ELEMENT_WARPS)
