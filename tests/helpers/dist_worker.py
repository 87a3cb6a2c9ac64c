"""One rank of the multi-process tests (tests/train/test_distributed.py launches it; not a test module itself).

    python -m torch.distributed.run --nproc_per_node 2 -m tests.helpers.dist_worker OUT SPEC_JSON \
        [--fsdp] [--probe-auto]
    python -m tests.helpers.dist_worker OUT SPEC_JSON                    (no launcher: the 1-process reference)

SPEC_JSON maps a run name to Hydra overrides, added to tests.helpers.train.C4_SMALL. Every run goes through
llmopt.train.run.run() itself - the Accelerator, DDP wrapping, rank-sharded data, loss normalization and
optimizer of the CLI - with one addition: the Trainer is subclassed to record, on every rank, the micro-batches
it consumed and the parameters it ended with (rank 0's exports cannot show what the other ranks hold). Each
rank writes OUT/<run>/rank<r>.pt = {"params", "batches" (per step, the input_ids of each micro-batch),
"world_size", "accumulation"}.

--fsdp (after the runs, in the same process group): FSDP2 (`fully_shard`, one unit per decoder layer plus the
root, as configs/accelerate/fsdp2.yaml) on the micro model, compared with the unsharded model given the same
gradients; every rank writes OUT/fsdp/rank<r>.pt.
--probe-auto: what llmopt.train.run.build_accelerator(device="auto") sets up in this launch (OUT/probe/rank<r>.pt).

    python -m torch.distributed.run ... -m tests.helpers.dist_worker late-cli SECONDS [CLI overrides]

is the CLI, `python -m llmopt.train [CLI overrides]`, on a rank that starts SECONDS x LOCAL_RANK later (as a rank
on a busy node or another node does).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
from pathlib import Path

import torch


class Recorder:
    """The trainer's batch iterator, keeping every micro-batch's input_ids."""

    def __init__(self, it):
        self.it, self.seen = it, []

    def __iter__(self):
        return self

    def __next__(self):
        batch = next(self.it)
        self.seen.append(batch["input_ids"].clone())
        return batch


@contextlib.contextmanager
def recording_trainer(out: dict):
    """llmopt.train.run.run() builds a RecordingTrainer while this is active; `out["dir"]` is where it writes."""
    import llmopt.train.run as run_module

    base = run_module.Trainer

    class RecordingTrainer(base):
        def fit(self, loggers):
            self.train_iter = Recorder(self.train_iter)  # here: a resume replaces the iterator built in __init__
            summary = super().fit(loggers)
            acc = self.accelerator
            lm = acc.unwrap_model(self.model).lm
            seen = self.train_iter.seen
            torch.save({"params": {k: v.detach().clone() for k, v in lm.state_dict().items()},
                        "batches": [seen[i: i + self.accumulation] for i in range(0, len(seen), self.accumulation)],
                        "world_size": acc.num_processes, "accumulation": self.accumulation},
                       out["dir"] / f"rank{acc.process_index}.pt")
            return summary

    run_module.Trainer = RecordingTrainer
    try:
        yield
    finally:
        run_module.Trainer = base


def train_runs(out_dir: Path, spec: dict[str, list[str]]) -> None:
    from llmopt.train.run import run
    from tests.helpers.train import C4_SMALL, compose_config

    where: dict = {}
    with recording_trainer(where):
        for name, overrides in spec.items():
            run_dir = where["dir"] = out_dir / name
            run_dir.mkdir(parents=True, exist_ok=True)  # every rank writes its record here
            cfg = compose_config([*C4_SMALL, f"checkpoint.dir={run_dir / 'checkpoints'}", *overrides])
            run(cfg, run_dir)


# ---- FSDP2 -------------------------------------------------------------------------------------------------
def _full(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def _optimizer(name: str, model):
    from llmopt.optim import SCALE, build_optimizer, classify_parameters
    from llmopt.optim.registry import groups_by_role

    if name == "scale_rows":  # SCALE on every parameter but the embedding: the nn.Linear weights' rows, 1-D AdamW
        return SCALE(groups_by_role(classify_parameters(model), ["matrix", "output", "vector"]), lr=1e-2,
                     adam_lr=1e-2)
    hparams = {"adamw": {"lr": 1e-2}, "muon": {"lr": 0.02, "adam_lr": 1e-2}, "scale": {"lr": 1e-2, "adam_lr": 1e-2},
               "sgd_ll": {"lr": 100.0}}[name]
    return build_optimizer(model, name, **hparams)


def fsdp_checks(out_dir: Path) -> None:
    """Per optimizer: the micro model under fully_shard (ranks split a batch of 4 sequences) and an unsharded
    copy on every rank that takes the FSDP gradients, gathered, as its own; both step. Recorded: the gathered
    gradients against a 1-process backward on the whole batch, and every parameter, full, after each step
    (or the exception the sharded step raised)."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    from llmopt.model import build_model, llama_config
    from llmopt.model.loss import CausalLMLoss

    rank, world = dist.get_rank(), dist.get_world_size()
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 128, (2 * world, 16), generator=gen) for _ in range(2)]
    results: dict = {"world_size": world}
    for name in ("adamw", "scale_rows", "muon", "scale", "sgd_ll"):
        model = build_model(llama_config("micro"), seed=0)
        ref = copy.deepcopy(model)
        sharded = CausalLMLoss(model)
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(sharded)
        placements = {k: str(p.placements) for k, p in model.named_parameters()}
        opt, ref_opt = _optimizer(name, model), _optimizer(name, ref)
        record: dict = {"placements": placements, "local_rows": model.lm_head.weight.to_local().shape[0],
                        "init": {k: v.detach().clone() for k, v in ref.named_parameters()},
                        "sharded": [], "reference": [], "grads": [], "error": None}
        try:
            for x in batches:
                mine = x[2 * rank: 2 * rank + 2]
                n_global = (x[:, 1:] != -100).sum()
                loss_sum, _ = sharded(mine, mine)
                (loss_sum * world / n_global).backward()  # FSDP2's reduce-scatter averages over ranks
                whole_sum, _ = CausalLMLoss(ref)(x, x)
                (whole_sum / n_global).backward()         # the 1-process gradient of the whole batch
                grads = {}
                for (k, p), q in zip(model.named_parameters(), ref.parameters()):
                    grads[k] = (_full(p.grad).clone(), q.grad.clone())
                    q.grad = _full(p.grad).clone()        # the same gradient for both updates
                record["grads"].append(grads)
                opt.step()
                ref_opt.step()
                opt.zero_grad(set_to_none=True)
                ref_opt.zero_grad(set_to_none=True)
                record["sharded"].append({k: _full(p).detach().clone() for k, p in model.named_parameters()})
                record["reference"].append({k: q.detach().clone() for k, q in ref.named_parameters()})
        except Exception as err:  # noqa: BLE001 - what FSDP2 does with the optimizer is the result
            record["error"] = f"{type(err).__name__}: {err}"
        results[name] = record
        dist.barrier()
    (out_dir / "fsdp").mkdir(parents=True, exist_ok=True)
    torch.save(results, out_dir / "fsdp" / f"rank{rank}.pt")


