"""What every Triton kernel of llmopt shares: the Triton import and its interpreter switch, whether the kernels can
run on given tensors, the launch shapes by device kind, the tensors' address tables and alignment, and the Triton
helpers the kernels call (rounding to a dtype, loads, tiles, torch.lerp's formula, per-tensor sums).

A kernel over a list of tensors launches once per size (shape, for the row kernels): the tensors'
addresses sit in a device table (the multi-tensor scheme of apex and torch's foreach kernels), and since
a launch's tensors are all alike, a program finds its tensor and block from its index alone, with no
per-block table to read before its data (measured on an H200: benchmarks/RESULTS.md). Where the tensors (and,
for the row kernels, their rows) start on 16-byte boundaries, the kernels say so (ALIGNED) and load 16 bytes per
instruction; an address read from a table carries no alignment the compiler could see. All arithmetic is
in fp32; values are rounded to the tensors' dtype where the eager code rounds them, so a kernel's result
equals the eager one within one rounding of the last bit (tests/kernels/test_kernels.py).

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
MAX_ROW = 16384  # longest row the row kernel keeps on chip; longer rows take the eager path
# Launch shapes by device kind, from launch sweeps (scripts/bench_optim.py --launch; benchmarks/RESULTS.md). The
# "default" entry was measured on an H100; a GPU whose name contains another key would take that entry's values over
# it (none needed so far: on an H200, with vector loads, no other shape measured faster; the H200 entry that element
# loads needed was removed, its 512-element blocks now slower: SGD-LL 92% of its floor against 100%).
#   element-wise kernels: ELEMENTS_PER_PROGRAM, ELEMENT_WARPS; EMA-Nesterov's (three tensors read, two written)
#   its own pair (with element loads, the H200 preferred other shapes for it than for SGD-LL's kernels)
#   row kernels: rows per program = ROW_ELEMENTS_PER_PROGRAM // padded row length; ROW_WARPS for rows padded to at
#   most LONG_ROW elements, LONG_ROW_WARPS beyond (H100, element loads, 1B and 7B shapes, bf16: 2048-wide rows 77%
#   of the floor against 71-74% with 8 warps; 4096-wide 81% against 77% with 16; 5461-wide 66-72% against 45% with
#   16; on an H200 neither two tiles per long row nor a two-pass sweep in chunks was faster than one padded tile)
# H200, 1B bf16, vector loads, these shapes (2026-12-03): SCALE 93% of its floor, SGD-LL 100%, EMA-Nesterov's own
# work 94%; SCALE's 5461-wide rows (2 bytes off alignment: element loads) stay at 68%
LAUNCH_SHAPES = {
    "default": {"ELEMENTS_PER_PROGRAM": 2048, "ELEMENT_WARPS": 4, "EMA_ELEMENTS_PER_PROGRAM": 2048,
                "EMA_ELEMENT_WARPS": 4, "ROW_ELEMENTS_PER_PROGRAM": 2048, "ROW_WARPS": 4, "LONG_ROW": 4096,
                "LONG_ROW_WARPS": 32},
}
LAUNCH_CONSTANTS = tuple(LAUNCH_SHAPES["default"])
# set by a launch sweep or a test, over the table for every device (each a power of two)
launch_overrides: dict[str, int] = {}
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


@functools.lru_cache(maxsize=1024)  # a step's tables: per launch an address table per list, and a few more
def device_tensor(values: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small constant tensor on `device`, uploaded once per distinct value (never modify it). The upload
    goes through pinned memory: a copy from pageable memory would wait for all queued GPU work first."""
    host = torch.tensor(values, dtype=dtype)
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


VECTOR_BYTES = 16  # a GPU thread's widest load: 8 bf16 or 4 fp32 values in one instruction


@functools.lru_cache(maxsize=1024)
def _all_aligned(pointers: tuple[int, ...]) -> bool:
    return all(pointer % VECTOR_BYTES == 0 for pointer in pointers)


