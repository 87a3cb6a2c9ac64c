"""BatchedMuon against torch.optim.Muon: same update, same state, state_dicts interchangeable."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import llmopt.optim.muon as muon_module
from llmopt.optim.muon import BatchedMuon, MuonWithAdamW

# several of one shape, both orientations (rows > cols is transposed inside Newton-Schulz), a square
SHAPES = [(24, 16), (24, 16), (24, 16), (16, 24), (16, 24), (20, 20), (12, 40)]


def make_params(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter((torch.randn(s, generator=g) * 0.1).to(dtype)) for s in SHAPES]


def make_grads(steps, dtype, seed=1):
    """Fixed gradients per step, the same for both optimizers: the momentum buffers then depend on
    the gradients only and must agree bit for bit."""
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=g).to(dtype) for s in SHAPES] for _ in range(steps)]


def run(opt, params, grads):
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        opt.step()


def assert_close_to_update(actual, expected, start, steps):
    """Newton-Schulz runs in bf16 in both, and the batched products (or a GPU's GEMMs) may round
    differently from torch's per-matrix ones, by ~1 bf16 ulp (2^-8 relative) per element, compounded
    over 5 iterations. 1% of the distance moved bounds that yet catches any wrong formula (lr scale,
    Nesterov, decay, orientation: all change the update by far more than 1%). For bf16 parameters,
    such a difference may also flip the rounding of p itself, once per step: one ulp of |p| per step on top."""
    for a, e, s in zip(actual, expected, start):
        moved = (e.double() - s.double()).abs().max().item()
        assert moved > 0
        tol = 1e-2 * moved
        if e.dtype == torch.bfloat16:
            top = e.double().abs().max().item()
            tol += steps * 2.0 ** (math.floor(math.log2(top)) - 7)  # bf16: 7 explicit mantissa bits
        err = (a.double() - e.double()).abs().max().item()
        assert err <= tol, (tuple(e.shape), err, tol)


def buffers(opt, params):
    return [opt.state[p]["momentum_buffer"] for p in params]


# bf16 without Nesterov: torch's buffer bug, tested against a corrected reference below
CONFIGS = [pytest.param(dtype, dict(nesterov=n, weight_decay=wd, adjust_lr_fn=fn),
                        id=f"{str(dtype)[6:]}-nesterov{n}-wd{wd}-{fn}")
           for dtype in (torch.float32, torch.bfloat16) for n in (True, False) for wd in (0.0, 0.1)
           for fn in ("original", "match_rms_adamw") if n or dtype == torch.float32]


@pytest.mark.parametrize("dtype, cfg", CONFIGS)
def test_matches_torch_muon(dtype, cfg):
    ref_params, params = make_params(dtype), make_params(dtype)
    start = [p.detach().clone() for p in params]
    grads = make_grads(4, dtype)
    ref = torch.optim.Muon(ref_params, lr=0.02, momentum=0.9, **cfg)
    opt = BatchedMuon(params, lr=0.02, momentum=0.9, **cfg)
    run(ref, ref_params, grads)
    run(opt, params, grads)
    for b, rb in zip(buffers(opt, params), buffers(ref, ref_params)):
        assert b.dtype == dtype and torch.equal(b, rb)  # lerp in p's dtype, no bf16 pass: exact
    assert_close_to_update(params, ref_params, start, len(grads))


def test_bf16_without_nesterov_keeps_its_momentum_buffer():
    """torch.optim.Muon (<= 2.13) normalizes a bf16 buffer in place when nesterov=False (the update IS
    the buffer and .bfloat16() returns it); BatchedMuon follows the upstream fix (pytorch#194664):
    the buffer is the plain lerp of the gradients, and each step is torch's per-matrix update."""
    from torch.optim._muon import _zeropower_via_newtonschulz

    dtype, lr, mu, wd = torch.bfloat16, 0.02, 0.9, 0.1
    params, ref = make_params(dtype), make_params(dtype)
    start = [p.detach().clone() for p in params]
    grads = make_grads(3, dtype)
    opt = BatchedMuon(params, lr=lr, momentum=mu, nesterov=False, weight_decay=wd)
    run(opt, params, grads)
    ref_bufs = [torch.zeros_like(p) for p in ref]
    with torch.no_grad():
        for step_grads in grads:
            for p, g, b in zip(ref, step_grads, ref_bufs):
                b.lerp_(g, 1 - mu)
                update = _zeropower_via_newtonschulz(b.clone(), (3.4445, -4.7750, 2.0315), 5, 1e-7)
                p.mul_(1 - lr * wd)
                p.add_(update, alpha=-lr * max(1, p.shape[0] / p.shape[1]) ** 0.5)
    for b, rb in zip(buffers(opt, params), ref_bufs):
        assert torch.equal(b, rb)
        assert abs(b.float().norm().item() - 1.0) > 0.1  # not normalized
    assert_close_to_update(params, ref, start, len(grads))


def test_newton_schulz_runs_once_per_shape(monkeypatch):
    calls = []
    original = muon_module.newton_schulz_batched

    def counting(x, *args, **kwargs):
        calls.append(tuple(x.shape))
        return original(x, *args, **kwargs)

    monkeypatch.setattr(muon_module, "newton_schulz_batched", counting)
    params = make_params(torch.float32)
    run(BatchedMuon(params, lr=0.02), params, make_grads(1, torch.float32))
    assert sorted(calls) == sorted([(3, 24, 16), (2, 16, 24), (1, 20, 20), (1, 12, 40)])


@pytest.mark.parametrize("shape", [(3, 20, 37), (2, 37, 20), (1, 16, 64)])
def test_padding_the_long_side_changes_no_value(shape):
    """Zero columns (or rows, for a tall stack) add nothing to the Gram matrix or the norm: the padded
    iteration (as on the GPU, where unaligned bf16 rows slow the matmuls) gives the unpadded result in
    the original window, and the padding stays zero."""
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)).bfloat16()
    plain = muon_module.newton_schulz_batched(x.clone(), muon_module.NS_COEFFICIENTS, 5, 1e-7)
    stack, windows = muon_module.padded_stack(x.shape[1:], x.size(0), x.device, pad_multiple=64)
    torch._foreach_copy_(windows, list(x.unbind(0)))
    long_dim = 1 if shape[1] > shape[2] else 2
    assert stack.size(long_dim) == 64 and stack.size(3 - long_dim) == min(shape[1:])
    padded = muon_module.newton_schulz_batched(stack, muon_module.NS_COEFFICIENTS, 5, 1e-7)
    window = padded[:, :shape[1], :shape[2]]
    assert plain.shape == x.shape
    if max(shape[1:]) < 64:
        assert torch.count_nonzero(padded.narrow(long_dim, max(shape[1:]), 64 - max(shape[1:]))) == 0
    # bf16 Newton-Schulz: a different reduction length may round differently in the last bit
    torch.testing.assert_close(window.float(), plain.float(), atol=2e-2, rtol=0)
    assert (window.float() - plain.float()).abs().mean() < 2e-3
    assert plain.float().abs().mean() > 0.05   # a real orthogonalized matrix, not zeros


