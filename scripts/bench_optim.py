"""Optimizer-step benchmark on a flavor's parameter set (default 1B), bf16 and fp32 parameters.

For each optimizer: median step time (CUDA events), state bytes, the ratio to torch's fused AdamW
measured in the same run, and the fraction of the HBM floor: the bytes the step must move divided by
the device-to-device copy bandwidth measured in this run. Two times per step: "step" is the step in
isolation (the GPU waits for the host's launches, as a loop that syncs before each step would), and
"device" the GPU's own time with the host ahead (the GPU kept busy while the host queues the step, as in
training, where the host runs ahead of the backward pass). The floor fraction is of the device time.

SCALE, SGD-LL and EMA-Nesterov run their Triton kernels (llmopt/kernels/) on CUDA; the
"_eager" cases are the same optimizers with fused=False, measured in the same run.

Floors (b = bytes per element, N = elements): fused AdamW reads p, g, m, v and writes p, m, v: 7Nb.
SCALE reads g and p and writes p (one pass per row: a row fits on chip): 3Nb, plus 2b per lm_head
element for its momentum and b per embedding element (the embedding is normalized by columns of 32000 rows,
too tall to keep on chip: its gradient is read once for the column RMS, again for the update). SGD-LL needs
two passes (the per-tensor RMS clip needs the whole tensor's norm before any element is written): read g, m,
write m; read m, p, write p: 6Nb. EMA-Nesterov's own work: pre_forward reads p, m and writes p; after the base
step it reads p, prev, m and writes m, prev: 8Nb. Muon is bound by its matrix products, not memory: no floor
is given. Two Muon cases: "muon" is MuonWithAdamW as trained (BatchedMuon: Newton-Schulz batched over
same-shape matrices), "muon_torch_old" the same with torch.optim.Muon (the old path, `batched=False`); the
"x torchMuon" column is their ratio.

`--launch NAME=VALUE[,NAME=VALUE]` (repeatable) times each case again under other launch shapes of the Triton
kernels (the constants of LAUNCH_SHAPES in llmopt/kernels/common.py, e.g. ROW_WARPS=8,ROW_ELEMENTS_PER_PROGRAM=4096):
a launch sweep on a new device in one run, each extra row named "case[NAME=VALUE]" (device time only).
`--row-shapes` (with the scale case) times SCALE's row kernel alone for each weight shape, against the bytes it
moves: which shapes hold the kernel below its floor (rows "scale rows SHAPE xCOUNT", per launch shape too).

Without CUDA it times on the CPU (wall clock, no bandwidth or floors): a smoke test, e.g.
  python scripts/bench_optim.py --flavor tiny --cases muon muon_torch_old --steps 3

Usage: python scripts/bench_optim.py [--flavor 1b] [--dtypes bf16 fp32] [--cases ...] [--steps 15] [--out results.json]
       [--profile] [--launch NAME=VALUE[,NAME=VALUE] ...] [--row-shapes]
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from unittest import mock

import torch

from llmopt.kernels import common as kernel_common
from llmopt.kernels import rows as row_kernels
from llmopt.model import build_model, llama_config
from llmopt.optim import build_optimizer, classify_parameters, state_bytes

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def copy_bandwidth(device, nbytes=2 << 30) -> float:
    """Bytes moved per second (read + write) by a device-to-device copy."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = []
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * src.numel() * src.element_size() / statistics.median(times)


HOST_AHEAD_CYCLES = 200_000_000  # ~0.1 s of GPU sleep before each timed step: longer than any step's host work


def time_steps(opt, steps=15, warmup=3, cuda=True, host_ahead=False) -> float:
    """Median seconds per optimizer step (pre_forward included for a lookahead wrapper); host_ahead: the
    GPU's time alone (it sleeps while the host queues the step)."""
    def one():
        if hasattr(opt, "pre_forward"):
            opt.pre_forward()
        opt.step()
    return time_calls(one, steps, warmup, cuda, host_ahead)


def time_calls(one, steps=15, warmup=3, cuda=True, host_ahead=False) -> float:
    """Median seconds per call of `one` (CUDA events; host_ahead: the GPU's time alone), or wall clock on CPU."""
    for _ in range(warmup):
        one()
    if cuda:
        torch.cuda.synchronize()
    times = []
    for _ in range(steps):
        if not cuda:
            t0 = time.perf_counter()
            one()
            times.append(time.perf_counter() - t0)
            continue
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        if host_ahead:
            torch.cuda._sleep(HOST_AHEAD_CYCLES)
        start.record()
        one()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


