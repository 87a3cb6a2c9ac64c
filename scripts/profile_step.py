"""Where the time of a compiled training step goes, for the model alone.

For each variant (micro-batch x loss head x rotary embedding x attention x compile mode): the flavor's
LlamaForCausalLM in pure bf16 inside llmopt's CausalLMLoss (rotary "table": llmopt's RotaryTable, as the trainer runs
it; "hf": transformers' module; attention as trainer.attention: "sdpa" or "transformers"), torch.compile'd,
fused AdamW, random tokens (no data pipeline, no trainer): tokens/s and MFU (median step), peak memory and compile
time. With --profile, torch.profiler on a few steps of each variant splits the GPU time by kernel kind (matmul,
attention, Triton-generated, optimizer, other) and gives the GPU's busy fraction of the wall time (below 100%: the
host does not keep it fed); a second profiled pass times the matrix products by shape (TFLOP/s per shape).

Usage: python scripts/profile_step.py --flavor 60m --micro 64 128 256 --heads plain one_pass chunked [--rotary table hf]
       [--attention sdpa transformers]
       [--modes default] [--profile] [--out results.jsonl]
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time
from collections import defaultdict

import torch

# kernel-name fragments, first match wins (liger-kernel's kernels are Triton too)
KINDS = [("attention", ("flash", "fmha", "attention")), ("optimizer", ("multi_tensor", "adam")),
         ("matmul", ("gemm", "nvjet", "cutlass", "sm90", "sm80", "xmma", "cublas")), ("triton", ("triton", "liger"))]


def kernel_kind(name: str) -> str:
    lowered = name.lower()
    for kind, fragments in KINDS:
        if any(f in lowered for f in fragments):
            return kind
    return "other"


def profiled(step, steps: int, cpu: bool = False):
    """torch.profiler over `steps` steps, the GPU's work included: the profile and the wall seconds. With `cpu`
    the host's ops too, with their input shapes (which slows the host)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA] if cpu else [ProfilerActivity.CUDA]
    torch.cuda.synchronize()
    with profile(activities=activities, record_shapes=cpu) as prof:
        started = time.perf_counter()
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
        wall = time.perf_counter() - started
    return prof, wall


def profile_breakdown(step, steps: int = 3) -> dict:
    """GPU milliseconds per step by kernel kind, and the busy fraction of the wall time."""
    prof, wall = profiled(step, steps)
    by_kind: dict[str, float] = defaultdict(float)
    by_name: dict[str, float] = defaultdict(float)
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            ms = event.device_time_total / 1e3 / steps  # us -> ms per step
            by_kind[kernel_kind(event.name)] += ms
            by_name[event.name[:80]] += ms
    busy = sum(by_kind.values()) / (wall * 1e3 / steps)
    top = sorted(by_name.items(), key=lambda kv: -kv[1])[:25]
    return {"gpu_ms": {k: round(v, 2) for k, v in sorted(by_kind.items())}, "gpu_busy": round(busy, 3),
            "top_kernels_ms": {k: round(v, 2) for k, v in top}}


MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")


def matmul_flops(op: str, shapes: list) -> int:
    """2 x m x k x n (x batch) of one product, from its operands' shapes as torch.profiler records them."""
    if op in ("aten::addmm", "aten::baddbmm"):
        shapes = shapes[1:]  # the added tensor comes first
    a, b = shapes[0], shapes[1]
    batch = a[0] if len(a) == 3 else 1
    return 2 * batch * a[-2] * a[-1] * b[-1]


def matmul_shapes(averages, steps: int, on_device: bool = True) -> list[dict]:
    """Per matrix-product shape: products per step, ms per step and TFLOP/s, from torch.profiler's
    key_averages(group_by_input_shape=True) (device time; the CPU's with on_device=False). Slowest first."""
    rows = []
    for avg in averages:
        if avg.key not in MATMUL_OPS or not avg.input_shapes:
            continue
        us = avg.self_device_time_total if on_device else avg.self_cpu_time_total
        flops = matmul_flops(avg.key, avg.input_shapes) * avg.count
        rows.append({"op": avg.key, "shapes": [s for s in avg.input_shapes if s], "per_step": avg.count / steps,
                     "ms": us / 1e3 / steps, "tflop_s": flops / (us * 1e-6) / 1e12 if us else None})
    return sorted(rows, key=lambda r: -r["ms"])


def profile_matmuls(step, steps: int = 2) -> list[dict]:
    """The matrix products of `steps` steps by shape. A pass of its own: recording shapes slows the host, which
    would lower profile_breakdown's busy fraction."""
    prof, _ = profiled(step, steps, cpu=True)
    return matmul_shapes(prof.key_averages(group_by_input_shape=True), steps)


