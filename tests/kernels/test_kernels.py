"""The Triton kernels of llmopt/kernels/ and the optimizers' fused paths.

On a machine without CUDA the kernels run on CPU tensors under Triton's interpreter (conftest.py sets
TRITON_INTERPRET=1 there); with CUDA every test also runs on the GPU. Three layers:
  - each kernel against its formula evaluated in float64 in the test (fp32 tensors), and against the
    eager code's rounding (bf16 tensors: within one unit in the last place);
  - SCALE, SGD-LL and EMA-Nesterov with fused=True against the float64 references of
    test_optim_reference.py over several steps (parameters and state), fed identical gradients;
  - fused=True against fused=False on bf16 parameters, and the errors of fused=True where it cannot run;
  - Muon's kernels against torch's own operations bit for bit (the stack Newton-Schulz starts from).
"""

from __future__ import annotations

import copy
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llmopt.kernels import clipped, common, ema, rows
from llmopt.kernels import muon as muon_kernels
from llmopt.model import build_model, llama_config
from llmopt.optim.ema_nesterov import EMANesterov
from llmopt.optim.muon import BatchedMuon, MuonWithAdamW, padded_stack
from llmopt.optim.scale import SCALE
from llmopt.optim.sgd_ll import SGDLL
from tests.helpers import gpu_compile
from tests.optim.test_optim_reference import (
    FACTORS,
    RefEMANesterov,
    RefSCALE,
    RefSGDLL,
    assert_close,
    ema_momentum_error,
    role_groups,
    role_of_names,
    set_lrs,
)

DEVICES = (["cpu"] if common.INTERPRET else []) + (["cuda"] if torch.cuda.is_available() else [])


def test_kernels_can_run_here():
    """Not a skip in disguise: every machine that runs the suite runs the kernels somewhere."""
    assert common.triton is not None, "triton is not installed: pip install -e '.[dev]' installs it"
    assert DEVICES, "neither CUDA nor TRITON_INTERPRET=1 (tests/conftest.py sets it on CPU machines)"