def test_newton_schulz_matches_torch_per_matrix():
    """The batched iteration (tall stacks untransposed, a folded into the polynomial) against torch's own
    per-matrix Newton-Schulz, and both against a float64 iteration: the batched result is as close to
    float64 as torch's is (bf16 rounding), so the reorganisation costs no accuracy."""
    from torch.optim._muon import _zeropower_via_newtonschulz

    def float64_ns(m):
        a, b, c = muon_module.NS_COEFFICIENTS
        m = m.double()
        tall = m.size(0) > m.size(1)
        m = m.T if tall else m
        m = m / m.norm().clamp(min=1e-7)
        for _ in range(5):
            gram = m @ m.T
            m = a * m + (b * gram + c * gram @ gram) @ m
        return m.T if tall else m

    g = torch.Generator().manual_seed(3)
    for shape in ((4, 48, 32), (4, 32, 48), (3, 40, 40)):
        x = torch.randn(shape, generator=g).bfloat16()
        batched = muon_module.newton_schulz_batched(x, muon_module.NS_COEFFICIENTS, 5, 1e-7)
        for i in range(shape[0]):
            exact = float64_ns(x[i])
            ours = (batched[i].double() - exact).abs().max().item()
            theirs = (_zeropower_via_newtonschulz(x[i], muon_module.NS_COEFFICIENTS, 5, 1e-7).double()
                      - exact).abs().max().item()
            assert ours <= 1.5 * theirs + 1e-3, (shape, ours, theirs)
            assert exact.abs().mean() > 0.05


def test_skips_params_without_grad_and_takes_several_groups():
    a, b = make_params(torch.float32), make_params(torch.float32)
    ra, rb = make_params(torch.float32), make_params(torch.float32)
    opt = BatchedMuon([{"params": a}, {"params": b, "lr": 0.05, "adjust_lr_fn": "match_rms_adamw"}], lr=0.02)
    ref = torch.optim.Muon([{"params": ra}, {"params": rb, "lr": 0.05, "adjust_lr_fn": "match_rms_adamw"}],
                           lr=0.02)
    grads = make_grads(2, torch.float32)
    for step_grads in grads:
        for ps in (a, ra):
            for p, g in zip(ps[1:], step_grads[1:]):  # the first matrix never gets a gradient
                p.grad = g.clone()
        for ps in (b, rb):
            for p, g in zip(ps, step_grads):
                p.grad = g.clone()
        opt.step()
        ref.step()
    assert torch.equal(a[0], make_params(torch.float32)[0]) and a[0] not in opt.state
    start = make_params(torch.float32)
    assert_close_to_update(a[1:] + b, ra[1:] + rb, start[1:] + start, len(grads))