CASES = {
    "adamw_fused": ("adamw", {"lr": 1e-3, "fused": True}, None),
    "adamw_foreach": ("adamw", {"lr": 1e-3, "fused": False}, None),
    "scale": ("scale", {"lr": 1e-3}, None),
    "sgd_ll": ("sgd_ll", {"lr": 100.0}, None),
    "muon": ("muon", {"lr": 0.02}, None),                                     # BatchedMuon + AdamW
    "muon_torch_old": ("muon", {"lr": 0.02, "batched": False}, None),        # torch.optim.Muon + AdamW
    "ema_nesterov(adamw_fused)": ("adamw", {"lr": 1e-3, "fused": True}, {"beta": 0.5, "gamma": 0.99}),
    # the eager code paths of the Triton-fused optimizers (fused=False), for the before/after in one run
    "scale_eager": ("scale", {"lr": 1e-3, "fused": False}, None),
    "sgd_ll_eager": ("sgd_ll", {"lr": 100.0, "fused": False}, None),
    "ema_nesterov_eager(adamw_fused)": ("adamw", {"lr": 1e-3, "fused": True},
                                        {"beta": 0.5, "gamma": 0.99, "fused": False}),
}


def parse_launch(text: str) -> dict[str, int]:
    """"ROW_WARPS=8,ELEMENTS_PER_PROGRAM=4096" -> {"ROW_WARPS": 8, ...}: launch constants of llmopt.kernels.common,
    each a power of two (Triton's block sizes and warp counts must be)."""
    shapes = {}
    for item in text.split(","):
        name, _, value = item.partition("=")
        try:
            kernel_common.check_launch_constants([name])
        except ValueError as err:
            raise ValueError(f"--launch {text!r}: {err}") from None
        if not value.isdigit() or int(value) < 1 or int(value) & (int(value) - 1):
            raise ValueError(f"--launch {text!r}: {name} must be a power of two, got {value!r}")
        shapes[name] = int(value)
    return shapes


def launch_shapes(shapes: dict[str, int]):
    """A context in which the Triton kernels launch with these constants (on every device; restored after it)."""
    return mock.patch.dict(kernel_common.launch_overrides, shapes)


def floor_bytes(case: str, n: int, n_head: int, n_embed: int, b: int) -> float | None:
    """The bytes a step must move (the module docstring's floors): n elements in all, n_head in lm_head, n_embed in
    the input embedding, b bytes each. None where no floor is given."""
    if case.startswith("adamw"):
        return 7 * n * b
    if case.startswith("scale"):
        return 3 * n * b + 2 * n_head * b + n_embed * b
    if case.startswith("sgd_ll"):
        return 6 * n * b
    return None