def _addresses(tensors: list[torch.Tensor]) -> tuple[torch.Tensor, bool]:
    """The tensors' data pointers as a device table (cached: a model's parameters and states stay put), and whether
    every one starts on a VECTOR_BYTES boundary. If they do, the kernels tell Triton so (ALIGNED) and it issues
    vector loads: a pointer read from a table carries no alignment Triton can see, and without the hint every
    element is a load of its own. The row kernels also need each row to start on one (rows_aligned)."""
    pointers = tuple(t.data_ptr() for t in tensors)
    return device_tensor(pointers, torch.int64, tensors[0].device), _all_aligned(pointers)


def rows_aligned(n_cols: int, dtype: torch.dtype) -> bool:
    """Whether rows of n_cols elements of `dtype` each start on a VECTOR_BYTES boundary (in an aligned tensor)."""
    return n_cols * dtype.itemsize % VECTOR_BYTES == 0


def check_launch_constants(names) -> None:
    """The one error for names that are not launch constants (a sweep's or a test's overrides)."""
    unknown = [name for name in names if name not in LAUNCH_SHAPES["default"]]
    if unknown:
        raise ValueError(f"unknown launch constants {unknown}; known: {', '.join(LAUNCH_CONSTANTS)}")


def launch_shape(device: torch.device) -> dict[str, int]:
    """The launch constants for tensors on `device`: its kind's LAUNCH_SHAPES, launch_overrides over them."""
    if launch_overrides:
        check_launch_constants(launch_overrides)
    return {**_device_shape(device), **launch_overrides}


def shape_for_device(name: str) -> dict[str, int]:
    """LAUNCH_SHAPES for a device of this name (torch.cuda.get_device_name): the default entry, with that of every
    other key the name contains over it."""
    shape = dict(LAUNCH_SHAPES["default"])
    for kind, values in LAUNCH_SHAPES.items():
        if kind != "default" and kind in name:
            shape.update(values)
    return shape


@functools.lru_cache(maxsize=16)
def _device_shape(device: torch.device) -> dict[str, int]:
    return shape_for_device(torch.cuda.get_device_name(device) if device.type == "cuda" else device.type)


@functools.lru_cache(maxsize=64)
def _indices_by(keys: tuple) -> dict:
    """For each distinct key (first-seen order), the indices where it occurs (cached: a model's shapes never change)."""
    out: dict = {}
    for i, key in enumerate(keys):
        out.setdefault(key, []).append(i)
    return {key: tuple(idx) for key, idx in out.items()}


