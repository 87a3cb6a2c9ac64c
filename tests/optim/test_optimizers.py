"""The registry, its errors, and what every optimizer must do: round-trip its state, run in bf16."""

import copy
import io

import pytest
import torch

from llmopt.optim import OPTIMIZERS, SPECS, EMANesterov, build_optimizer
from tests.helpers.models import lm_loss, micro_model, random_batches
from tests.helpers.train import ROOT

# every registered optimizer with a contract-test learning rate (the low-rank ones need optional packages)
CORE = sorted(name for name, entry in SPECS.items() if entry.test_lr is not None)


def make(name, model, lookahead=None):
    return build_optimizer(model, name, lr=SPECS[name].test_lr, lookahead=lookahead)


def train(model, opt, batches, scheduler=None):
    for tokens in batches:
        if hasattr(opt, "pre_forward"):
            opt.pre_forward()
        lm_loss(model, tokens).backward()
        opt.step()
        opt.zero_grad()
        if scheduler is not None:
            scheduler.step()


def test_every_optimizer_config_is_registered():
    configs = {p.stem for p in (ROOT / "configs" / "optimizer").glob("*.yaml")}
    assert set(OPTIMIZERS) == configs
    assert {"adamw", "adam", "sgd", "muon", "sgd_ll", "scale"} <= set(CORE)  # the families without extra packages


@pytest.mark.parametrize("name", CORE)
@pytest.mark.parametrize("lookahead", [None, {"beta": 0.5, "gamma": 0.9}])
def test_state_dict_round_trip_mid_run(name, lookahead):
    batches = random_batches(6)
    ref = micro_model()
    ref_opt = make(name, ref, lookahead)
    ref_sched = torch.optim.lr_scheduler.LambdaLR(ref_opt, lambda s: 0.5 + 0.1 * s)
    train(ref, ref_opt, batches, ref_sched)

    first = micro_model()
    opt = make(name, first, lookahead)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 + 0.1 * s)
    train(first, opt, batches[:3], sched)
    buffer = io.BytesIO()
    torch.save({"model": first.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=False)

    resumed = micro_model(seed=123)  # different weights: everything must come from the checkpoint
    resumed.load_state_dict(saved["model"])
    opt2 = make(name, resumed, lookahead)
    sched2 = torch.optim.lr_scheduler.LambdaLR(opt2, lambda s: 0.5 + 0.1 * s)
    opt2.load_state_dict(saved["opt"])
    sched2.load_state_dict(saved["sched"])
    train(resumed, opt2, batches[3:], sched2)
    for (n, p), q in zip(ref.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), n


@pytest.mark.parametrize("name", CORE)
def test_pure_bf16_parameters_step(name):
    model = micro_model(torch.bfloat16)
    before = copy.deepcopy(model)
    opt = make(name, model)
    train(model, opt, random_batches(3))
    for p in model.parameters():
        assert p.dtype == torch.bfloat16 and torch.isfinite(p).all()
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), before.parameters()))
    for state in opt.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor) and value.ndim > 0:
                assert value.dtype == torch.bfloat16  # states follow the parameter dtype