def row_kernel_rows(model, steps: int, cuda: bool, bandwidth: float | None, references: bool = True) -> list[dict]:
    """SCALE's row kernel alone (row_kernels.row_normalized_update_, one launch per shape), per weight shape of the
    model: the hidden matrices, and lm_head with its momentum (the roles SCALE sends to it; the step's row-kernel
    calls, one shape at a time, on fresh random gradients). Rows as main()'s, the case named "scale rows SHAPE
    xCOUNT"; the floor is the bytes the kernel moves: 3 per element (read g and p, write p), 5 with the momentum.
    With `references`, beside each shape without momentum the same bytes moved with no reduction (torch's in-place
    add, over the tensors and over one flat tensor: "add_ SHAPE xCOUNT", "add_ flat N"): what a plain stream
    reaches."""
    roles = classify_parameters(model)
    by_shape: dict[tuple, list] = {}
    for p in roles.params("matrix"):
        by_shape.setdefault(tuple(p.shape), []).append(p)
    groups = [(params, False) for params in by_shape.values()] + [([head], True) for head in roles.params("output")]
    rows = []
    for params, momentum in groups:
        grads = [torch.randn_like(p) * 1e-3 for p in params]
        directions = [torch.zeros_like(p) for p in params] if momentum else grads
        one = functools.partial(row_kernels.row_normalized_update_, params, directions, 1e-3,
                                grads=grads if momentum else None, weight=0.1)
        moved = (5 if momentum else 3) * sum(p.numel() * p.element_size() for p in params)
        shape = "x".join(map(str, params[0].shape))
        timed = [(f"scale rows {shape} x{len(params)}" + (" +momentum" if momentum else ""), one)]
        if references and not momentum:  # the same bytes, no reduction: torch's add, per tensor and one flat tensor
            flat_params, flat_grads = (torch.cat([t.flatten() for t in ts]) for ts in (params, grads))
            timed += [(f"add_ {shape} x{len(params)}", functools.partial(torch._foreach_add_, params, grads,
                                                                          alpha=-1e-3)),
                      (f"add_ flat {flat_params.numel()}", functools.partial(flat_params.add_, flat_grads,
                                                                              alpha=-1e-3))]
            del flat_params, flat_grads  # held by the partial until `timed` goes
        for case, call in timed:
            with torch.no_grad():
                seconds = time_calls(call, steps, cuda=cuda, host_ahead=cuda)
            rows.append({"case": case, "step_ms": None if cuda else seconds * 1e3,
                         "device_ms": seconds * 1e3 if cuda else None, "state_gb": 0.0,
                         "floor_ms": moved / bandwidth * 1e3 if bandwidth else None, "wall_s": None, "part": True})
        del grads, directions, timed  # and the flat copies with them, before the next shape's tensors
    return rows