def probe_auto(out_dir: Path) -> None:
    """What build_accelerator(device="auto") gives in this launch (on a fresh accelerate state)."""
    import torch.distributed as dist
    from accelerate.state import AcceleratorState

    from llmopt.train.run import build_accelerator

    rank = dist.get_rank()
    AcceleratorState._reset_state(reset_partial_state=True)  # forget the runs' device=cpu state
    acc = build_accelerator("fp32", "auto")
    (out_dir / "probe").mkdir(parents=True, exist_ok=True)
    torch.save({"num_processes": acc.num_processes, "process_index": acc.process_index,
                "distributed_type": str(acc.distributed_type)}, out_dir / "probe" / f"rank{rank}.pt")


def late_cli(delay: float, overrides: list[str]) -> None:
    import os
    import runpy
    import sys
    import time

    time.sleep(delay * int(os.environ["LOCAL_RANK"]))
    sys.argv = ["llmopt.train", *overrides]
    runpy.run_module("llmopt.train", run_name="__main__")


def main() -> None:
    import sys

    if sys.argv[1] == "late-cli":
        late_cli(float(sys.argv[2]), sys.argv[3:])
        return
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("spec", type=json.loads)
    parser.add_argument("--fsdp", action="store_true")
    parser.add_argument("--probe-auto", action="store_true")
    args = parser.parse_args()
    train_runs(args.out, args.spec)
    if args.fsdp:
        fsdp_checks(args.out)
    if args.probe_auto:
        probe_auto(args.out)


if __name__ == "__main__":
    main()
