"""Peak training memory per flavor and optimizer at a fixed micro-batch, against the papers' accounting.

For each flavor x optimizer: the model (pure bf16, as the papers train), CausalLMLoss, the optimizer
built by the registry, and a few steps on random tokens at one fixed micro-batch (eager, no
activation checkpointing). Reported, in GB (1e9 B): the peak allocated memory, and what makes it up
as measured: weights, gradients, optimizer state (every state tensor, each storage once), and the
rest of the peak (activations and temporaries); beside them the papers' accounting (weights + state,
everything counted in bf16), the same units for the states llmopt's optimizer holds ("llmopt": Muon's
AdamW keeps two moments on the embedding, lm_head and norms, where the paper counts one per parameter)
and the trainer's pre-flight estimate (weights + gradients + state, which
it compares to the device's memory before allocating anything).

Without CUDA it runs on the CPU (peak = the process's resident set; a smoke test), e.g.
  python scripts/bench_memory.py --flavors micro --optimizers adamw scale --micro-batch 2

Usage: python scripts/bench_memory.py [--flavors 60m 130m 350m 1b] [--optimizers ...] [--micro-batch 8]
       [--seq-len 256] [--out rows.jsonl]
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from llmopt.accounting import estimate_train_bytes, llmopt_memory_gb, paper_memory_gb
from llmopt.model import build_model, llama_config, param_counts
from llmopt.model.loss import CausalLMLoss
from llmopt.optim import build_optimizer, state_bytes

OPTIMIZERS = {  # name in the table: (registry name, hyper-parameters, lookahead, accounting name)
    "adamw": ("adamw", {"lr": 1e-3, "fused": True}, None, "adamw"),
    "muon": ("muon", {"lr": 0.02}, None, "muon"),
    "sgd_ll": ("sgd_ll", {"lr": 100.0}, None, "sgd_ll"),
    "scale": ("scale", {"lr": 1e-3}, None, "scale"),
    "ema+scale": ("scale", {"lr": 1e-3}, {"beta": 0.5, "gamma": 0.99}, "scale"),
}


def measure(flavor: str, optimizer: str, micro_batch: int, seq_len: int, steps: int, device) -> dict:
    name, hparams, lookahead, accounting = OPTIMIZERS[optimizer]
    config = llama_config(flavor)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    model = build_model(config, device=device, dtype=torch.bfloat16)
    loss_model = CausalLMLoss(model)
    opt = build_optimizer(model, name, lookahead=lookahead, **hparams)
    tokens = torch.randint(0, config.vocab_size, (micro_batch, seq_len), device=device)
    for _ in range(steps):
        if hasattr(opt, "pre_forward"):
            opt.pre_forward()
        loss_sum, count = loss_model(tokens, tokens)
        (loss_sum / count).backward()
        opt.step()
        opt.zero_grad(set_to_none=False)  # keep the gradients: they are part of the steady state
    if cuda:
        torch.cuda.synchronize(device)
    from llmopt.metrics.throughput import peak_memory_bytes

    params = list(model.parameters())
    weights = sum(p.numel() * p.element_size() for p in params)
    grads = sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None)
    state = state_bytes(opt)
    peak = peak_memory_bytes(device)
    counts = param_counts(config)
    row = {"flavor": flavor, "optimizer": optimizer, "micro_batch": micro_batch, "seq_len": seq_len,
           "peak_gb": peak / 1e9, "weights_gb": weights / 1e9, "grads_gb": grads / 1e9, "state_gb": state / 1e9,
           "rest_gb": (peak - weights - grads - state) / 1e9,
           "paper_gb": paper_memory_gb(flavor, accounting, "ema_nesterov" if lookahead else None),
           "llmopt_gb": llmopt_memory_gb(flavor, accounting, "ema_nesterov" if lookahead else None),
           "estimate_gb": estimate_train_bytes(counts, accounting, "ema_nesterov" if lookahead else None,
                                               "bf16_pure") / 1e9}
    del opt, loss_model, model, params
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--flavors", nargs="+", default=["60m", "130m", "350m", "1b"])
    ap.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS), choices=list(OPTIMIZERS))
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--out", default=None, help="append each row to this JSON-lines file as it finishes")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        print("no CUDA device: measuring on the CPU (peak = resident set size)", file=sys.stderr)
    rows = []
    for flavor in args.flavors:
        for optimizer in args.optimizers:
            try:
                row = measure(flavor, optimizer, args.micro_batch, args.seq_len, args.steps, device)
            except torch.OutOfMemoryError as err:
                row = {"flavor": flavor, "optimizer": optimizer, "error": f"OutOfMemoryError: {err}"[:300]}
            rows.append(row)
            print(json.dumps(row), flush=True)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps(row) + "\n")
    meta = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
    print(json.dumps(meta))
    print(f"{'flavor':6} {'optimizer':10} {'peak':>7} {'weights':>8} {'grads':>7} {'state':>7} {'rest':>7} "
          f"{'paper':>7} {'llmopt':>7} {'estimate':>8}   "
          f"(GB, micro-batch {args.micro_batch} x {args.seq_len}, pure bf16)")
    for r in rows:
        if "error" in r:
            print(f"{r['flavor']:6} {r['optimizer']:10} {r['error'][:80]}")
            continue
        print(f"{r['flavor']:6} {r['optimizer']:10} {r['peak_gb']:7.2f} {r['weights_gb']:8.2f} {r['grads_gb']:7.2f} "
              f"{r['state_gb']:7.2f} {r['rest_gb']:7.2f} {r['paper_gb']:7.2f} {r['llmopt_gb']:7.2f} "
              f"{r['estimate_gb']:8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