def print_profile(case: str, dtype_name: str, opt) -> None:
    """Where the step's time goes: the kernels of 3 steps by device time, and the host's view."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        time_steps(opt, steps=3, warmup=0, cuda=torch.cuda.is_available())
    sort = "cuda_time_total" if torch.cuda.is_available() else "cpu_time_total"
    print(f"--- profile: {case} {dtype_name} (3 steps)")
    print(prof.key_averages().table(sort_by=sort, row_limit=10, max_name_column_width=60))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--flavor", default="1b")
    ap.add_argument("--dtypes", nargs="+", default=["bf16", "fp32"], choices=list(DTYPES))
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    ap.add_argument("--steps", type=int, default=15, help="timed steps per case (after 3 warm-up steps)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--profile", action="store_true", help="print each case's kernels by device time")
    ap.add_argument("--row-shapes", action="store_true",
                    help="with the scale case: its row kernel alone, per weight shape (and per --launch)")
    ap.add_argument("--launch", action="append", default=[], metavar="NAME=VALUE[,NAME=VALUE]",
                    help="time each case again with these launch constants of llmopt.kernels.common (repeatable)")
    args = ap.parse_args(argv)
    try:  # bad input refused before any work
        launches = [(text, parse_launch(text)) for text in args.launch]
    except ValueError as err:
        ap.error(str(err))
    cuda = torch.cuda.is_available()
    if args.row_shapes and ("scale" not in args.cases
                            or not kernel_common.available([torch.zeros(1, device="cuda" if cuda else "cpu")])):
        ap.error("--row-shapes times SCALE's Triton row kernel: it needs the scale case and a CUDA device (or "
                 "TRITON_INTERPRET=1 on the CPU)")
    if not cuda:
        print("no CUDA device: timing on the CPU (wall clock; no bandwidth, no floors)", file=sys.stderr)
    device = torch.device("cuda" if cuda else "cpu")
    bandwidth = copy_bandwidth(device) if cuda else None
    rows = []
    for dtype_name in args.dtypes:
        dtype = DTYPES[dtype_name]
        for case in args.cases:
            name, hparams, lookahead = CASES[case]
            model = build_model(llama_config(args.flavor), device="meta")
            model.to_empty(device=device)
            model.to(dtype)
            with torch.no_grad():
                for p in model.parameters():
                    p.normal_(0, 0.02)
                    p.grad = torch.randn_like(p) * 1e-3
            opt = build_optimizer(model, name, lookahead=lookahead, **hparams)
            params = list(model.parameters())
            t0 = time.perf_counter()
            seconds = time_steps(opt, steps=args.steps, cuda=cuda)
            device_seconds = time_steps(opt, steps=args.steps, cuda=cuda, host_ahead=True) if cuda else None
            if args.profile:
                print_profile(case, dtype_name, opt)
            n = sum(p.numel() for p in params)
            b = torch.tensor([], dtype=dtype).element_size()
            floor = floor_bytes(case, n, model.lm_head.weight.numel(), model.get_input_embeddings().weight.numel(),
                                b)
            if case.startswith("ema_nesterov"):
                floor = 8 * n * b  # the wrapper's own work, reported against its base below
            row = {"case": case, "dtype": dtype_name, "step_ms": seconds * 1e3,
                   "device_ms": device_seconds * 1e3 if device_seconds else None, "state_gb": state_bytes(opt) / 1e9,
                   "floor_ms": floor / bandwidth * 1e3 if floor and bandwidth else None,
                   "wall_s": time.perf_counter() - t0}
            rows.append(row)
            print(json.dumps(row), flush=True)
            for text, shapes in launches:  # the same optimizer and state, other launch shapes
                with launch_shapes(shapes):
                    seconds = time_steps(opt, steps=args.steps, cuda=cuda, host_ahead=cuda)
                rows.append({**row, "case": f"{case}[{text}]", "step_ms": None if cuda else seconds * 1e3,
                             "device_ms": seconds * 1e3 if cuda else None, "wall_s": None})
                print(json.dumps(rows[-1]), flush=True)
            if args.row_shapes and case == "scale":
                for text, shapes in [("", {}), *launches]:
                    with launch_shapes(shapes):
                        parts = row_kernel_rows(model, args.steps, cuda, bandwidth, references=not text)
                    for part in parts:
                        rows.append({**part, "dtype": dtype_name,
                                     "case": part["case"] + (f" [{text}]" if text else "")})
                        print(json.dumps(rows[-1]), flush=True)
            del opt, model, params
            if cuda:
                torch.cuda.empty_cache()
    by = {(r["case"], r["dtype"]): r for r in rows}
    for r in rows:
        base = None if r.get("part") else by.get(("adamw_fused", r["dtype"]))  # a part of a step: no ratios
        r["x_fused_adamw"] = r["step_ms"] / base["step_ms"] if base and r["step_ms"] else None
        r["device_x_fused_adamw"] = r["device_ms"] / base["device_ms"] if base and r["device_ms"] else None
        old_muon = by.get(("muon_torch_old", r["dtype"]))
        muon = old_muon and r["case"] == "muon"
        r["x_torch_muon"] = r["step_ms"] / old_muon["step_ms"] if muon and r["step_ms"] else None
        r["device_x_torch_muon"] = r["device_ms"] / old_muon["device_ms"] if muon and r["device_ms"] else None
        own = r["device_ms"] or r["step_ms"]
        if r["case"].startswith("ema_nesterov") and base:
            own -= base["device_ms"] or base["step_ms"]
            r["own_ms"] = own
        r["floor_fraction"] = r["floor_ms"] / own if r["floor_ms"] and own > 0 else None
    meta = {"device": torch.cuda.get_device_name(device) if cuda else "cpu", "torch": torch.__version__,
            "flavor": args.flavor, "copy_bandwidth_tb_s": bandwidth / 1e12 if bandwidth else None,
            "date": time.strftime("%Y-%m-%d")}
    print(json.dumps(meta))
    print(f"{'case':36} {'dtype':5} {'step ms':>9} {'device ms':>9} {'x fusedAdamW':>12} {'(device)':>8} "
          f"{'x torchMuon':>11} {'(device)':>8} {'floor ms':>9} {'of floor':>8} {'state GB':>9}")

    def fmt(value, spec):
        return format(value, spec) if value else "-"
    for r in rows:
        print(f"{r['case']:36} {r['dtype']:5} {fmt(r['step_ms'], '9.2f'):>9} {fmt(r['device_ms'], '9.2f'):>9} "
              f"{fmt(r['x_fused_adamw'], '.2f'):>12} {fmt(r['device_x_fused_adamw'], '.2f'):>8} "
              f"{fmt(r['x_torch_muon'], '.3f'):>11} {fmt(r['device_x_torch_muon'], '.3f'):>8} "
              f"{fmt(r['floor_ms'], '.2f'):>9} "
              f"{fmt(r['floor_fraction'], '.0%'):>8} {r['state_gb']:9.2f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