@functools.lru_cache(maxsize=64)
def _element_layout(sizes: tuple[int, ...], per_block: int, device: torch.device):
    """The element-wise kernels' launches over tensors of `sizes` elements in blocks of `per_block`: one launch
    per group of equal size, so that a program finds its tensor and block from its index alone (tensor = program
    // blocks per tensor) and reads no table before the data. Returns the groups, each (its tensors' list indices
    and their index table on the device, elements per tensor, blocks per tensor, its first block in a buffer of
    per-block partial results laid out group after group), empty tensors left out; that buffer's length; and per
    tensor, in list order, its first block there and its block count (device tensors, for the segment sums)."""
    groups, first, counts, offset = [], [0] * len(sizes), [0] * len(sizes), 0
    for numel, idx in _indices_by(sizes).items():
        blocks = -(-numel // per_block)
        if blocks:
            groups.append((idx, device_tensor(idx, torch.int32, device), numel, blocks, offset))
        for j, i in enumerate(idx):
            first[i], counts[i] = offset + j * blocks, blocks
        offset += blocks * len(idx)
    return (groups, offset, device_tensor(tuple(first), torch.int64, device),
            device_tensor(tuple(counts), torch.int32, device))


def _element_groups(tensors: list[torch.Tensor], per_block: int):
    """_element_layout for an element-wise kernel over `tensors` in blocks of `per_block` elements."""
    return _element_layout(tuple(t.numel() for t in tensors), per_block, tensors[0].device)


def _addresses_at(idx: tuple[int, ...], *lists: list[torch.Tensor]) -> tuple[list[torch.Tensor], bool]:
    """For each list, the address table of its tensors at `idx`; and whether all those tensors are aligned."""
    tables, aligned = zip(*(_addresses([tensors[i] for i in idx]) for tensors in lists))
    return list(tables), all(aligned)


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
    _INTERPRETING = tl.constexpr(INTERPRET)
    _VECTOR_BYTES = tl.constexpr(VECTOR_BYTES)

    @triton.jit
    def round_nearest(x, DTYPE: tl.constexpr):
        """fp32 -> DTYPE, rounding to nearest even: the GPU's own conversion does (one instruction per two values),
        Triton's interpreter (the CPU tests) truncates to bf16, so there it is spelled out."""
        if _INTERPRETING and DTYPE == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            x = bits.to(tl.float32, bitcast=True)
        return x.to(DTYPE)

    @triton.jit
    def _load(addrs, t, offsets, mask, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
        """Tensor t's pointers at `offsets` (its address from a table) and its values there, in fp32. ALIGNED: the
        tensor and the tile's rows start on VECTOR_BYTES boundaries (see _addresses), so Triton may load vectors."""
        ptrs = tl.load(addrs + t).to(tl.pointer_type(DTYPE)) + offsets
        if ALIGNED and len(ptrs.shape) == 2:  # a row tile: every row starts aligned too
            ptrs = tl.multiple_of(ptrs, [_VECTOR_BYTES, _VECTOR_BYTES])
        elif ALIGNED:
            ptrs = tl.multiple_of(ptrs, _VECTOR_BYTES)
        return ptrs, tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)

    @triton.jit
    def _lerp(start, end, weight):
        """torch.lerp's two-sided formula, in fp32."""
        return tl.where(weight < 0.5, start + weight * (end - start), end - (end - start) * (1.0 - weight))

    @triton.jit
    def _momentum_update(m_addrs, g_addrs, t, offsets, mask, weight, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
        """m <- lerp(m, g, weight) at tensor t's `offsets`, stored; returns the new m and g in fp32."""
        m_ptrs, m = _load(m_addrs, t, offsets, mask, DTYPE, ALIGNED)
        _, g = _load(g_addrs, t, offsets, mask, DTYPE, ALIGNED)
        m = round_nearest(_lerp(m, g, weight), DTYPE)
        tl.store(m_ptrs, m, mask=mask)
        return m.to(tl.float32), g

    @triton.jit
    def _flat_block(total, BLOCK: tl.constexpr):
        """A one-tensor element-wise kernel's program: its element offsets and mask."""
        offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        return offsets, offsets < total

    @triton.jit
    def _element_block(numel, blocks_per_tensor, BLOCK: tl.constexpr):
        """The element-wise kernels' program: its tensor (in a group of equal numel), element offsets and mask."""
        pid = tl.program_id(0)
        t = pid // blocks_per_tensor
        offsets = (pid - t * blocks_per_tensor).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        return t, offsets, offsets < numel

    @triton.jit
    def _row_tile(block, n_rows, n_cols, ROWS: tl.constexpr, BLOCK: tl.constexpr):
        """The row kernels' program: block `block` of ROWS rows of an [n_rows, n_cols] tensor (BLOCK >= n_cols),
        its rows, element offsets and mask."""
        rows = block * ROWS + tl.arange(0, ROWS)
        cols = tl.arange(0, BLOCK)
        mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
        return rows, rows[:, None].to(tl.int64) * n_cols + cols[None, :], mask

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


def _row_launch(n_cols: int, shape: dict[str, int]) -> tuple[int, int, int]:
    """The row kernels' tile for rows of n_cols: padded row length, rows per program, warps."""
    block = triton.next_power_of_2(n_cols)
    rows_per_program = max(1, shape["ROW_ELEMENTS_PER_PROGRAM"] // block)
    warps = shape["ROW_WARPS"] if block <= shape["LONG_ROW"] else shape["LONG_ROW_WARPS"]
    return block, rows_per_program, warps


def _segment_sums(partials: torch.Tensor, first: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Each tensor's sum of its blocks' partial sums (fp32), in a fixed order."""
    out = torch.empty(len(counts), dtype=torch.float32, device=partials.device)
    _segment_sum_kernel[(len(counts),)](partials, first, counts, out, BLOCK=1024, num_warps=4)
    return out