def run_variant(flavor: str, micro: int, head: str, rotary: str, attention: str, mode: str, seq: int, steps: int,
                profile: bool) -> dict:
    from llmopt.metrics.throughput import peak_flops
    from llmopt.model import build_model, flops_per_token, llama_config, use_rotary_table
    from llmopt.model.attention import use_attention
    from llmopt.model.loss import CausalLMLoss

    device = torch.device("cuda")
    torch._dynamo.reset()
    torch.cuda.reset_peak_memory_stats()
    config = llama_config(flavor)
    model = build_model(config, device=device, dtype=torch.bfloat16)
    if rotary == "table":
        use_rotary_table(model)
    use_attention(model, attention)
    loss_model = torch.compile(CausalLMLoss(model, head=head),
                               mode=None if mode == "default" else mode)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    tokens = torch.randint(0, config.vocab_size, (micro, seq), device=device)

    def step():
        loss_sum, count = loss_model(tokens, tokens)
        (loss_sum / count).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    started = time.perf_counter()
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    compile_s = time.perf_counter() - started
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    tok_s = micro * seq / statistics.median(times)
    row = {"flavor": flavor, "micro": micro, "head": head, "rotary": rotary, "attention": attention,
           "mode": mode, "tok_s": round(tok_s),
           "mfu": round(tok_s * flops_per_token(config, seq) / peak_flops(device), 3),
           "step_ms": round(statistics.median(times) * 1e3, 2), "compile_s": round(compile_s, 1),
           "peak_gb": round(torch.cuda.max_memory_allocated() / 1e9, 2)}
    if profile:
        row.update(profile_breakdown(step))
        row["matmuls"] = profile_matmuls(step)
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--flavor", default="60m")
    ap.add_argument("--micro", type=int, nargs="+", default=[64, 128, 256])
    ap.add_argument("--heads", nargs="+", default=["plain", "one_pass"], choices=["plain", "one_pass", "chunked"],
                    help="how lm_head + cross-entropy run (llmopt.model.loss.CausalLMLoss)")
    ap.add_argument("--rotary", nargs="+", default=["table"], choices=["table", "hf"])
    ap.add_argument("--attention", nargs="+", default=["sdpa"], choices=["sdpa", "transformers"],
                    help="SDPA with is_causal, or transformers' masks (trainer.attention)")
    ap.add_argument("--modes", nargs="+", default=["default"],
                    help="torch.compile modes: default, max-autotune-no-cudagraphs, reduce-overhead, ...")
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("profile_step.py needs a CUDA device")

    rows = []
    variants = itertools.product(args.modes, args.micro, args.heads, args.rotary, args.attention)
    for mode, micro, head, rotary, attention in variants:
        try:
            row = run_variant(args.flavor, micro, head, rotary, attention, mode, args.seq, args.steps, args.profile)
        except Exception as e:  # recorded, and the other variants still run (e.g. out of memory)
            torch.cuda.empty_cache()
            row = {"flavor": args.flavor, "micro": micro, "head": head, "rotary": rotary, "attention": attention,
                   "mode": mode, "error": f"{type(e).__name__}: {str(e)[:300]}"}
        torch.cuda.empty_cache()  # the variant's model is gone with its frame
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")
    print(f"\n{'flavor':6} {'micro':>5} {'head':8} {'rotary':6} {'attention':12} {'mode':26} {'tok/s':>10} {'MFU':>5} "
          f"{'peak GB':>7} {'busy':>5}")
    for r in rows:
        name = f"{r['flavor']:6} {r['micro']:5} {r['head']:8} {r['rotary']:6} {r['attention']:12} {r['mode']:26}"
        if "error" in r:
            print(f"{name} failed: {r['error'][:60]}")
            continue
        print(f"{name} {r['tok_s']:10,} {r['mfu']:5.0%} "
              f"{r['peak_gb']:7.1f} {r.get('gpu_busy', float('nan')):5.0%}")
    for r in rows:
        if r.get("matmuls"):
            print(f"\nmatrix products, {r['flavor']} micro-batch {r['micro']} {r['head']} {r['mode']} (per step):")
            print(f"{'ms':>8} {'count':>6} {'TFLOP/s':>8}  shapes")
            for m in r["matmuls"]:
                print(f"{m['ms']:8.2f} {m['per_step']:6g} {m['tflop_s'] or 0:8.0f}  {m['op']} {m['shapes']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