@pytest.mark.parametrize("first, second", [(torch.optim.Muon, BatchedMuon), (BatchedMuon, torch.optim.Muon)])
def test_state_dict_is_interchangeable(first, second):
    kw = dict(lr=0.02, momentum=0.9, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    grads = make_grads(5, torch.float32)
    ref_params = make_params(torch.float32)
    start = [p.detach().clone() for p in ref_params]
    ref = first(ref_params, **kw)
    run(ref, ref_params, grads)  # the reference: `first` all the way

    params = make_params(torch.float32)
    opt = first(params, **kw)
    run(opt, params, grads[:3])
    saved = copy.deepcopy(opt.state_dict())
    resumed_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    resumed = second(resumed_params, lr=1.0, momentum=0.5)  # the hyper-parameters come from the state_dict
    resumed.load_state_dict(saved)
    assert resumed.param_groups[0]["lr"] == 0.02 and resumed.param_groups[0]["adjust_lr_fn"] == "match_rms_adamw"
    assert set(resumed.state_dict()["param_groups"][0]) == set(saved["param_groups"][0])
    run(resumed, resumed_params, grads[3:])
    for b, rb in zip(buffers(resumed, resumed_params), buffers(ref, ref_params)):
        assert torch.equal(b, rb)
    assert_close_to_update(resumed_params, ref_params, start, len(grads))


def test_muon_with_adamw_uses_batched_muon_and_can_fall_back():
    def build(batched):
        w = make_params(torch.float32)
        v = torch.nn.Parameter(torch.ones(5))
        return w, v, MuonWithAdamW([{"params": w}], [{"params": [v]}], weight_decay=0.01, batched=batched)

    (w, v, opt), (rw, rv, ref) = build(True), build(False)
    assert type(opt.muon) is BatchedMuon and type(ref.muon) is torch.optim.Muon
    start = [p.detach().clone() for p in w]
    for step_grads in make_grads(3, torch.float32):
        for ps, vec in ((w, v), (rw, rv)):
            for p, g in zip(ps, step_grads):
                p.grad = g.clone()
            vec.grad = torch.full((5,), 0.5)
        opt.step()
        ref.step()
    assert_close_to_update(w, rw, start, 3)
    assert torch.equal(v, rv) and not torch.equal(v, torch.ones(5))
    ref.load_state_dict(opt.state_dict())  # {"muon": ..., "adamw": ...} loads across the two
    assert set(opt.state_dict()) == {"muon", "adamw"}
    assert torch.equal(ref.muon.state[rw[0]]["momentum_buffer"], opt.muon.state[w[0]]["momentum_buffer"])


def test_closure_loss_is_returned():
    p = torch.nn.Parameter(torch.randn(6, 4))
    opt = BatchedMuon([p], lr=0.1)

    def closure():
        loss = (p ** 2).sum()
        loss.backward()
        return loss

    before = p.detach().clone()
    loss = opt.step(closure)
    assert loss.item() == pytest.approx(before.pow(2).sum().item()) and not torch.equal(p, before)


@pytest.mark.parametrize("call, message", [
    (lambda m, v: BatchedMuon([m, v]), "2-D parameters; got one of shape \\(5,\\)"),
    (lambda m, v: BatchedMuon([m], lr=-1e-3), "lr must be >= 0"),
    (lambda m, v: BatchedMuon([m], lr=torch.tensor([0.1, 0.2])), "Tensor lr must be 1-element"),
    (lambda m, v: BatchedMuon([m], weight_decay=-0.1), "weight_decay must be >= 0"),
    (lambda m, v: BatchedMuon([m], momentum=-0.5), "momentum must be >= 0"),
    (lambda m, v: BatchedMuon([m], adjust_lr_fn="rms"), "unknown adjust_lr_fn 'rms'"),
    (lambda m, v: BatchedMuon([m], ns_coefficients=(1.0, 2.0)), "ns_coefficients must be 3 values"),
    (lambda m, v: BatchedMuon([m], ns_steps=100), r"ns_steps must be in \[0, 100\)"),
    (lambda m, v: BatchedMuon([m]).add_param_group({"params": [v]}), "2-D parameters"),
    (lambda m, v: BatchedMuon([m]).add_param_group({"params": [torch.nn.Parameter(torch.ones(2, 2))], "lr": -1}),
     "lr must be >= 0"),
])
def test_bad_input_gets_one_clear_error(call, message):
    m, v = torch.nn.Parameter(torch.ones(4, 3)), torch.nn.Parameter(torch.ones(5))
    with pytest.raises(ValueError, match=message):
        call(m, v)