def test_kernels_compile_for_the_gpu():
    """Every kernel, each dtype and launch variant the code uses, through Triton's compiler to sm_90 machine code
    (tests/helpers/gpu_compile.py, in a subprocess without the interpreter): code that the interpreter runs but the
    compiler refuses fails here, also on a machine without a GPU. The kernels that read their tensors' addresses from a
    table load vectors when told the tensors are aligned (ALIGNED), single elements when not."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-m", "tests.helpers.gpu_compile"], cwd=Path(__file__).parents[2], env=env,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    lines = [line for line in result.stdout.splitlines() if line.endswith(": ok")]
    assert {line.split()[0] for line in lines} == set(gpu_compile.SPECS), lines
    # the alignment hint: a kernel reading its tensors' addresses from a table issues vector loads only with it
    for line in lines:
        if "'ALIGNED': True" in line:
            assert line.endswith("vector: ok"), line
        if "'ALIGNED': False" in line:
            assert line.endswith("scalar: ok"), line
    assert sum("'ALIGNED': False" in line for line in lines) >= 2


def test_launch_shapes_by_device_kind(monkeypatch):
    """The launch table: a GPU takes its kind's entry over the default (measured on an H100), matched by name;
    launch_overrides (a launch sweep, a test) win on every device."""
    default = common.LAUNCH_SHAPES["default"]
    assert set(default) == set(common.LAUNCH_CONSTANTS)
    assert common.shape_for_device("NVIDIA H100 80GB HBM3") == default
    for kind, values in common.LAUNCH_SHAPES.items():  # the committed entries only name known constants
        assert set(values) <= set(default), kind
    # a kind's entry over the default, for every device whose name contains the key (a table entry made here, so
    # that the rule is tested whichever kinds the committed table holds)
    monkeypatch.setitem(common.LAUNCH_SHAPES, "H200", {"ELEMENTS_PER_PROGRAM": 512, "ROW_WARPS": 2})
    h200 = common.shape_for_device("NVIDIA H200")
    assert h200 == {**default, "ELEMENTS_PER_PROGRAM": 512, "ROW_WARPS": 2} and h200 != default
    assert common.shape_for_device("NVIDIA GH200 480GB") == h200
    assert common.shape_for_device("NVIDIA H100 80GB HBM3") == default
    assert common.launch_shape(torch.device("cpu")) == default
    monkeypatch.setitem(common.launch_overrides, "ROW_WARPS", 1)
    assert common.launch_shape(torch.device("cpu")) == {**default, "ROW_WARPS": 1}
    monkeypatch.setitem(common.launch_overrides, "ROW_WARP", 2)
    with pytest.raises(ValueError, match=r"unknown launch constants \['ROW_WARP'\]; known: .*ROW_WARPS"):
        common.launch_shape(torch.device("cpu"))


def mantissa_bits(dtype):
    return {torch.float32: 23, torch.bfloat16: 7, torch.float16: 10}[dtype]


def within_ulps(actual, expected, what, ulps=1, floor=1e-30):
    """|actual - expected| <= ulps units in the last place of the larger of the two, counted at no less
    than `floor` (results near zero by cancellation carry the absolute error of their operands)."""
    bits = {torch.float32: 23, torch.bfloat16: 7, torch.float16: 10}[expected.dtype]
    magnitude = torch.maximum(expected.double().abs(), actual.double().abs()).clamp_min(floor)
    unit = torch.pow(2.0, torch.floor(torch.log2(magnitude)) - bits)
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)}, expected {tuple(expected.shape)}"
    worst = ((actual.double() - expected.double()).abs() / (ulps * unit)).max().item() if actual.numel() else 0.0
    assert worst <= 1.0, f"{what}: {worst * ulps:.2f} units in the last place apart (allowed {ulps})"


def tensors(shapes, dtype, device, seed, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(s, generator=gen, dtype=torch.float64) * scale).to(dtype).to(device) for s in shapes]


# shapes that cover: several shapes in one call (one launch each) with a shape that recurs between others (a
# launch's program -> tensor mapping, results in list order), rows not a power of two, a partial last row block, a
# single row, elements spanning several element blocks with a partial last one, an empty tensor
ROW_SHAPES = [(300, 37), (5, 130), (1, 37), (64, 64), (300, 37), (9, 4100), (5, 130)]
FLAT_SHAPES = [(3, 4097), (10,), (64, 64), (1,), (10,), (2, 9000), (0,), (64, 64)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("decay", [1.0, 0.99])
def test_row_normalized_update_fp32_matches_float64_formula(device, decay):
    params = tensors(ROW_SHAPES, torch.float32, device, 0)
    directions = tensors(ROW_SHAPES, torch.float32, device, 1, scale=1e-3)
    # one all-zero row: its RMS is floored at 1e-8, so it is left alone
    directions[0][3].zero_()
    expected = []
    for p, d in zip(params, directions):
        p64, d64 = p.double(), d.double()
        rms = d64.pow(2).mean(dim=1, keepdim=True).sqrt().clamp_min(1e-8)
        expected.append(p64 * decay - 0.01 * d64 / rms)
    rows.row_normalized_update_(params, directions, lr=0.01, decay=decay)
    for i, (p, e) in enumerate(zip(params, expected)):
        assert p.dtype == torch.float32 and p.device.type == device
        assert_close(p.cpu(), e.cpu(), f"tensor {i} {tuple(p.shape)}", tol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_row_normalized_update_bf16_matches_eager_rounding(device):
    params = tensors(ROW_SHAPES, torch.bfloat16, device, 2)
    directions = tensors(ROW_SHAPES, torch.bfloat16, device, 3, scale=1e-2)
    eager = [p.clone() for p in params]
    for p, d in zip(eager, directions):  # SCALE's eager code for decay 0.9: mul_, then addcdiv_ by the rms
        p.mul_(0.9)
        p.addcdiv_(d, torch.linalg.vector_norm(d, dim=1, keepdim=True).div_(math.sqrt(d.size(1))).clamp_min_(1e-8),
                   value=-0.1)
    rows.row_normalized_update_(params, directions, lr=0.1, decay=0.9)
    for i, (p, e) in enumerate(zip(params, eager)):
        assert p.dtype == torch.bfloat16
        within_ulps(p.cpu(), e.cpu(), f"tensor {i} {tuple(p.shape)}", ulps=1)
        assert not torch.equal(p.cpu(), tensors(ROW_SHAPES, torch.bfloat16, "cpu", 2)[i]), "nothing was written"


def record_launches(monkeypatch, module, name: str, what) -> list:
    """Kernel `name` of `module` (one of llmopt.kernels) still launched, with what(grid, keyword arguments) of each
    launch appended to the list returned."""
    kernel, launches = getattr(module, name), []

    class Recorded:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launches.append(what(grid, kwargs))
                return kernel[grid](*args, **kwargs)
            return launch
    monkeypatch.setattr(module, name, Recorded())
    return launches


@pytest.mark.parametrize("device", DEVICES)
# both branches of torch.lerp's formula; blocks of 16: the largest tensor spans more than 1024 blocks, so the segment
# sum loops (one case is enough: under the CPU's interpreter each block is a Python call)
@pytest.mark.parametrize("weight, block", [(0.1, 16), (0.7, 2048)])
def test_lerp_sumsq_matches_lerp_and_norms(device, weight, block, monkeypatch):
    monkeypatch.setitem(common.launch_overrides, "ELEMENTS_PER_PROGRAM", block)
    # the launches' grids and blocks, to see that the override reaches them
    launches = record_launches(monkeypatch, clipped, "_lerp_sumsq_kernel",
                               lambda grid, kwargs: (grid[0], kwargs["BLOCK"]))
    momenta = tensors(FLAT_SHAPES, torch.float32, device, 4)
    grads = tensors(FLAT_SHAPES, torch.float32, device, 5)
    expected = [m.double() + weight * (g.double() - m.double()) for m, g in zip(momenta, grads)]
    originals = [m.clone() for m in momenta]
    sums = clipped.lerp_sumsq_(momenta, grads, weight)
    # one launch per distinct non-empty size, together one program per `block` elements of each tensor
    assert len(launches) == len({math.prod(s) for s in FLAT_SHAPES} - {0}) and {b for _, b in launches} == {block}
    assert sum(n for n, _ in launches) == sum(-(-math.prod(s) // block) for s in FLAT_SHAPES)
    assert sums.shape == (len(FLAT_SHAPES),) and sums.dtype == torch.float32
    for i, (m, e) in enumerate(zip(momenta, expected)):
        torch.testing.assert_close(m.cpu(), e.float().cpu(), rtol=1e-6, atol=1e-6, msg=f"momentum {i}")
        assert sums[i].item() == pytest.approx(m.double().pow(2).sum().item(), rel=1e-5), f"sum of squares {i}"
    again = clipped.lerp_sumsq_(originals, grads, weight)
    assert torch.equal(again, sums) and all(torch.equal(a, m) for a, m in zip(originals, momenta)), \
        "the sums must be reproducible (no atomics)"


@pytest.mark.parametrize("device", DEVICES)
def test_lerp_sumsq_bf16_and_mixed_dtypes(device):
    shapes = FLAT_SHAPES[:3]
    momenta = tensors(shapes, torch.bfloat16, device, 6) + tensors(shapes[:1], torch.float32, device, 7)
    grads = tensors(shapes, torch.bfloat16, device, 8) + tensors(shapes[:1], torch.float32, device, 9)
    eager = [m.clone() for m in momenta]
    torch._foreach_lerp_(eager, grads, 0.1)
    sums = clipped.lerp_sumsq_(momenta, grads, 0.1)
    for i, (m, e) in enumerate(zip(momenta, eager)):
        assert m.dtype == e.dtype
        # operands O(1): fp32's absolute error near zero is that of O(1) values
        within_ulps(m.cpu(), e.cpu(), f"momentum {i} ({m.dtype})", ulps=1,
                    floor=1.0 if m.dtype == torch.float32 else 1e-2)
        assert sums[i].item() == pytest.approx(m.double().pow(2).sum().item(), rel=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_scaled_sub(device, dtype):
    params = tensors(FLAT_SHAPES, dtype, device, 10)
    updates = tensors(FLAT_SHAPES, dtype, device, 11)
    factors = torch.tensor([1.0, 0.25, 0.5, 1.0, 0.125, 0.03125, 2.0, 0.0625], device=device)  # exact products
    eager = [p.clone() for p in params]
    for p, u, f in zip(eager, updates, factors.to(dtype).unbind()):
        p.addcmul_(u, f, value=-0.5)
    clipped.scaled_sub_(params, updates, factors, lr=0.5)
    for i, (p, e) in enumerate(zip(params, eager)):
        within_ulps(p.cpu(), e.cpu(), f"param {i}", ulps=1, floor=1e-2)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_scaled_sub_rounds_its_factors_as_eager(device, dtype):
    """From p = 0 the update is one product, exact in fp32 for bf16 operands, then one rounding: the kernels must
    equal the eager `addcmul_` bit for bit, which holds only if they round the factors (and the output layer's
    row-scaled update) to the parameters' dtype where the eager code does. Factors that are not powers of two."""
    shapes = [(64, 64), (10,), (64, 64)]
    updates = tensors(shapes, dtype, device, 17)
    factors = torch.tensor([0.3, 0.7, 0.9], device=device)
    params = [torch.zeros(s, dtype=dtype, device=device) for s in shapes]
    clipped.scaled_sub_(params, updates, factors, lr=0.5)
    for i, (p, u) in enumerate(zip(params, updates)):
        expected = torch.zeros_like(p).addcmul_(u, factors[i].to(dtype), value=-0.5)
        assert torch.equal(p, expected), f"param {i} ({dtype})"
    (update,) = tensors([(300, 37)], dtype, device, 18)
    row_factors = torch.linspace(0.3, 0.9, 300, device=device).to(dtype)
    param = torch.zeros_like(update)
    clipped.scaled_sub_([param], [update], factors[:1], lr=0.5, row_factors=[row_factors])
    expected = torch.zeros_like(update).addcmul_(update * row_factors[:, None], factors[0].to(dtype), value=-0.5)
    assert torch.equal(param, expected), f"row-scaled ({dtype})"


