"""Per-layer diagnostics: every reported number against a direct computation on the micro model (float64).

The direct computations here use only parameter/gradient snapshots taken by the test and the optimizers'
documented state, never the module's own helpers.
"""

import json
import math
import os
import socket

import pytest
import torch

from llmopt.metrics.diagnostics import Diagnostics
from llmopt.optim import build_optimizer
from tests.helpers.models import lm_loss, micro_model, random_batches

LAYERS = 2  # the micro flavor
BLOCK = {"self_attn.q_proj.weight": "q", "self_attn.k_proj.weight": "k", "self_attn.v_proj.weight": "v",
         "self_attn.o_proj.weight": "o", "mlp.gate_proj.weight": "gate", "mlp.up_proj.weight": "up",
         "mlp.down_proj.weight": "down", "input_layernorm.weight": "attn_norm",
         "post_attention_layernorm.weight": "mlp_norm"}
EXPECTED_ID = {"model.embed_tokens.weight": "embed", "lm_head.weight": "head", "model.norm.weight": "final_norm",
               **{f"model.layers.{i}.{suffix}": f"{i}/{kind}" for i in range(LAYERS) for suffix, kind in BLOCK.items()}}
RTOL = 1e-9

CASES = {
    "adamw": ("adamw", {"lr": 1e-3}, None),
    "scale": ("scale", {"lr": 1e-3}, None),
    "sgd_ll": ("sgd_ll", {"lr": 10.0, "tau": 5e-3, "delta": 2.5e-3}, None),
    "muon": ("muon", {"lr": 0.02}, None),
    "ema_scale": ("scale", {"lr": 1e-3}, {"beta": 0.5, "gamma": 0.9}),
}


def run(case, updates=3, every=3, seed=0, **diag_kw):
    """Train the micro model for `updates` updates with diagnostics; snapshot the measured update."""
    name, hparams, lookahead = CASES[case]
    model = micro_model(torch.float64)
    opt = build_optimizer(model, name, lookahead=lookahead, **hparams)
    named = list(model.named_parameters())
    w0 = [p.detach().clone() for _, p in named]
    diag = Diagnostics(model, opt, every=every, **diag_kw)
    record = None
    for u, tokens in enumerate(random_batches(updates, seed=seed)):
        rest = [p.detach().clone() for _, p in named]      # x_t, before EMA-Nesterov's lookahead move
        if hasattr(opt, "pre_forward"):
            opt.pre_forward()
        lm_loss(model, tokens).backward()
        grads = [p.grad.detach().clone() for _, p in named]
        diag.before_step(u)
        opt.step()
        diag.after_step(u)
        opt.zero_grad()
        if diag.due(u + 1):
            record = {"update": u, "rest": rest, "grads": grads, "after": [p.detach().clone() for _, p in named],
                      "out": diag.collect()}
    return model, opt, named, w0, record


def momentum_of(case, opt, name, p):
    """The parameter-shaped momentum each optimizer documents, or None."""
    if case == "adamw":
        return opt.state[p]["exp_avg"]
    if case in ("scale", "ema_scale"):
        base = opt.base if case == "ema_scale" else opt
        if name == "lm_head.weight":
            return base.state[p]["momentum_buffer"]
        return base.state[p]["exp_avg"] if p.ndim == 1 else None
    if case == "sgd_ll":
        return opt.state[p]["momentum_buffer"]
    if case == "muon":
        return opt.muon.state[p]["momentum_buffer"] if p in opt.muon.state else opt.adamw.state[p]["exp_avg"]
    raise AssertionError(case)


def adam_elements(case, opt, name, p):
    """(v, lr, eps, beta2, step) for Adam-stepped parameters, else None."""
    if case == "adamw" or (case == "muon" and p in opt.adamw.state):
        inner = opt if case == "adamw" else opt.adamw
        group = next(g for g in inner.param_groups if any(q is p for q in g["params"]))
        st = inner.state[p]
        return st["exp_avg_sq"], group["lr"], group["eps"], group["betas"][1], float(st["step"])
    if case in ("scale", "ema_scale") and p.ndim == 1:
        base = opt.base if case == "ema_scale" else opt
        group = next(g for g in base.param_groups if any(q is p for q in g["params"]))
        st = base.state[p]
        return st["exp_avg_sq"], group["lr"], group["adam_eps"], group["adam_betas"][1], float(st["step"])
    return None


