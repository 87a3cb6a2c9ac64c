"""End-to-end training throughput through the real trainer and data pipeline, against a plain loop.

For each case: the trainer (Hydra config composed as the CLI does) on the C4 sample, `steps` updates,
tokens/s (token slots, pad included, as the GPU computes them), MFU, peak memory and the fraction of
host time spent waiting for data, all read from the run's metrics.jsonl (first log interval, which
holds compilation, excluded). In the same process, the baseline: a loop like the papers' reference
code (transformers LlamaForCausalLM, eager, pure bf16, torch AdamW, random tokens), timed the same way.

A case is flavor:optimizer:precision, optionally followed by flags (CASE_FLAGS: packed, plain_ce / chunked_ce =
another loss head than the default one_pass, ckpt = activation checkpointing, eager = no compile, hf_rotary =
transformers' rotary module instead of llmopt's table, hf_attention = transformers' own attention masks,
deterministic = trainer.deterministic (GPU runs that repeat bit for bit), bf16_ce = the papers' cross-entropy on
the bf16 logits (trainer.loss_dtype=logits, the plain head), math_sdpa / math_bf16_sdpa = SDPA's math kernel only
(trainer.sdpa_backend; math_bf16 as the papers' torch 2.4 computed it), eval10m =
time the evaluation of 10M held-out tokens), mb=N (the micro-batch), accum=N (micro-batches per optimizer step,
default 2; the papers' 512 sequences are e.g. 2 x 256 at 60M/130M, 4 x 128 at 350M, 8 x 64 at 1B) and Hydra
overrides (group.key=value, e.g. optimizer.lr=1e-4). A run that fails (e.g. refused by the trainer's memory check)
is recorded with its error and the seconds it took to fail. Two ratios: "x eager" is against the reference of
the case's flavor at the case's micro-batch (`--reference 350m:mb=256` for another micro-batch than the default);
"x papers'" against the reference at the papers' micro-batch (MICRO), the baseline of the issue's goal, so that
a right-sized micro-batch counts as the lever it is.

Usage: python scripts/bench_train.py --data-dir DIR [--cases 60m:adamw:bf16_pure ...] [--steps 30] [--workers 8]
       [--out F]
DIR holds c4/*.jsonl.gz, enwiki/*.jsonl.xz (for eval10m) and tokenizers/llmopt-en-32k.model
(../shared/data has them).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from llmopt.metrics.loggers import read_metrics

ROOT = Path(__file__).resolve().parents[1]
# the papers' micro-batches (the reference scripts' --batch_size), the trainer cases' default and the eager loop's
MICRO = {"60m": 256, "130m": 256, "350m": 128, "1b": 64, "7b": 4}
DEFAULT_CASES = ["60m:adamw:bf16_pure", "60m:scale:bf16_pure", "60m:adamw:amp_bf16", "60m:adamw:bf16_pure:packed",
                 "130m:adamw:bf16_pure", "130m:scale:bf16_pure", "350m:scale:bf16_pure", "1b:adamw:bf16_pure",
                 "1b:scale:bf16_pure"]


CASE_FLAGS = {  # optional words after flavor:optimizer:precision, each a set of overrides
    "packed": ["data.mode=packed"],
    "ckpt": ["trainer.activation_checkpointing=true"],
    "plain_ce": ["trainer.loss_head=plain"],      # lm_head, then F.cross_entropy (compiled)
    "chunked_ce": ["trainer.loss_head=chunked"],  # liger-kernel's chunked lm_head + cross-entropy
    "eager": ["trainer.compile=false"],
    "hf_rotary": ["trainer.rotary_table=false"],  # transformers' rotary module (cos/sin recomputed in each layer)
    "hf_attention": ["trainer.attention=transformers"],  # transformers' masks (compiled: a mask tensor, no is_causal)
    "deterministic": ["trainer.deterministic=true"],  # runs that repeat bit for bit (llmopt.train.reproducible)
    "bf16_ce": ["trainer.loss_dtype=logits"],        # the papers' F.cross_entropy on the logits' dtype (plain head)
    "math_sdpa": ["trainer.sdpa_backend=math"],      # SDPA's math kernel (fp32 inside), no flash / cuDNN
    "math_bf16_sdpa": ["trainer.sdpa_backend=math_bf16"],  # the math kernel in bf16, as the papers' torch 2.4
    # the evaluation pass on 10M held-out tokens (two Wikipedia shards, packed), run twice; the second is timed
    "eval10m": ["data.mode=packed", "data.eval.files=[enwiki/enwiki-01.jsonl.xz,enwiki/enwiki-02.jsonl.xz]",
                "data.eval_tokens=10000000", "trainer.eval_batch_size=256"],
}


def case_overrides(case: str, data_dir: str, steps: int, compile_model: bool, workers: int = 8) -> list[str]:
    """The Hydra overrides of a case "flavor:optimizer:precision[:flag ...][:mb=N][:group.key=value ...]"."""
    flavor, optimizer, precision, *flags = case.split(":")
    micro, accumulation = MICRO[flavor], 2
    extra = []
    for flag in flags:
        if flag.startswith("mb="):
            micro = int(flag[3:])
        elif flag.startswith("accum="):
            accumulation = int(flag[6:])
        elif flag in CASE_FLAGS:
            extra += CASE_FLAGS[flag]
        elif "=" in flag and "." in flag.split("=")[0]:  # a Hydra override, e.g. optimizer.lr=1e-4
            extra.append(flag)
        else:
            raise ValueError(f"unknown case flag {flag!r} in {case!r}; flags: {sorted(CASE_FLAGS)}, mb=N, "
                             "accum=N or a Hydra override group.key=value")
    eval_every = steps // 2 if "eval10m" in flags else 10 * steps
    return [f"model={flavor}", f"optimizer={optimizer}", "data=c4_local", f"data.data_dir={data_dir}",
            f"data.num_workers={workers}", "data.eval_tokens=150000", f"trainer.precision={precision}",
            f"trainer.compile={str(compile_model).lower()}", f"trainer.micro_batch_size={micro}",
            f"trainer.global_batch_size={accumulation * micro}", f"trainer.steps={steps}", "trainer.log_every=5",
            f"trainer.eval_every={eval_every}", "trainer.eval_batch_size=64", "checkpoint.export_hf=false",
            "checkpoint.final=false", "schedule=constant", *extra]


def trainer_case(case: str, data_dir: str, steps: int, compile_model: bool, workers: int = 8) -> dict:
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from llmopt.train.run import run

    overrides = case_overrides(case, data_dir, steps, compile_model, workers)
    GlobalHydra.instance().clear()
    torch._dynamo.reset()  # each case compiles a new model: keep earlier cases from filling the recompile limit
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        with tempfile.TemporaryDirectory() as tmp:
            cfg = compose("train", overrides=[*overrides, f"checkpoint.dir={tmp}/ckpt"])
            torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            try:
                summary = run(cfg, Path(tmp) / "run")
            except Exception as err:  # a refusal is a result: how fast, and what it said
                return {"case": case, "error": f"{type(err).__name__}: {err}"[:500],
                        "wall_s": time.perf_counter() - t0}
            wall = time.perf_counter() - t0
            records = read_metrics(Path(tmp) / "run" / "metrics.jsonl")
    logs = [r for r in records if "perf/token_slots_per_s" in r][1:]  # the first interval holds compilation
    evals = [r for r in records if "perf/eval_s" in r]
    row = {"case": case, "compile": cfg.trainer.compile, "micro_batch": cfg.trainer.micro_batch_size,
           "tok_s": statistics.median(r["perf/token_slots_per_s"] for r in logs),
           "mfu": statistics.median(r.get("perf/mfu", 0.0) for r in logs),
           "data_wait": statistics.median(r["perf/data_wait_frac"] for r in logs),
           "peak_gb": max(r["perf/peak_memory_gb"] for r in logs), "wall_s": wall,
           "losses": [round(r["train/loss"], 3) for r in records if "train/loss" in r],
           "eval_tokens": summary.get("eval/tokens")}
    if evals:
        row["eval_s"] = evals[-1]["perf/eval_s"]  # the last pass: the first may hold compilation
        row["eval_passes"] = len(evals)
    if "eval10m" in case:  # its log intervals hold the evaluations: the training figures mean nothing
        row.update(tok_s=None, mfu=None, data_wait=None)
    return row


def eval_summary(row: dict) -> str:
    """The evaluation's time as printed: a compiled model's only pass holds the compilation of its eval graph."""
    if "eval_s" not in row:
        return ""
    first = " (the only pass: with compilation)" if row.get("compile") and row.get("eval_passes") == 1 else ""
    return f"  eval {row['eval_tokens']:,} tokens in {row['eval_s']:.1f} s{first}"


def reference_loop(reference: str, steps: int) -> dict:
    """The papers' reference loop: HF eager, the whole model in bf16, torch AdamW, no compile.
    `reference` is a flavor, optionally with its micro-batch: "350m" or "350m:mb=256"."""
    from llmopt.model import build_model, llama_config

    flavor, *flags = reference.split(":")
    batch = MICRO[flavor]
    for flag in flags:
        if not flag.startswith("mb="):
            raise ValueError(f"unknown reference flag {flag!r} in {reference!r}: only mb=N")
        batch = int(flag[3:])
    device = torch.device("cuda")
    model = build_model(llama_config(flavor), device=device, dtype=torch.bfloat16)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    tokens = torch.randint(0, 32000, (batch, 256), device=device)
    times = []
    row = {"case": f"{flavor}:reference_eager", "micro_batch": batch}
    try:
        for i in range(steps):
            torch.cuda.synchronize()
            t = time.perf_counter()
            loss = model(input_ids=tokens, labels=tokens).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            if i >= 3:
                times.append(time.perf_counter() - t)
        row["tok_s"] = batch * 256 / statistics.median(times)
    except torch.OutOfMemoryError as err:  # the eager loop not fitting at this micro-batch is a result too
        row.update(error=f"OutOfMemoryError: {str(err)[:200]}", wall_s=0.0)
    del model, opt, tokens
    torch.cuda.empty_cache()
    return row


def ratios_to_reference(rows: list[dict]) -> list[tuple[float | None, float | None]]:
    """Each trainer row's tokens/s over the eager reference of its flavor (a) at the row's micro-batch and (b) at
    the papers' micro-batch (MICRO); None where that reference was not run, failed, or the row is one."""
    ref = {(r["case"].split(":")[0], r["micro_batch"]): r["tok_s"] for r in rows
           if r["case"].endswith("reference_eager") and "error" not in r}
    ratios = []
    for r in rows:
        flavor = r["case"].split(":")[0]
        if "error" in r or not r.get("tok_s") or r["case"].endswith("reference_eager"):
            ratios.append((None, None))
            continue
        bases = ref.get((flavor, r.get("micro_batch"))), ref.get((flavor, MICRO.get(flavor)))
        ratios.append(tuple(r["tok_s"] / base if base else None for base in bases))
    return ratios


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--cases", nargs="+", default=DEFAULT_CASES)
    ap.add_argument("--reference", nargs="*", default=["60m", "130m", "350m", "1b"],
                    help='flavors for the eager reference, each optionally with its micro-batch: "350m:mb=256"')
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--workers", type=int, default=8, help="tokenizer processes (data.num_workers)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_train needs a CUDA device", file=sys.stderr)
        return 2
    rows = []

    def record(row):
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")

    for reference in args.reference:
        record(reference_loop(reference, steps=15))
    for case in args.cases:
        record(trainer_case(case, args.data_dir, args.steps, not args.no_compile, args.workers))
    print(f"{'case':32} {'tok/s':>10} {'x eager':>8} {'x papers':>8} {'MFU':>6} {'data wait':>9} {'peak GB':>8}")
    for r, (same_micro, papers_micro) in zip(rows, ratios_to_reference(rows)):
        if "error" in r:
            print(f"{r['case']:32} ERROR after {r['wall_s']:.1f} s: {r['error'][:150]}")
            continue
        ratio, papers = (f"{x:.2f}" if x else "-" for x in (same_micro, papers_micro))
        mfu = f"{100 * r['mfu']:.0f}%" if r.get("mfu") else "-"
        wait = f"{100 * r['data_wait']:.1f}%" if r.get("data_wait") is not None else "-"
        tok_s = f"{r['tok_s']:10,.0f}" if r["tok_s"] else f"{'-':>10}"
        peak = f"{r['peak_gb']:.1f}" if "peak_gb" in r else "-"
        evaluation = eval_summary(r)
        print(f"{r['case']:32} {tok_s} {ratio:>8} {papers:>8} {mfu:>6} {wait:>9} {peak:>8}{evaluation}")
    print(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                      "date": time.strftime("%Y-%m-%d")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
