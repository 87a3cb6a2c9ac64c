"""The one-pass cross-entropy kernel (llmopt/model/cross_entropy.py) against its memory floor, per warp count.

The kernel reads each row of [tokens, vocab] logits and writes softmax - onehot in its place: 2 x tokens x vocab
x itemsize bytes. The floor is those bytes over the device copy bandwidth measured in the same run. For each warp
count: the kernel's median time and its fraction of the floor.

Usage: python scripts/bench_loss_head.py [--tokens 32768] [--vocab 32000] [--warps 4 8 16 32] [--steps 20]
"""

from __future__ import annotations

import argparse
import functools
import json

import torch
from bench_optim import copy_bandwidth, time_calls


def floor_bytes(tokens: int, vocab: int, itemsize: int) -> int:
    """Bytes the kernel must move: the logits read once and the gradient written once."""
    return 2 * tokens * vocab * itemsize


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--warps", type=int, nargs="+", default=[4, 8, 16, 32])
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_loss_head.py needs a CUDA device")
    from llmopt.model import cross_entropy

    device = torch.device("cuda")
    logits = torch.randn(args.tokens, args.vocab, device=device).to(torch.bfloat16)
    targets = torch.randint(0, args.vocab, (args.tokens,), device=device)
    bandwidth = copy_bandwidth(device)
    floor_ms = floor_bytes(args.tokens, args.vocab, logits.element_size()) / bandwidth * 1e3
    rows = [{"device": torch.cuda.get_device_name(), "torch": torch.__version__, "copy_tb_s": bandwidth / 1e12,
             "floor_ms": floor_ms}]
    for warps in args.warps:
        # in place, as in training: rereading its own output (softmax - onehot) costs the kernel the same
        run = functools.partial(cross_entropy._launch, logits, targets, write_grad=True, warps=warps)
        ms = time_calls(run, args.steps) * 1e3
        rows.append({"warps": warps, "kernel_ms": ms, "of_floor": floor_ms / ms})
    for row in rows:
        print(json.dumps(row))
    print(f"\n{'warps':>5} {'kernel ms':>9} {'of floor':>8}   (floor {floor_ms:.3f} ms at {bandwidth / 1e12:.2f} TB/s)")
    for row in rows[1:]:
        print(f"{row['warps']:5} {row['kernel_ms']:9.3f} {row['of_floor']:8.0%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