def close(actual, expected, rtol=RTOL):
    assert actual == pytest.approx(expected, rel=rtol, abs=1e-300), (actual, expected)


@pytest.mark.parametrize("case", list(CASES))
def test_numbers_match_direct_computation(case):
    model, opt, named, w0, rec = run(case)
    out = rec["out"]
    assert rec["update"] == 2
    tot = {"g": 0.0, "d": 0.0, "w": 0.0, "dist": 0.0, "w0": 0.0}
    with_m = set()
    for (name, p), rest, g, after, init in zip(named, rec["rest"], rec["grads"], rec["after"], w0):
        tid, n = EXPECTED_ID[name], p.numel()
        pre = f"diag/{tid}/"
        d = (after - rest).norm().item()
        w, gn, dist = after.norm().item(), g.norm().item(), (after - init).norm().item()
        assert d > 0, f"{name} did not move"
        close(out[pre + "update_rms"], d / math.sqrt(n))
        close(out[pre + "weight_rms"], w / math.sqrt(n))
        close(out[pre + "grad_rms"], gn / math.sqrt(n))
        close(out[pre + "w_over_g"], w / gn)
        close(out[pre + "dist_init"], dist)
        close(out[pre + "dist_init_rel"], dist / init.norm().item())
        m = momentum_of(case, opt, name, p)
        if m is None:
            assert pre + "w_over_m" not in out
        else:
            with_m.add(tid)
            close(out[pre + "w_over_m"], w / m.norm().item())
        tot["g"] += gn**2
        tot["d"] += d**2
        tot["w"] += w**2
        tot["dist"] += dist**2
        tot["w0"] += init.norm().item() ** 2
    assert with_m, "no momentum found"
    close(out["diag/global/grad_norm"], math.sqrt(tot["g"]))
    close(out["diag/global/update_norm"], math.sqrt(tot["d"]))
    close(out["diag/global/weight_norm"], math.sqrt(tot["w"]))
    close(out["diag/global/dist_init"], math.sqrt(tot["dist"]))
    close(out["diag/global/dist_init_rel"], math.sqrt(tot["dist"] / tot["w0"]))

    # the output layer's per-token-class gradient norms
    head_grad = rec["grads"][[n for n, _ in named].index("lm_head.weight")]
    rows = head_grad.norm(dim=1)
    qs = torch.quantile(rows, torch.tensor([0.5, 0.9, 0.99], dtype=torch.float64)).tolist()
    for key, value in zip(("q50", "q90", "q99"), qs):
        close(out[f"diag/head/token_grad_norm_{key}"], value)
    close(out["diag/head/token_grad_norm_max"], rows.max().item())
    close(out["diag/head/token_grad_norm_max_over_median"], rows.max().item() / qs[0])  # q50, interpolated
    assert out["diag/head/token_grad_norm_max_over_median"] > 1.5   # the irregularity is there at init

    # Adam's effective learning rate, per layer: lr / (sqrt(v / (1 - beta2^t)) + eps)
    pools: dict = {}
    for name, p in named:
        a = adam_elements(case, opt, name, p)
        if a is None:
            continue
        v, lr, eps, beta2, step = a
        pools.setdefault(EXPECTED_ID[name].split("/")[0], []).append(
            (lr / ((v / (1 - beta2**step)).sqrt() + eps)).reshape(-1))
    eff_keys = {k for k in out if k.startswith("diag/adam/")}
    assert eff_keys == {f"diag/adam/eff_lr_{q}/{layer}" for layer in pools for q in ("q10", "median", "q90")}
    for layer, parts in pools.items():
        q10, med, q90 = torch.quantile(torch.cat(parts), torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)).tolist()
        close(out[f"diag/adam/eff_lr_q10/{layer}"], q10)
        close(out[f"diag/adam/eff_lr_median/{layer}"], med)
        close(out[f"diag/adam/eff_lr_q90/{layer}"], q90)
    if case in ("adamw", "muon"):
        assert "head" in pools and "embed" in pools
    if case in ("scale", "ema_scale"):
        assert set(pools) == {"0", "1", "final_norm"}      # SCALE's AdamW steps the 1-D gains only

    # nothing else slipped in
    assert not any(k.startswith("diag/sgd_ll/") for k in out) or case == "sgd_ll"
    assert ("diag/lookahead/beta" in out) == (case == "ema_scale")
    per_tensor = [k for k in out if k.split("/")[1] not in ("global", "adam", "sgd_ll", "lookahead")
                  and not k.startswith("diag/head/token")]
    assert len(per_tensor) == 6 * len(named) + len(with_m)


