"""Does a training run repeat here? The same command several times, each in a fresh process, losses compared bit
for bit.

Each run is `python -m llmopt.train OVERRIDES` with the loss logged at every step, no checkpoint and no export,
in its own directory. The report: whether the per-step training losses of all runs are identical, the first step
where they differ, the largest spread (max - min over runs) of any step's loss, and each run's tokens/s (median
over its logged steps after the first, which holds compilation; with a host sync at every step, so lower than a
run that logs less often). `trainer.deterministic=true` is the setting to try when they differ (docs/running.md,
Reproducibility).

Several GPUs: `--launcher` puts a launch command in place of `python` (each run is then `LAUNCHER -m llmopt.train
OVERRIDES`), e.g. `--launcher "accelerate launch --config_file configs/accelerate/ddp.yaml --num_processes 2"`.

Usage: python scripts/repeat_run.py [--runs 2] [--launcher CMD] [--out F.jsonl] -- OVERRIDE [OVERRIDE ...]
e.g.   python scripts/repeat_run.py -- model=350m optimizer=scale schedule=constant trainer=paper \\
           trainer.steps=10 data=c4_local data.data_dir=../shared/data trainer.deterministic=true
Exit status: 0 identical, 1 different, 3 a run failed.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from llmopt.metrics.loggers import read_metrics

ROOT = Path(__file__).resolve().parents[1]
# appended after the user's overrides, so they win: a loss at every step, nothing written that is not compared
REPEAT_OVERRIDES = ["trainer.log_every=1", "checkpoint.final=false", "checkpoint.export_hf=false"]
RUN_FAILED = 3  # exit status (argparse's usage errors are 2)


def run_once(overrides: list[str], run_dir: Path, launcher: list[str] | None = None) -> dict:
    """One run in a fresh process (or the processes `launcher` starts): its per-step losses and tokens/s, or the
    error it ended with."""
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONPATH": os.pathsep.join(
        p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    # its own checkpoint dir: an experiment that sets a stable one would otherwise resume the previous run
    done = subprocess.run([*(launcher or [sys.executable]), "-m", "llmopt.train", *overrides, *REPEAT_OVERRIDES,
                           f"checkpoint.dir={run_dir / 'checkpoints'}", f"hydra.run.dir={run_dir}"],
                          cwd=ROOT, capture_output=True, text=True, env=env)
    metrics, summary = run_dir / "metrics.jsonl", run_dir / "summary.json"
    if done.returncode != 0 or not metrics.is_file() or not summary.is_file():
        return {"error": (done.stderr or done.stdout).strip()[-800:], "returncode": done.returncode}
    records = read_metrics(metrics)
    losses = {r["step"]: r["train/loss"] for r in records if "train/loss" in r}
    speeds = [r["perf/token_slots_per_s"] for r in records if "perf/token_slots_per_s" in r][1:]
    processes = json.loads(summary.read_text())["processes"]
    return {"losses": losses, "tok_s": statistics.median(speeds) if speeds else None, "processes": processes}


def compare(losses: list[dict[int, float]]) -> dict:
    """Per-step losses of several runs ({step: loss} each) compared exactly over the steps all runs logged; runs
    that logged different steps (one stopped early) are not identical, and `missing` names those steps."""
    if len(losses) < 2:
        raise ValueError("comparing needs at least two runs (--runs 2 or more)")
    steps = sorted(set.intersection(*(set(run) for run in losses)))
    if not steps:
        raise ValueError("the runs logged no common step with a training loss")
    missing = sorted(set.union(*(set(run) for run in losses)) - set(steps))
    spread = {step: max(run[step] for run in losses) - min(run[step] for run in losses) for step in steps}
    differing = [step for step in steps if len({run[step] for run in losses}) > 1]
    return {"steps": len(steps), "identical": not differing and not missing, "missing": missing,
            "first_difference": differing[0] if differing else None, "max_spread": max(spread.values()),
            "spread": spread}


def report(runs: list[dict], result: dict) -> str:
    lines = [f"{'step':>5} " + " ".join(f"{'run ' + str(i + 1):>12}" for i in range(len(runs))) + f" {'spread':>10}"]
    for step, spread in result["spread"].items():
        lines.append(f"{step:>5} " + " ".join(f"{run['losses'][step]:>12.6f}" for run in runs) + f" {spread:>10.3g}")
    speeds = ", ".join(f"{run['tok_s']:,.0f}" if run["tok_s"] else "-" for run in runs)
    if result["first_difference"] is not None:
        verdict = f"different from step {result['first_difference']} (largest spread {result['max_spread']:.3g})"
    elif result["missing"]:
        verdict = f"identical where all runs logged, but steps {result['missing']} are missing from some runs"
    else:
        verdict = "identical at every step"
    processes = "/".join(sorted({str(run["processes"]) for run in runs}))
    lines.append(f"{len(runs)} runs of {processes} process(es), {result['steps']} steps: losses {verdict}; "
                 f"tokens/s per run: {speeds}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 usage="repeat_run.py [--runs N] [--launcher CMD] [--out F] -- OVERRIDE ...")
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--launcher", default=None, help="command that starts `-m llmopt.train` in place of python, "
                    "e.g. 'accelerate launch --num_processes 2'")
    ap.add_argument("--out", default=None, help="append the result as one JSON line")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides of python -m llmopt.train")
    args = ap.parse_args(argv)
    if args.runs < 2:
        ap.error("--runs must be at least 2: one run has nothing to be compared with")
    launcher = None if args.launcher is None else shlex.split(args.launcher)
    if launcher == []:
        ap.error("--launcher is empty: give a command such as 'torchrun --nproc_per_node 2', or leave it out")
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.runs):
            run = run_once(args.overrides, Path(tmp) / f"run_{i + 1}", launcher)
            if "error" in run:
                print(f"run {i + 1} failed (exit {run['returncode']}):\n{run['error']}", file=sys.stderr)
                return RUN_FAILED
            runs.append(run)
            print(f"run {i + 1}: {len(run['losses'])} steps", flush=True)
    result = compare([run["losses"] for run in runs])
    print(report(runs, result))
    if args.out:
        row = {"overrides": args.overrides, "launcher": args.launcher,
               **{k: v for k, v in result.items() if k != "spread"},
               "tok_s": [run["tok_s"] for run in runs], "processes": [run["processes"] for run in runs],
               "losses": [run["losses"] for run in runs]}
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")
    return 0 if result["identical"] else 1


if __name__ == "__main__":
    sys.exit(main())