@pytest.mark.parametrize("device", DEVICES)
def test_scaled_sub_mixed_dtypes(device):
    """bf16 and fp32 tensors in one list, interleaved (one launch per dtype and size): each takes its own factor."""
    shapes = [(64, 64), (10,), (64, 64), (3, 4097), (10,)]
    dtypes = [torch.bfloat16, torch.float32, torch.float32, torch.bfloat16, torch.bfloat16]
    params = [t.to(d) for t, d in zip(tensors(shapes, torch.float32, device, 15), dtypes)]
    updates = [t.to(d) for t, d in zip(tensors(shapes, torch.float32, device, 16), dtypes)]
    factors = torch.tensor([0.5, 0.25, 2.0, 0.125, 1.0], device=device)
    eager = [p.clone() for p in params]
    for p, u, f in zip(eager, updates, factors.unbind()):
        p.addcmul_(u, f.to(p.dtype), value=-0.5)
    clipped.scaled_sub_(params, updates, factors, lr=0.5)
    for i, (p, e) in enumerate(zip(params, eager)):
        assert p.dtype == dtypes[i]
        within_ulps(p.cpu(), e.cpu(), f"param {i} ({p.dtype})", ulps=1, floor=1e-2)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(300, 37), (9, 4100)])  # several rows per program; one long row each
