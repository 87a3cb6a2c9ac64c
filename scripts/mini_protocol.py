#!/usr/bin/env python
"""The mini-protocol of benchmarks/mini_protocol.md: every optimizer on real text, one GPU, one process.

    python scripts/mini_protocol.py [--runs NAME ...] [--out benchmarks/mini_protocol/runs] [--archive DIR]
    python scripts/mini_protocol.py --table            # the results table (markdown) of what is in --out
    python scripts/mini_protocol.py --list             # the runs and their overrides

Every run is `python -m llmopt.train experiment=mini_protocol <overrides>` (configs/experiment/
mini_protocol.yaml: LLaMA 60M, Wikipedia + C4 packed, 512 x 256 tokens per step, 1000 steps), run in
this process so that the model is compiled once per precision: llmopt.train.run.ModelCache gives each run
the same initial weights in the same (compiled) parameters. The data order is the same for every run
(data.shuffle_seed).

A finished run leaves <out>/<name>/ with result.json (evaluations, throughput, memory), config.yaml and
metrics.jsonl.gz (what scripts/plot_runs.py draws); a run whose result.json exists is skipped, so the
protocol can be spread over several invocations (or GPU sessions). A run stopped by a non-finite loss
(the trainer's NonFiniteError) is a result too, marked "diverged"; a run that collapses to a finite
plateau is not caught by that and shows as a finished run with its (poor) perplexities. --archive DIR also writes
DIR/<name>.tar.gz per finished run (for machines that send back only a few files).
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import shutil
import statistics
import sys
import tarfile
import time
from pathlib import Path

from llmopt.metrics.loggers import read_metrics

ROOT = Path(__file__).resolve().parents[1]

# The papers' values (configs/optimizer/*.yaml) unless stated. AdamW and SCALE get a 3-point learning-rate
# sweep up from the papers' 1e-3 so that neither is handicapped at this short horizon; both also run in
# amp_bf16 at that lr. EMA-Nesterov's window is the paper's 750-2000 of 2500 steps scaled to 300-800 of 1000,
# around the same base run as the plain base (adamw_lr1e-3, muon).
EMA_WINDOW = ["lookahead=ema_nesterov", "lookahead.start_step=300", "lookahead.end_step=800",
              "lookahead.gamma=0.99", "lookahead.init=first_update"]
RUNS: dict[str, list[str]] = {
    "adamw_lr1e-3": ["optimizer=adamw", "optimizer.lr=1e-3"],
    "scale_lr1e-3": ["optimizer=scale", "optimizer.lr=1e-3"],
    "sgd_lr0.5": ["optimizer=sgd", "optimizer.lr=0.5"],
    "sgd_lr0.2": ["optimizer=sgd", "optimizer.lr=0.2"],
    "sgd_lr0.1": ["optimizer=sgd", "optimizer.lr=0.1"],
    "sgd_lr0.05": ["optimizer=sgd", "optimizer.lr=0.05"],
    "sgd_ll": ["optimizer=sgd_ll"],                                  # lr 100, tau 5e-4, delta 1e-3 (130M values)
    "column_lr1e-3": ["optimizer=scale", "optimizer.lr=1e-3", "optimizer.momentum_on=none"],  # SCALE's ablation
    "adamw_lr1e-3_ema": ["optimizer=adamw", "optimizer.lr=1e-3", *EMA_WINDOW, "lookahead.beta=0.5"],
    "muon": ["optimizer=muon"],                                      # lr 0.02, AdamW 1e-3 on the rest
    "muon_ema": ["optimizer=muon", *EMA_WINDOW, "lookahead.beta=0.7"],
    "adamw_lr2e-3": ["optimizer=adamw", "optimizer.lr=2e-3"],
    "scale_lr2e-3": ["optimizer=scale", "optimizer.lr=2e-3"],
    "adamw_lr4e-3": ["optimizer=adamw", "optimizer.lr=4e-3"],
    "scale_lr4e-3": ["optimizer=scale", "optimizer.lr=4e-3"],
    "scale_lr5e-4": ["optimizer=scale", "optimizer.lr=5e-4"],   # SCALE's best was the sweep's lowest lr
    "scale_lr2.5e-4": ["optimizer=scale", "optimizer.lr=2.5e-4"],  # and again on the mixed order (5e-4 best)
    "adamw_lr1e-3_amp": ["optimizer=adamw", "optimizer.lr=1e-3", "trainer.precision=amp_bf16"],
    "scale_lr1e-3_amp": ["optimizer=scale", "optimizer.lr=1e-3", "trainer.precision=amp_bf16"],
    # the SGD-LL paper trains SGD and SGD-LL in amp_bf16 (fp32 weights): both, at the stable SGD lr found above
    "sgd_ll_amp": ["optimizer=sgd_ll", "trainer.precision=amp_bf16"],
    "sgd_lr0.1_amp": ["optimizer=sgd", "optimizer.lr=0.1", "trainer.precision=amp_bf16"],
    "galore": ["optimizer=galore"],                                  # lr 0.01, rank 128, gap 200, scale 0.25
    "apollo": ["optimizer=apollo"],                                  # lr 0.01, rank 128, channel-wise
}
# SGD at the paper's lr 0.5 may diverge at this batch and precision: each lower lr runs only if the one above
# diverged, so that the table shows the largest stable lr
ONLY_IF_DIVERGED = {"sgd_lr0.2": "sgd_lr0.5", "sgd_lr0.1": "sgd_lr0.2", "sgd_lr0.05": "sgd_lr0.1"}
HORIZONS = (250, 500, 1000)
EVAL_SETS = {"c4": "eval/", "wiki": "eval/wiki/"}


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return hydra_compose("train", overrides=["experiment=mini_protocol", *overrides])


def result_of(name: str, overrides: list[str], summary: dict, records: list[dict], wall_s: float,
              diverged: str | None = None) -> dict:
    """What the table needs from one run: the evaluations at every eval step, throughput and memory;
    `diverged` is the error of a run stopped by a non-finite loss."""
    evals = {str(r["step"]): {s: {"loss": r[p + "loss"], "ppl": r[p + "ppl"], "paper_loss": r[p + "paper_loss"]}
                              for s, p in EVAL_SETS.items() if p + "loss" in r}
             for r in records if "eval/loss" in r}
    logs = [r for r in records if "perf/token_slots_per_s" in r]
    steady = logs[1:] or logs  # the first interval holds compilation
    first = next((r for r in records if "memory/optimizer_state_gb" in r), {})
    return {"name": name, "overrides": overrides, "evals": evals,
            "final_train_loss": logs[-1]["train/loss"] if logs else None,
            "tokens_per_s": statistics.median(r["perf/token_slots_per_s"] for r in steady) if steady else None,
            "mfu": statistics.median(r["perf/mfu"] for r in steady) if steady and "perf/mfu" in steady[0] else None,
            "data_wait_frac": statistics.median(r["perf/data_wait_frac"] for r in steady) if steady else None,
            "peak_memory_gb": max((r["perf/peak_memory_gb"] for r in logs), default=None),
            "optimizer_state_gb": first.get("memory/optimizer_state_gb"),
            "paper_memory_gb": first.get("memory/paper_gb"), "diverged": diverged,
            "steps": summary.get("step", max((r["step"] for r in records), default=0)),
            "tokens_seen": summary.get("tokens_seen"), "wall_s": wall_s, "device": device_name(),
            "versions": versions()}


def device_name() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def versions() -> dict:
    import torch
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__}


def run_one(name: str, overrides: list[str], out: Path, work: Path, models, archive: Path | None) -> dict:
    from llmopt.train.run import run
    from llmopt.train.trainer import NonFiniteError

    run_dir = work / name
    shutil.rmtree(run_dir, ignore_errors=True)   # a run cut off earlier starts over
    cfg = compose([*overrides, f"checkpoint.dir={run_dir / 'checkpoints'}"])
    t0 = time.perf_counter()
    try:
        summary, diverged = run(cfg, run_dir, models=models), None
    except NonFiniteError as exc:                 # a result too: the lr is past this optimizer's stable range
        summary, diverged = {}, str(exc).split(";")[0]
    wall = time.perf_counter() - t0
    records = read_metrics(run_dir / "metrics.jsonl")
    result = result_of(name, overrides, summary, records, wall, diverged)
    dest = out / name
    tmp = out / f".{name}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shutil.copy(run_dir / "config.yaml", tmp / "config.yaml")
    (tmp / "metrics.jsonl.gz").write_bytes(gzip.compress((run_dir / "metrics.jsonl").read_bytes(), mtime=0))
    (tmp / "result.json").write_text(json.dumps(result, indent=1))
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)                              # result.json appears only with the rest of the run
    if archive is not None:
        archive.mkdir(parents=True, exist_ok=True)
        with tarfile.open(archive / f"{name}.tar.gz", "w:gz") as tar:
            tar.add(dest, arcname=name)
    return result


def load_results(out: Path) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) for p in sorted(out.glob("*/result.json"))}


def table(results: dict[str, dict]) -> str:
    """Markdown: perplexity on both held-out sets at each horizon, the paper-compatible loss, memory, speed."""
    head = ("| run | " + " | ".join(f"C4 ppl @{h}" for h in HORIZONS) + " | "
            + " | ".join(f"wiki ppl @{h}" for h in HORIZONS)
            + " | C4 paper loss | state GB (measured) | weights+state GB (paper) | tok/s |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]

    def ppl(res, step, s):
        e = res["evals"].get(str(step), {}).get(s)
        return f"{e['ppl']:.2f}" if e and math.isfinite(e["ppl"]) else "-"

    for name in [n for n in RUNS if n in results] + sorted(set(results) - set(RUNS)):
        res = results[name]
        if res.get("diverged"):
            lines.append(f"| {name} | {res['diverged']} |")
            continue
        last = res["evals"].get(str(max(HORIZONS)), {}).get("c4")
        paper = f"{last['paper_loss']:.3f}" if last else "-"
        mem = res.get("paper_memory_gb")
        lines.append(f"| {name} | " + " | ".join(ppl(res, h, "c4") for h in HORIZONS) + " | "
                     + " | ".join(ppl(res, h, "wiki") for h in HORIZONS)
                     + f" | {paper} | {res['optimizer_state_gb']:.3f} | "
                     + (f"{mem:.2f}" if mem is not None else "-")
                     + f" | {res['tokens_per_s']:,.0f} |")
    return "\n".join(lines)


def relative_table(results: dict[str, dict], held_out: str = "wiki") -> str:
    """Markdown: each run's perplexity at each horizon over that of the best AdamW run of the same precision
    (best = lowest perplexity at the last horizon); the claims of benchmarks/mini_protocol.md read off it."""
    def ppl(res, step):
        e = res["evals"].get(str(step), {}).get(held_out)
        return e["ppl"] if e else None

    def precision(res):
        return "amp_bf16" if "trainer.precision=amp_bf16" in res["overrides"] else "bf16_pure"

    last = max(HORIZONS)
    best = {}
    for name, res in results.items():
        if name.startswith("adamw_lr") and "lookahead=ema_nesterov" not in res["overrides"] and ppl(res, last):
            if precision(res) not in best or ppl(res, last) < ppl(results[best[precision(res)]], last):
                best[precision(res)] = name
    lines = [f"| run | precision | {held_out} ppl / best AdamW's: " + " | ".join(f"@{h}" for h in HORIZONS) + " |",
             "|---|---|" + "---|" * len(HORIZONS)]
    for name in [n for n in RUNS if n in results]:
        res, prec = results[name], precision(results[name])
        if res.get("diverged") or prec not in best:
            continue
        ref = results[best[prec]]
        ratios = [f"{ppl(res, h) / ppl(ref, h):.3f}" if ppl(res, h) and ppl(ref, h) else "-" for h in HORIZONS]
        lines.append(f"| {name} | {prec} | " + " | ".join(ratios) + " |")
    return f"Reference (best AdamW per precision): {best}\n\n" + "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="+", default=list(RUNS), help="names from --list (default: all, in order)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "mini_protocol" / "runs")
    parser.add_argument("--work", type=Path, default=ROOT / "outputs" / "mini_protocol",
                        help="scratch run directories")
    parser.add_argument("--archive", type=Path, default=None, help="also write DIR/<name>.tar.gz per finished run")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="overrides added to every run (e.g. a data.data_dir, or a short smoke test)")
    parser.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                        help="start no run that would end after this many seconds (judged by the longest "
                             "run so far in this invocation)")
    parser.add_argument("--list", action="store_true", help="print the runs and their overrides")
    parser.add_argument("--table", action="store_true", help="print the table of the results in --out")
    args = parser.parse_args(argv)
    if args.list:
        for name, overrides in RUNS.items():
            print(f"{name:20s} experiment=mini_protocol {' '.join(overrides)}")
        return 0
    if args.table:
        results = load_results(args.out)
        print(table(results) + "\n\n" + relative_table(results))
        return 0
    unknown = [n for n in args.runs if n not in RUNS]
    if unknown:
        parser.error(f"unknown run(s) {unknown}; choose from {list(RUNS)}")

    from llmopt.train.run import ModelCache

    models = ModelCache()
    started, longest = time.perf_counter(), 0.0
    for name in args.runs:
        if (args.out / name / "result.json").is_file():
            print(f"[mini_protocol] {name}: done already, skipped", flush=True)
            continue
        above = ONLY_IF_DIVERGED.get(name)
        if above and not (load_results(args.out).get(above) or {}).get("diverged"):
            print(f"[mini_protocol] {name}: skipped, {above} did not diverge (or has not run)", flush=True)
            continue
        if args.time_budget is not None and time.perf_counter() - started + longest > args.time_budget:
            print(f"[mini_protocol] {name}: not started, it would overrun --time-budget", flush=True)
            break
        print(f"[mini_protocol] {name}: {' '.join(RUNS[name] + args.set)}", flush=True)
        t0 = time.perf_counter()
        res = run_one(name, RUNS[name] + args.set, args.out, args.work, models, args.archive)
        longest = max(longest, time.perf_counter() - t0)
        last = res["evals"][max(res["evals"], key=int)] if res["evals"] else {}
        print(f"[mini_protocol] {name}: " + (res["diverged"] or ", ".join(f"{s} ppl {e['ppl']:.2f}"
                                                                          for s, e in last.items()))
              + f", {res['tokens_per_s'] or 0:,.0f} tok/s, {res['wall_s']:.0f} s", flush=True)
    print(table(load_results(args.out)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
