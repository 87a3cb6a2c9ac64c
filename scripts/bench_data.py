"""Tokens/s of the data pipeline alone (no model): C4 train sample, shared 32k SentencePiece tokenizer.

    python scripts/bench_data.py                       # truncate_pad and packed, num_workers 0 and 2
    python scripts/bench_data.py --workers 0 2 4 --seconds 20 --config c4_local --micro-batch-size 64
    python scripts/bench_data.py --tokenizer /path/to/saved/t5-base   # a transformers tokenizer instead

For each setting it builds the pipeline, waits for the first batch (start-up: worker spawn, first chunks),
then pulls batches for --seconds and reports non-pad tokens/s (what "tokens seen" counts), token slots/s
(batch x seq_len), and non-pad tokens per CPU-second of this process and its workers together (what one
core sustains; it does not depend on how busy the machine is, so it tells how many workers a rate needs).
The stream cycles over the sample (epoch after epoch), so the figures are steady-state.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from llmopt.data import build_data  # noqa: E402


def _cpu_seconds() -> float:
    """CPU time of this process and of its finished children (the DataLoader workers, once shut down)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def measure(cfg: dict, micro_batch_size: int, seconds: float) -> dict:
    t0 = time.perf_counter()
    data = build_data(cfg, micro_batch_size=micro_batch_size)
    next(data.train)
    startup = time.perf_counter() - t0
    tokens = slots = batches = 0
    cpu0, t0 = _cpu_seconds(), time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        batch = next(data.train)
        tokens += int(batch["attention_mask"].numpy().sum())  # numpy: no torch CPU thread pool in the loop
        slots += batch["input_ids"].numel()
        batches += 1
    elapsed = time.perf_counter() - t0
    data.close()  # joins the workers, so that their CPU time is counted
    cpu = _cpu_seconds() - cpu0  # includes what the workers prefetched before the clock started
    return {"startup_s": startup, "tokens_per_s": tokens / elapsed, "slots_per_s": slots / elapsed,
            "tokens_per_cpu_s": tokens / cpu, "batches": batches}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="c4_local", help="a configs/data/<name>.yaml (default c4_local)")
    ap.add_argument("--modes", nargs="+", default=["truncate_pad", "packed"])
    ap.add_argument("--workers", nargs="+", type=int, default=[0, 2])
    ap.add_argument("--micro-batch-size", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=None, help="default: the config's")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--tokenizer", default=None, help="override data.tokenizer (a path or a Hugging Face name)")
    args = ap.parse_args()

    # composed as a run composes it (each data config inherits configs/data/_base.yaml)
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        base = OmegaConf.to_container(compose("train", overrides=[f"data={args.config}"]).data, resolve=True)
    if args.seq_len:
        base["seq_len"] = args.seq_len
    if args.tokenizer:
        base["tokenizer"] = args.tokenizer
    print(f"config {args.config}: tokenizer {base['tokenizer']}, seq_len {base['seq_len']}, "
          f"micro-batch {args.micro_batch_size}, {args.seconds:g} s per setting")
    print(f"{'mode':<13} {'workers':>7} {'startup s':>9} {'tokens/s':>12} {'slots/s':>12} {'tokens/cpu-s':>12} "
          f"{'batches':>8}")
    for mode in args.modes:
        for workers in args.workers:
            r = measure({**base, "mode": mode, "num_workers": workers}, args.micro_batch_size, args.seconds)
            print(f"{mode:<13} {workers:>7} {r['startup_s']:>9.2f} {r['tokens_per_s']:>12,.0f} "
                  f"{r['slots_per_s']:>12,.0f} {r['tokens_per_cpu_s']:>12,.0f} {r['batches']:>8}", flush=True)


if __name__ == "__main__":
    main()