def test_sgd_ll_clip_fractions_match_direct_computation():
    model, opt, named, w0, rec = run("sgd_ll")
    out = rec["out"]
    lr, tau, delta = 10.0, 5e-3, 2.5e-3
    fired, roles = [], []
    for name, p in named:
        m = opt.state[p]["momentum_buffer"]       # unclipped, as the optimizer keeps it
        u = m
        if name == "lm_head.weight":
            row_norm = m.norm(dim=1, keepdim=True)
            clipped_rows = (row_norm > delta).double().mean().item()
            u = m * (delta / row_norm).clamp(max=1.0)
        f = lr * u.square().mean().sqrt().item() > tau
        fired.append(f)
        roles.append("vector" if p.ndim == 1 else {"model.embed_tokens.weight": "embedding",
                                                    "lm_head.weight": "output"}.get(name, "matrix"))
        if f:   # a clipped tensor moved by exactly tau in RMS
            close(out[f"diag/{EXPECTED_ID[name]}/update_rms"], tau, rtol=1e-6)
    assert 0 < sum(fired) < len(fired), "pick tau so that the clip fires on some tensors only"
    assert 0 < clipped_rows < 1, "pick delta so that some rows are clipped"
    close(out["diag/sgd_ll/rms_clip_fraction_layers"], sum(fired) / len(fired))
    close(out["diag/sgd_ll/row_clip_fraction"], clipped_rows, rtol=1e-6)   # float32 in the optimizer
    for role in set(roles):
        sel = [f for f, r in zip(fired, roles) if r == role]
        close(out[f"diag/sgd_ll/rms_clip_fraction/{role}"], sum(sel) / len(sel))


def test_lookahead_extras_and_rest_point_update():
    model, opt, named, w0, rec = run("ema_scale")
    out = rec["out"]
    assert out["diag/lookahead/beta"] == pytest.approx(0.5)
    close(out["diag/lookahead/momentum_norm"], math.sqrt(sum(m.norm().item() ** 2 for m in opt.momentum)))
    # the update is measured from the rest point x_t, not from the lookahead point the step started at
    i = [n for n, _ in named].index("model.layers.0.self_attn.q_proj.weight")
    from_rest = (rec["after"][i] - rec["rest"][i]).norm().item() / math.sqrt(named[i][1].numel())
    base_only = 1e-3   # SCALE's column-normalized step (from the lookahead point) has RMS lr exactly
    close(out["diag/0/q/update_rms"], from_rest)
    assert abs(from_rest - base_only) / base_only > 1e-4   # far outside RTOL: the two are told apart


def test_cpu_snapshot_and_device_w0_give_the_same_numbers():
    ref = run("adamw")[-1]["out"]
    other = run("adamw", snapshot_device="cpu", init_device="same", bucket_mb=0.01)[-1]["out"]  # many buckets
    assert set(ref) == set(other)
    for key in ref:
        close(other[key], ref[key], rtol=1e-12)
    no_init = run("adamw", init_device=None)[-1]["out"]
    assert not any("dist_init" in k for k in no_init)
    assert set(no_init) == {k for k in ref if "dist_init" not in k}


def test_eff_lr_sampling_for_large_layers():
    exact = run("adamw")[-1]["out"]
    sampled = run("adamw", eff_lr_samples=2000)[-1]["out"]   # layers hold ~10k Adam elements: sampled
    for q in ("q10", "median", "q90"):
        assert sampled[f"diag/adam/eff_lr_{q}/0"] != exact[f"diag/adam/eff_lr_{q}/0"]
        assert sampled[f"diag/adam/eff_lr_{q}/0"] == pytest.approx(exact[f"diag/adam/eff_lr_{q}/0"], rel=0.25)
    # a 1-D layer below the sample size stays exact
    assert sampled["diag/adam/eff_lr_median/final_norm"] == exact["diag/adam/eff_lr_median/final_norm"]