def test_row_lerp_sumsq_and_row_scaled_sub(device, dtype, shape):
    """SGD-LL's output layer: the momentum update with each row's sum of squares, then
    p <- p - lr * f * round(m * row_factor) as the eager `m * factor.to(m.dtype)` and `addcmul_`."""
    (momentum,), (grad,), (param,) = (tensors([shape], dtype, device, seed) for seed in (20, 21, 22))
    eager_m = momentum.clone().lerp_(grad, 0.1)
    row_sq = clipped.row_lerp_sumsq_(momentum, grad, 0.1)
    within_ulps(momentum.cpu(), eager_m.cpu(), "momentum", floor=1.0 if dtype == torch.float32 else 1e-2)
    torch.testing.assert_close(row_sq.double().cpu(), momentum.double().pow(2).sum(dim=1).cpu(), rtol=1e-5, atol=0)
    row_factors = torch.linspace(0.25, 1.0, shape[0], device=device).to(dtype)
    factors = torch.tensor([0.5], device=device)
    eager_p = param.clone().addcmul_(momentum * row_factors[:, None], factors.to(dtype), value=-0.5)
    clipped.scaled_sub_([param], [momentum], factors, lr=0.5, row_factors=[row_factors])
    within_ulps(param.cpu(), eager_p.cpu(), "param", floor=1e-2)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("gamma", [0.9, 0.0])
def test_ema_momentum(device, gamma):
    momenta = tensors(FLAT_SHAPES, torch.float32, device, 12)
    prev = tensors(FLAT_SHAPES, torch.float32, device, 13)
    params = tensors(FLAT_SHAPES, torch.float32, device, 14)
    expected = [gamma * m.double() + (1 - gamma) * (p.double() - q.double()) for m, q, p in zip(momenta, prev, params)]
    ema.ema_momentum_(momenta, prev, params, gamma)
    for i, (m, q, p, e) in enumerate(zip(momenta, prev, params, expected)):
        assert_close(m.cpu(), e.cpu(), f"momentum {i}", tol=1e-6)
        assert torch.equal(q, p), f"prev {i} must hold the new parameters"


def views_at_odd_offsets(like: list[torch.Tensor]) -> list[torch.Tensor]:
    """Copies of `like` as views one element into a buffer each: not on a VECTOR_BYTES boundary."""
    out = []
    for t in like:
        buffer = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
        view = buffer[1:].view(t.shape)
        view.copy_(t)
        out.append(view)
    return out