def test_muon_is_torch_muon_plus_adamw():
    """MuonWithAdamW = torch.optim.Muon on the hidden matrices and AdamW on the rest, exactly: its groups, roles and
    AdamW settings, with torch's Newton-Schulz (batched=False). The batched Newton-Schulz (the default) rounds its
    bf16 products in another order (baddbmm), so it is compared with torch's within bf16 rounding in
    tests/optim/test_muon_batched.py; bit for bit it differs here in one matrix at step 2."""
    batches = random_batches(3)
    model, ref = micro_model(), micro_model()
    opt = build_optimizer(model, "muon", lr=0.02, adam_lr=1e-3, weight_decay=0.01, adjust_lr="match_rms_adamw",
                          batched=False)
    hidden = [p for n, p in ref.named_parameters() if ".layers." in n and p.ndim == 2]
    rest = [p for n, p in ref.named_parameters() if not (".layers." in n and p.ndim == 2)]
    muon = torch.optim.Muon(hidden, lr=0.02, weight_decay=0.01, adjust_lr_fn="match_rms_adamw")
    adamw = torch.optim.AdamW(rest, lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
    for tokens in batches:
        lm_loss(model, tokens).backward()
        opt.step()
        opt.zero_grad()
        lm_loss(ref, tokens).backward()
        muon.step()
        adamw.step()
        muon.zero_grad()
        adamw.zero_grad()
    for p, q in zip(model.parameters(), ref.parameters()):
        assert torch.equal(p, q)
    assert len(opt.param_groups) == 4  # one Muon group + AdamW's embedding/output/vector groups
    assert {g["role"] for g in opt.param_groups} == {"matrix", "embedding", "output", "vector"}


def test_scheduler_on_a_combined_optimizer_drives_every_group():
    model = micro_model()
    opt = build_optimizer(model, "muon", lr=0.02, adam_lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5)
    sched.step()
    assert [g["lr"] for g in opt.muon.param_groups] == [0.01]
    assert [g["lr"] for g in opt.adamw.param_groups] == [5e-4] * 3


def test_scale_vector_groups_get_adam_lr():
    opt = build_optimizer(micro_model(), "scale", lr=1e-3, adam_lr=0.02)
    lrs = {g["role"]: g["lr"] for g in opt.param_groups}
    assert lrs == {"matrix": 1e-3, "embedding": 1e-3, "output": 1e-3, "vector": 0.02}


@pytest.mark.parametrize("call, message", [
    (lambda m: build_optimizer(m, "adamx"), r"unknown optimizer 'adamx'; choose one of \[.*'scale'"),
    (lambda m: build_optimizer(m, "scale", betas=(0.9, 0.9)), r"unknown hyper-parameter\(s\) \['betas'\].*adam_lr"),
    (lambda m: build_optimizer(m, "sgd_ll", lrr=1), r"unknown hyper-parameter\(s\) \['lrr'\]"),
    (lambda m: build_optimizer(m, "adamw", lr=-1), "lr must be >= 0"),
    (lambda m: build_optimizer(m, "scale", lr=-1e-3), "lr must be >= 0"),
    (lambda m: build_optimizer(m, "sgd_ll", tau=-1), "tau must be >= 0"),
    (lambda m: build_optimizer(m, "sgd_ll", delta=-1e-3), "delta must be >= 0"),
    (lambda m: build_optimizer(m, "sgd_ll", momentum=1.0), r"momentum must be in \[0, 1\)"),
    (lambda m: build_optimizer(m, "scale", normalization="l2"), "unknown normalization 'l2'"),
    (lambda m: build_optimizer(m, "scale", momentum_on="embedding"), "unknown momentum_on"),
    (lambda m: build_optimizer(m, "muon", adjust_lr="x"), "unknown adjust_lr"),
    (lambda m: build_optimizer(m, "adamw", lookahead={"beta": 1.0}), r"beta must be in \[0, 1\)"),
    (lambda m: build_optimizer(m, "adamw", lookahead={"gamma": -0.1}), r"gamma must be in \[0, 1\)"),
    (lambda m: build_optimizer(m, "adamw", lookahead={"start_step": 5, "end_step": 2}), "window"),
    (lambda m: build_optimizer(m, "adamw", lookahead={"init": "x"}), "unknown init"),
])
def test_bad_input_gets_one_clear_error(call, message):
    with pytest.raises(ValueError, match=message):
        call(micro_model())


def test_unassigned_parameter_is_refused():
    model = micro_model()
    model.head2 = torch.nn.Linear(3, 3, bias=False)
    with pytest.raises(ValueError, match="no role matches"):
        build_optimizer(model, "adamw")


def test_lookahead_wraps_and_counts_its_buffers():
    model = micro_model()
    opt = build_optimizer(model, "scale", lookahead={"beta": 0.5, "gamma": 0.99})
    assert isinstance(opt, EMANesterov)
    assert [g["role"] for g in opt.param_groups] == [g["role"] for g in opt.base.param_groups]
    n = sum(p.numel() for p in model.parameters())
    from llmopt.optim import state_bytes
    assert state_bytes(opt) == 2 * n * 4   # prev + momentum, before any step


def test_lookahead_momentum_in_fp32_over_bf16_parameters():
    """Pure bf16: prev is a bf16 copy, m fp32 (2 + 4 bytes per parameter); momentum_dtype="param" keeps m bf16.
    The trainer's memory estimate counts the same."""
    from llmopt.accounting import estimate_train_bytes
    from llmopt.model import llama_config, param_counts
    from llmopt.optim import state_bytes

    model = micro_model(dtype=torch.bfloat16)
    n = sum(p.numel() for p in model.parameters())
    wide = build_optimizer(model, "sgd", lookahead={"beta": 0.5})
    narrow = build_optimizer(model, "sgd", lookahead={"beta": 0.5, "momentum_dtype": "param"})
    assert state_bytes(wide) == n * (2 + 4) and state_bytes(narrow) == n * (2 + 2)
    counts = param_counts(llama_config("60m"))
    plain = estimate_train_bytes(counts, "sgd", None, "bf16_pure")
    assert estimate_train_bytes(counts, "sgd", "ema_nesterov", "bf16_pure") - plain == 6 * counts["total"]
    assert estimate_train_bytes(counts, "sgd", "ema_nesterov", "bf16_pure", "param") - plain == 4 * counts["total"]
    assert (estimate_train_bytes(counts, "sgd", "ema_nesterov", "amp_bf16")
            - estimate_train_bytes(counts, "sgd", None, "amp_bf16")) == 8 * counts["total"]


def test_adam_is_torch_fused_where_every_parameter_is_on_cuda():
    """"fused where available" (protocol section 5): torch's own fused=None would pick foreach."""
    from types import SimpleNamespace

    from llmopt.optim.adam import torch_fused
    on_cuda = [{"params": [SimpleNamespace(is_cuda=True)] * 2}]
    mixed = [{"params": [SimpleNamespace(is_cuda=True), SimpleNamespace(is_cuda=False)]}]
    assert torch_fused(on_cuda, None) is True and torch_fused(mixed, None) is None
    assert torch_fused(on_cuda, False) is False
    opt = build_optimizer(micro_model(), "adamw")  # CPU parameters: foreach, as torch's default
    assert opt.defaults["fused"] is None