def test_schedule_and_collect_once():
    model = micro_model(torch.float64)
    opt = build_optimizer(model, "adamw", lr=1e-3)
    diag = Diagnostics(model, opt, every=2)
    assert [s for s in range(7) if diag.due(s)] == [2, 4, 6]
    seen = []
    for u, tokens in enumerate(random_batches(5)):
        lm_loss(model, tokens).backward()
        diag.before_step(u)
        opt.step()
        diag.after_step(u)
        opt.zero_grad()
        out = diag.collect()
        seen.append(bool(out))
        assert diag.collect() == {}            # each measurement is reported once
    assert seen == [False, True, False, True, False]
    with pytest.raises(ValueError, match="every"):
        Diagnostics(model, opt, every=0)


def test_loss_spikes():
    model = micro_model(torch.float64)
    opt = build_optimizer(model, "adamw", lr=1e-3)
    diag = Diagnostics(model, opt, every=1, spike_window=10, spike_threshold=0.1)
    losses = [5.0, 4.8, 4.7, 4.6, 4.5, 4.4, 5.5, 4.3, float("nan"), 4.2]
    for loss in losses:
        diag.observe_loss(loss)
    tokens = random_batches(1)[0]
    lm_loss(model, tokens).backward()
    diag.before_step(0)
    opt.step()
    diag.after_step(0)
    out = diag.collect()
    assert out["diag/global/loss_spike"] == 2.0             # 5.5 over a trailing median of 4.7, and the NaN
    assert out["diag/global/loss_spike_ratio"] == pytest.approx(5.5 / 4.7)
    diag.observe_loss(4.1)
    lm_loss(model, tokens).backward()
    diag.before_step(1)
    opt.step()
    diag.after_step(1)
    assert diag.collect()["diag/global/loss_spike"] == 0.0  # counted since the last record


def test_optimizer_reported_extras():
    class Reporting(torch.optim.SGD):
        def diagnostics(self, record):
            record.add_scalar("diag/opt/my_stat", torch.tensor(0.25))
            record.add_scalar("diag/opt/other", 2)

    model = micro_model(torch.float64)
    diag = Diagnostics(model, Reporting(model.parameters(), lr=0.1, momentum=0.9), every=1)
    opt = diag.optimizer
    lm_loss(model, random_batches(1)[0]).backward()
    diag.before_step(0)
    opt.step()
    diag.after_step(0)
    out = diag.collect()
    assert out["diag/opt/my_stat"] == 0.25 and out["diag/opt/other"] == 2.0
    assert "diag/head/w_over_m" in out        # torch SGD's momentum_buffer is found


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _distributed_worker(rank, world, port, out_dir):
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        tokens = random_batches(1)[0]
        results = {}
        # FSDP2: every rank holds shards; one all_reduce makes the full tensors' numbers
        sharded = micro_model(torch.float64)
        for block in sharded.model.layers:
            fully_shard(block)
        fully_shard(sharded)
        opt = torch.optim.AdamW(sharded.parameters(), lr=1e-3)
        diag = Diagnostics(sharded, opt, every=1)
        lm_loss(sharded, tokens).backward()
        diag.before_step(0)
        opt.step()
        diag.after_step(0)
        results["fsdp"] = diag.collect()
        # DDP-like replicas (plain tensors): only rank 0 measures
        plain = micro_model(torch.float64)
        opt = torch.optim.AdamW(plain.parameters(), lr=1e-3)
        diag = Diagnostics(plain, opt, every=1)
        results["replica_holds_w0"] = diag.w0 is not None
        lm_loss(plain, tokens).backward()
        diag.before_step(0)
        opt.step()
        diag.after_step(0)
        results["replica"] = diag.collect()
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(results, f)
    finally:
        dist.destroy_process_group()


def test_distributed_fsdp2_reduction_and_ddp_rank0_only(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_distributed_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2)
    r0 = json.loads((tmp_path / "rank0.json").read_text())
    r1 = json.loads((tmp_path / "rank1.json").read_text())
    # single-process reference on the same batch
    model = micro_model(torch.float64)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    diag = Diagnostics(model, opt, every=1)
    lm_loss(model, random_batches(1)[0]).backward()
    diag.before_step(0)
    opt.step()
    diag.after_step(0)
    ref = diag.collect()
    assert r1["replica"] == {} and not r1["replica_holds_w0"] and r0["replica_holds_w0"]
    for key, value in ref.items():
        close(r0["replica"][key], value, rtol=1e-12)
        if key.startswith("diag/adam/"):
            continue   # per-shard under FSDP (documented)
        close(r0["fsdp"][key], value, rtol=1e-9)
        close(r1["fsdp"][key], value, rtol=1e-9)
