"""The one-pass cross-entropy kernel (llmopt/model/cross_entropy.py) against its memory floor, per launch shape.

The kernel reads each row of [tokens, vocab] logits and writes softmax - onehot in its place: 2 x tokens x vocab
x itemsize bytes. The floor is those bytes over the copy bandwidth measured in the same run (a device copy of
the logits). For each warp count: median kernel time, fraction of the floor.

Usage: python scripts/bench_loss_head.py [--tokens 32768] [--vocab 32000] [--warps 4 8 16 32] [--steps 20]
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch


def floor_bytes(tokens: int, vocab: int, itemsize: int) -> int:
    """Bytes the kernel must move: the logits read once and the gradient written once."""
    return 2 * tokens * vocab * itemsize


def median_ms(fn, steps: int) -> float:
    times = []
    for _ in range(steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--warps", type=int, nargs="+", default=[4, 8, 16, 32])
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_loss_head.py needs a CUDA device")
    import triton

    from llmopt.model import cross_entropy

    device = torch.device("cuda")
    logits = torch.randn(args.tokens, args.vocab, device=device).to(torch.bfloat16)
    work = torch.empty_like(logits)
    targets = torch.randint(0, args.vocab, (args.tokens,), device=device)
    losses = torch.empty(args.tokens, dtype=torch.float32, device=device)
    nbytes = floor_bytes(args.tokens, args.vocab, logits.element_size())
    copy_ms = median_ms(lambda: work.copy_(logits), args.steps)
    bandwidth = nbytes / (copy_ms / 1e3)
    floor_ms = nbytes / bandwidth * 1e3
    block = triton.next_power_of_2(args.vocab)
    rows = [{"device": torch.cuda.get_device_name(), "torch": torch.__version__, "copy_tb_s": bandwidth / 1e12,
             "floor_ms": floor_ms}]
    for warps in args.warps:
        def run(warps=warps):  # in place, as in training; rereading its own output costs the same
            cross_entropy._cross_entropy_rows[(args.tokens,)](
                work, targets, losses, args.vocab, -100, DTYPE=cross_entropy.triton_dtype(work.dtype), BLOCK=block,
                ONE_BLOCK=True, WRITE_GRAD=True, num_warps=warps)
        run()  # compile
        ms = median_ms(run, args.steps)
        rows.append({"warps": warps, "kernel_ms": ms, "of_floor": floor_ms / ms})
    for row in rows:
        print(json.dumps(row))
    print(f"\n{'warps':>5} {'kernel ms':>9} {'of floor':>8}   (floor {floor_ms:.3f} ms at {bandwidth / 1e12:.2f} TB/s)")
    for row in rows[1:]:
        print(f"{row['warps']:5} {row['kernel_ms']:9.3f} {row['of_floor']:8.0%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