@pytest.mark.parametrize("device", DEVICES)
def test_kernels_on_misaligned_tensors_match_aligned(device, monkeypatch):
    """Tensors that start off a VECTOR_BYTES boundary (views into a buffer) take the kernels' element-wise loads
    (on a GPU, a vector load there would fault) and give the values of aligned copies (within a unit in the last
    place: the sums' order may differ); so do rows whose length puts them off one (5461 bf16 columns, the 1B
    flavor's down projection). Alignment is decided per launch: with only the first shape's tensors off a boundary,
    the other shapes still load vectors, and the values are the same again."""
    shapes = [(6, 37), (3, 4097), (4, 64)]
    fresh = tensors(shapes, torch.bfloat16, device, 30)
    odd = views_at_odd_offsets(fresh)
    assert common._addresses(fresh)[1] and not common._addresses(fresh[:2] + odd[:1])[1]
    assert common.rows_aligned(2048, torch.bfloat16) and common.rows_aligned(4, torch.float32)
    assert not common.rows_aligned(5461, torch.bfloat16) and not common.rows_aligned(2, torch.float32)
    directions = tensors(shapes, torch.bfloat16, device, 31, scale=1e-2)
    grads = tensors(shapes, torch.bfloat16, device, 32, scale=1e-2)
    prev = tensors(shapes, torch.bfloat16, device, 33)
    launched_kernels = ((rows, "_row_update_kernel"), (clipped, "_scaled_sub_kernel"), (ema, "_ema_momentum_kernel"),
                        (clipped, "_lerp_sumsq_kernel"))
    flags = [record_launches(monkeypatch, module, name, lambda grid, kwargs: kwargs["ALIGNED"])
             for module, name in launched_kernels]
    calls = [
        lambda ps, ds, gs, qs: rows.row_normalized_update_(ps, ds, 0.1, decay=0.9, grads=gs, weight=0.2),
        lambda ps, ds, gs, qs: clipped.scaled_sub_(ps, ds, torch.linspace(0.5, 1, len(ps), device=device), 0.1),
        lambda ps, ds, gs, qs: ema.ema_momentum_(ds, qs, ps, 0.9),
        lambda ps, ds, gs, qs: clipped.lerp_sumsq_(ds, gs, 0.3),
    ]
    for i, call in enumerate(calls):
        aligned = [[t.clone() for t in ts] for ts in (fresh, directions, grads, prev)]
        launched = flags[i]
        launched.clear()
        out_aligned = call(*aligned)
        aligned_flags = list(launched)  # one launch per shape, in the lists' order
        # the element kernels load vectors for every shape; the row kernel for the 64-wide rows alone
        assert aligned_flags == ([False, False, True] if i == 0 else [True] * 3), (i, aligned_flags)
        # every tensor off a boundary; the first shape's tensors in every list; the first shape's in one list
        # (directions, which every call reads) alone
        for kind in ("all", "first shape", "one tensor"):
            launched.clear()
            misaligned = []
            for k, ts in enumerate((fresh, directions, grads, prev)):
                first = {"all": len(ts), "first shape": 1, "one tensor": int(k == 1)}[kind]  # how many are odd
                misaligned.append(views_at_odd_offsets(ts[:first]) + [t.clone() for t in ts[first:]])
            out_misaligned = call(*misaligned)
            assert launched == ([False] * 3 if kind == "all" else [False, *aligned_flags[1:]]), (i, kind, launched)
            # on a GPU the two may sum in different orders (Triton lays the tile out by the loads' width)
            if out_aligned is not None:
                torch.testing.assert_close(out_misaligned, out_aligned, rtol=1e-5, atol=0,
                                           msg=f"call {i}, {kind} misaligned: sums")
            for a, m in zip(aligned, misaligned):
                for j, (x, y) in enumerate(zip(a, m)):
                    within_ulps(y.cpu(), x.cpu(), f"call {i}, {kind} misaligned: tensor {j}", ulps=1, floor=1e-2)
        assert not all(torch.equal(x, y) for x, y in zip(aligned[0] + aligned[1], fresh + directions)), f"call {i}"


# ------------------------------------------------------------------------------------------------
# the optimizers' fused paths against the float64 references
# ------------------------------------------------------------------------------------------------

def fp32_model_and_reference(device):
    model = build_model(llama_config("micro"), seed=0, dtype=torch.float32).to(device)
    ref = copy.deepcopy(model).double().cpu()
    return model, ref, dict(model.named_parameters()), dict(ref.named_parameters())


def give_gradients(params, ref_params, step, seed=0):
    """The same gradients to both: random, with scales spread over two decades across tensors (so the
    clips fire on some tensors only); the reference gets the fp32 values exactly."""
    gen = torch.Generator().manual_seed(seed * 1000 + step)
    for i, (n, p) in enumerate(params.items()):
        scale = 10 ** (-2 * ((i * 7919) % 13) / 12)
        g = (torch.randn(p.shape, generator=gen) * scale).float()
        p.grad = g.to(p.device)
        ref_params[n].grad = g.double()


def compare(model_params, ref_params, what, tol=2e-5):
    for n, p in model_params.items():
        assert_close(p.detach().cpu(), ref_params[n].detach(), f"{what}: {n}", tol=tol)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("shape", [(20, 37), (37, 20)])  # the long side padded: columns, or rows
def test_muon_stack_matches_torch(device, dtype, nesterov, shape, monkeypatch):
    """m <- lerp(m, g, 1 - mu) and the bf16 update in the stack's windows as torch.optim.Muon's
    `buf.lerp_(grad, 1 - mu)`, `grad.lerp(buf, mu)` and `.bfloat16()` (within one unit in the last place:
    a backend may fuse lerp's multiply-add); the padding untouched; the sums of squares those of the bf16
    updates; the division bit for bit torch's bf16 `x / norm.clamp(min=eps)`."""
    # several blocks per matrix, a partial last one
    monkeypatch.setitem(common.launch_overrides, "ELEMENTS_PER_PROGRAM", 64)
    momenta = tensors([shape] * 3, dtype, device, 30)
    grads = tensors([shape] * 3, dtype, device, 31)
    eager = [m.clone() for m in momenta]
    torch._foreach_lerp_(eager, grads, 1 - 0.95)
    updates = [g.lerp(m, 0.95) if nesterov else m for g, m in zip(grads, eager)]
    stack, _ = padded_stack(shape, 3, torch.device(device), pad_multiple=64)
    sums = muon_kernels.muon_stack_(momenta, grads, stack, 0.95, nesterov)
    for i, (m, e) in enumerate(zip(momenta, eager)):
        within_ulps(m.cpu(), e.cpu(), f"momentum {i}", floor=1.0 if dtype == torch.float32 else 1e-2)
    window = stack[:, :shape[0], :shape[1]]
    within_ulps(window.cpu(), torch.stack(updates).bfloat16().cpu(), "stack", floor=1e-2)
    assert torch.count_nonzero(stack) == torch.count_nonzero(window)  # the padding stays zero
    expected = window.double().pow(2).sum(dim=(1, 2))
    torch.testing.assert_close(sums.double(), expected, rtol=1e-5, atol=0)
    norms = window.norm(dim=(-2, -1), keepdim=True).clamp(min=1e-7)
    expected_stack = stack / norms
    muon_kernels.divide_stack_(stack, norms.float().flatten())
    assert torch.equal(stack, expected_stack)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_batched_muon_fused_equals_foreach(device, dtype):
    """BatchedMuon with its kernels against its foreach path, 3 steps: the momentum buffers and the
    parameters within a few units in the last place (lerp's rounding may differ by one unit per step)."""
    shapes = [(24, 16), (24, 16), (16, 40), (20, 20)]

    def run(fused):
        params = [torch.nn.Parameter(t) for t in tensors(shapes, dtype, device, 32, scale=0.1)]
        opt = BatchedMuon(params, lr=0.02, momentum=0.9, weight_decay=0.1, fused=fused)
        for t in range(3):
            for p, g in zip(params, tensors(shapes, dtype, device, 40 + t)):
                p.grad = g
            opt.step()
        return params, [opt.state[p]["momentum_buffer"] for p in params]

    (fast, fast_bufs), (slow, slow_bufs) = run(True), run(False)
    start = tensors(shapes, dtype, device, 32, scale=0.1)
    for p, q, b, c, s0 in zip(fast, slow, fast_bufs, slow_bufs, start):
        within_ulps(b.cpu(), c.cpu(), f"buffer {tuple(b.shape)}", ulps=3, floor=c.abs().max().item() / 2)
        moved = (q.detach().double() - s0.double()).abs().max().item()
        assert moved > 1e-3
        within_ulps(p.detach().cpu(), q.detach().cpu(), f"{tuple(p.shape)}", ulps=4, floor=moved)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("momentum_on,weight_decay,normalization",
                         [("output", 0.0, "column"), ("all", 0.1, "column"), ("output", 0.1, "row")])
def test_scale_fused_matches_reference(device, momentum_on, weight_decay, normalization):
    """Every kernel path of SCALE: rows (with the lm_head's momentum in the same pass, or every matrix's),
    the embedding's columns, and with "row" normalization the matrices' columns and the embedding's rows."""
    model, ref, params, ref_params = fp32_model_and_reference(device)
    hp = dict(lr=3e-3, momentum=0.8, adam_lr=2e-2, adam_betas=(0.9, 0.99), adam_eps=1e-8,
              weight_decay=weight_decay, normalization=normalization, momentum_on=momentum_on)
    opt = SCALE(role_groups(model), fused=True, **hp)
    ref_opt = RefSCALE(role_of_names(ref), **hp)
    peaks = [g["lr"] for g in opt.param_groups]
    for t in range(4):
        set_lrs(opt, peaks, FACTORS[t])
        give_gradients(params, ref_params, t)
        opt.step()
        ref_opt.step(ref_params, FACTORS[t])
        compare(params, ref_params, f"step {t}")
        for n, p in params.items():
            for key, value in ref_opt.state[n].items():
                if isinstance(value, torch.Tensor):
                    assert_close(opt.state[p][key].cpu(), value, f"step {t}: {key} of {n}", tol=2e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("clip", ["mixed", "off"])
def test_sgd_ll_fused_matches_reference(device, clip):
    model, ref, params, ref_params = fp32_model_and_reference(device)
    lr, momentum = 100.0, 0.9
    tau, delta = None, None
    if clip == "mixed":  # thresholds between the smallest and largest step-0 values
        give_gradients(params, ref_params, 0)
        rms = [lr * (1 - momentum) * p.grad.double().pow(2).mean().sqrt().item() for p in params.values()]
        tau = math.sqrt(min(rms) * max(rms))
        norms = (1 - momentum) * model.lm_head.weight.grad.double().norm(dim=1)
        delta = math.sqrt(norms.min().item() * norms.max().item())
    opt = SGDLL(role_groups(model), lr=lr, momentum=momentum, tau=tau, delta=delta, fused=True)
    ref_opt = RefSGDLL(role_of_names(ref), lr=lr, momentum=momentum, tau=tau, delta=delta)
    peaks = [g["lr"] for g in opt.param_groups]
    fired = set()
    for t in range(5):
        set_lrs(opt, peaks, FACTORS[t])
        give_gradients(params, ref_params, t)
        opt.step()
        ref_opt.step(ref_params, FACTORS[t])
        compare(params, ref_params, f"step {t}", tol=1e-4)
        for n, p in params.items():
            state, ref_state = opt.state[p], ref_opt.state[n]
            assert_close(state["momentum_buffer"].cpu(), ref_state["momentum_buffer"], f"step {t}: momentum of {n}",
                         tol=1e-6)
            if tau is not None:
                assert state["rms_clipped"].item() == ref_state["rms_clipped"], f"step {t}: rms_clipped of {n}"
                assert state["rms_clip_count"].item() == ref_state["rms_clip_count"], f"step {t}: count of {n}"
                if ref_state["rms_clipped"]:
                    fired.add(n)
            if "row_clip_fraction" in ref_state:  # the output layer's row clip, from the kernel's row sums
                assert state["row_clip_fraction"].item() == pytest.approx(ref_state["row_clip_fraction"], abs=1e-6)
    if clip == "mixed":
        assert 0 < len(fired) < len(params), f"the RMS clip should fire on some tensors only, fired on {fired}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("init", ["zero", "first_update"])
def test_ema_nesterov_fused_matches_reference(device, init):
    model, ref, params, ref_params = fp32_model_and_reference(device)
    hp = dict(lr=3e-3, momentum=0.8, adam_lr=2e-2, adam_betas=(0.9, 0.99), adam_eps=1e-8,
              weight_decay=0.0, normalization="column", momentum_on="output")
    base = SCALE(role_groups(model), fused=True, **hp)
    opt = EMANesterov(base, beta=0.5, gamma=0.9, start_step=1, end_step=None, init=init, fused=True)
    peaks = [g["lr"] for g in opt.param_groups]
    ref_base = RefSCALE(role_of_names(ref), **hp)
    ref_ema = RefEMANesterov(ref_params, 0.5, 0.9, 1, None, init)
    names = {id(p): n for n, p in model.named_parameters()}
    for t in range(4):
        set_lrs(opt, peaks, FACTORS[t])
        opt.pre_forward()
        ref_ema.pre_forward(FACTORS[t])
        give_gradients(params, ref_params, t)
        opt.step()
        ref_base.step(ref_params, FACTORS[t])
        ref_ema.post_step()
        compare(params, ref_params, f"step {t}")
        for p, prev, momentum in zip(opt.params, opt.prev, opt.momentum):
            n = names[id(p)]
            assert_close(momentum.cpu(), ref_ema.m[n], f"step {t}: lookahead momentum of {n}", tol=2e-5)
            assert torch.equal(prev, p.detach()), f"step {t}: prev of {n}"


@pytest.mark.parametrize("device", DEVICES)
def test_ema_nesterov_fused_bf16_momentum_follows_the_ema(device):
    """The fused update with bf16 parameters and an fp32 m (the default) follows the float64 EMA; with m in bf16
    (momentum_dtype="param") the kernel runs one dtype and drifts as the eager code does."""
    assert ema_momentum_error(0.999, "float32", fused=True, device=device, steps=120) < 2e-3
    assert ema_momentum_error(0.999, "param", fused=True, device=device, steps=120) > 0.05


@pytest.mark.parametrize("device", DEVICES)
def test_fused_equals_eager_on_bf16_parameters(device):
    """bf16 parameters and state (the protocol's pure-bf16 mode): after 3 steps every parameter of the
    fused paths is within a few units in the last place (of the tensor's scale) of the eager paths'."""
    def build(fused):
        model = build_model(llama_config("micro"), seed=0, dtype=torch.bfloat16).to(device)
        scale = SCALE(role_groups(model), lr=1e-2, adam_lr=1e-2, fused=fused)
        return model, EMANesterov(scale, beta=0.5, gamma=0.9, fused=fused)

    def build_sgd_ll(fused):
        model = build_model(llama_config("micro"), seed=0, dtype=torch.bfloat16).to(device)
        return model, SGDLL(role_groups(model), lr=100.0, tau=1e-3, delta=1e-3, fused=fused)

    for builder in (build, build_sgd_ll):
        (fast, fast_opt), (slow, slow_opt) = builder(True), builder(False)
        for t in range(3):
            for model, opt in ((fast, fast_opt), (slow, slow_opt)):
                if hasattr(opt, "pre_forward"):
                    opt.pre_forward()
                gen = torch.Generator().manual_seed(t)
                for p in model.parameters():
                    p.grad = (torch.randn(p.shape, generator=gen) * 1e-2).to(torch.bfloat16).to(device)
                opt.step()
        for (n, p), q in zip(fast.named_parameters(), slow.parameters()):
            # rounding differences of a few ulps feed the next steps: counted at the tensor's scale
            within_ulps(p.detach().cpu(), q.detach().cpu(), f"{builder.__name__}: {n}", ulps=4,
                        floor=q.detach().abs().max().item() / 2)
        moved = max((p.detach().float() - q.float()).abs().max().item() for p, q in
                    zip(fast.parameters(), build_model(llama_config("micro"), seed=0, dtype=torch.bfloat16).to(device)
                        .parameters()))
        assert moved > 0, f"{builder.__name__}: the fused optimizer did not move the parameters"


def test_fused_true_refuses_where_the_kernels_cannot_run(monkeypatch):
    model = build_model(llama_config("micro"), seed=0, dtype=torch.float64)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    with pytest.raises(RuntimeError, match="fused=True needs the Triton kernels.*fp32/bf16/fp16"):
        SCALE(role_groups(model), fused=True).step()
    model = build_model(llama_config("micro"), seed=0, dtype=torch.float32)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    monkeypatch.setattr(common, "INTERPRET", False)
    with pytest.raises(RuntimeError, match="SGDLL: fused=True.*CUDA.*TRITON_INTERPRET=1"):
        SGDLL(role_groups(model), fused=True).step()
    monkeypatch.setattr(common, "triton", None)
    lookahead = EMANesterov(torch.optim.SGD(model.parameters(), lr=0.1), fused=True)
    lookahead.pre_forward()
    with pytest.raises(RuntimeError, match="EMANesterov: fused=True.*triton is not installed"):
        lookahead.step()
    matrices = [torch.nn.Parameter(torch.ones(4, 3, dtype=torch.float64))]
    matrices[0].grad = torch.ones_like(matrices[0])
    with pytest.raises(RuntimeError, match="BatchedMuon: fused=True needs the Triton kernels"):
        BatchedMuon(matrices, fused=True).step()
    with pytest.raises(ValueError, match="fused=True needs batched=True"):
        MuonWithAdamW([{"params": matrices}], [], batched=False, fused=True)
    # fused=None on the CPU is the eager path, without an error
    before = [p.detach().clone() for p in model.parameters()]
    SCALE(role_groups(model), fused=None).step()
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))


def test_scale_rows_longer_than_the_kernel_keeps_take_the_eager_path(monkeypatch):
    """Rows over MAX_ROW go through the eager code (same update); shorter ones through the kernel."""
    calls = []
    kernel = rows.row_normalized_update_
    monkeypatch.setattr(rows, "row_normalized_update_", lambda *a, **k: calls.append(len(a[0])) or kernel(*a, **k))
    results = {}
    for max_row in (8, common.MAX_ROW):
        monkeypatch.setattr(common, "MAX_ROW", max_row)
        model = build_model(llama_config("micro"), seed=0, dtype=torch.float32).to(DEVICES[0])
        for p in model.parameters():
            p.grad = torch.ones_like(p).cumsum(-1)
        calls.clear()
        SCALE(role_groups(model), fused=True).step()
        results[max_row] = ([p.detach().cpu() for p in model.parameters()], list(calls))
    (long_rows, long_calls), (short_rows, short_calls) = results.values()
    assert long_calls == [] and short_calls == [4 * 2 + 3 * 2, 1], (long_calls, short_calls)  # matrices, lm_head
    for a, b in zip(long_rows, short_rows):
        torch.testing.assert_close(a, b)
