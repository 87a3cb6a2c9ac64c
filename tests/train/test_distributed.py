"""Several processes on the CPU (gloo): DDP against one process, and what row-sharding does to each update rule.

Three launches run at once (module fixture `launched`: 30-50 s on 2 cores; the whole module 35-60 s):
  * `two`: torchrun, 2 ranks, tests/helpers/dist_worker.py: five short runs through llmopt.train.run.run() (micro 2 x 2
    ranks x accumulation 2 = global 8), each rank recording its batches and final parameters; then FSDP2
    (`fully_shard`) checks on the micro model in the same process group;
  * `one`: the same worker in 1 process, the same runs at micro 4 x accumulation 2 (global 8): the reference;
  * `cli`: the real CLI (`python -m llmopt.train`, run by the worker's late-cli so that rank 1 starts 3 s after
    rank 0), 2 ranks, the SGD run again.

Data: the C4 sample is one file, i.e. one datasets shard, which does not divide among 2 ranks, so
split_dataset_by_node gives rank r every 2nd record of the one shuffled stream, from record r. In truncate_pad
mode a record is a row, so each optimizer step of the 2-rank run reads exactly the 8 sequences of the
1-process step (test_ranks_split_the_one_process_stream checks it): the comparison is of one computation in
two summation orders. (Not so in packed mode, or with a shard count that divides world_size: each rank then
reads whole shards and the union of a step is other text.)

Tolerances. Replicas of one DDP run must be bitwise equal (one all-reduced gradient, deterministic update).
Against 1 process only fp32 summation order differs (micro-batch sums, the all-reduce, the 2/N scale):
  * SGD lr 1, momentum 0 (the update is the gradient): rtol 1e-5, atol 1e-7 as test_train's accumulation test;
    the largest difference seen is 7e-9 (1e-7 relative).
  * AdamW, SCALE, SGD-LL, EMA-Nesterov(AdamW), 3 steps: compared as updates u = theta_T - theta_0, per tensor
    ||u_2 - u_1|| <= 1e-4 ||u_1|| and max|u_2 - u_1| <= 2e-3 max|u_1| (plus the rounding of the stored
    parameters, one ulp per step). Adam divides by sqrt(v) + eps: a coordinate whose gradient is a sum that
    nearly cancels (|g| ~ eps) carries its relative rounding error into the update itself, so single
    coordinates move by up to 2e-4 of the largest update (seen; the norms by 1e-5). SGD-LL's RMS cap and
    SCALE's row normalizations are scale-free in the same way. A real fault - a rank's gradient missing or
    counted twice, other data, replicas out of sync - changes the update by O(1), so the bounds still bite.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llmopt.optim import OPTIMIZERS, spec
from tests.helpers.train import C4_SMALL, ROOT, compose_config

WORLD = 2
COMMON = ["schedule=constant", "trainer.global_batch_size=8", "trainer.device=cpu", "data.eval_tokens=2000"]
STEPS = {"sgd": 2, "adamw": 3, "scale": 3, "sgd_ll": 3, "ema_nesterov+adamw": 3}  # few: the module must stay fast
RUNS = {
    "sgd": ["optimizer=sgd", "optimizer.lr=1.0", "optimizer.momentum=0.0"],
    "adamw": ["optimizer=adamw", "optimizer.lr=3e-3"],
    "scale": ["optimizer=scale", "optimizer.lr=3e-3", "optimizer.adam_lr=3e-3"],
    "sgd_ll": ["optimizer=sgd_ll", "optimizer.lr=100", "optimizer.tau=5e-4"],
    "ema_nesterov+adamw": ["optimizer=adamw", "optimizer.lr=3e-3", "lookahead=ema_nesterov"],
}
RUNS = {name: [f"trainer.steps={STEPS[name]}", *overrides] for name, overrides in RUNS.items()}
UPDATE_RTOL_NORM, UPDATE_RTOL_MAX = 1e-4, 2e-3
TIMEOUT = 300
LATE_START_S = 3.0


RESUMED = "adamw_resumed"  # 2 ranks only: the AdamW run again, resumed from its step-2 checkpoint


def _spec(micro: int, two_ranks_dir: Path | None = None) -> str:
    spec = {name: [*COMMON, *o, f"trainer.micro_batch_size={micro}"] for name, o in RUNS.items()}
    if two_ranks_dir is not None:
        spec["adamw"].append("checkpoint.every=2")  # a checkpoint changes no number
        step2 = two_ranks_dir / "adamw" / "checkpoints" / "step_00000002"
        spec[RESUMED] = [*spec["adamw"], f"checkpoint.resume={step2}"]
    return json.dumps(spec)


def _torchrun(*args: str) -> list[str]:
    # --standalone: a rendezvous on a free local port, so the two launches running at once cannot collide
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}", *args]


@pytest.fixture(scope="module")
def launched(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("distributed")
    dirs = {"two": tmp / "two", "one": tmp / "one", "cli": tmp / "cli"}
    cli_args = [*(a for a in C4_SMALL if not a.startswith("checkpoint.export_hf")), *COMMON, *RUNS["sgd"],
                "trainer.micro_batch_size=2", "checkpoint.export_hf=true"]
    commands = {
        "two": _torchrun("-m", "tests.helpers.dist_worker", str(dirs["two"]), _spec(2, dirs["two"]), "--fsdp",
                         "--probe-auto"),
        "one": [sys.executable, "-m", "tests.helpers.dist_worker", str(dirs["one"]), _spec(4)],
        # the CLI, rank 1 starting LATE_START_S later, with Hydra's default run directory under output_root (the
        # checkpoint directory is set: its default, inside the run directory, makes this launch crash for now)
        "cli": _torchrun("-m", "tests.helpers.dist_worker", "late-cli", str(LATE_START_S), *cli_args,
                         f"output_root={dirs['cli']}", "run_name=cli", f"checkpoint.dir={dirs['cli'] / 'checkpoints'}"),
    }
    # one thread per process (torchrun's default for its workers; 5 processes share 2 cores)
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    procs = {name: subprocess.Popen(cmd, cwd=tmp, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    text=True) for name, cmd in commands.items()}
    failed = []
    for name, proc in procs.items():
        try:
            output, _ = proc.communicate(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            output, _ = proc.communicate()
        if proc.returncode != 0:
            failed.append(f"--- {name} (exit {proc.returncode}): {' '.join(commands[name])}\n{output[-4000:]}")
    assert not failed, "\n".join(failed)
    return dirs


def _record(launched, launch: str, run: str, rank: int = 0) -> dict:
    return torch.load(launched[launch] / run / f"rank{rank}.pt", weights_only=False)


def _initial_params() -> dict[str, torch.Tensor]:
    from llmopt.model import build_model, llama_config

    cfg = compose_config([*C4_SMALL, "checkpoint.dir=unused"])
    config = llama_config(cfg.model.flavor, vocab_size=cfg.model.vocab_size, max_seq_len=max(2048, cfg.data.seq_len))
    return {k: v.detach().clone() for k, v in build_model(config, seed=cfg.seed).state_dict().items()}


def _rows(batches: list[torch.Tensor]) -> list[tuple]:
    return [tuple(row) for row in torch.cat(batches).tolist()]


def assert_same_update(got: torch.Tensor, ref: torch.Tensor, init: torch.Tensor, steps: int, name: str) -> None:
    """The update theta_T - theta_0 of `got` is `ref`'s up to the bounds of the module docstring."""
    update, diff = ref - init, got - ref
    ulps = (steps + 1) * torch.finfo(ref.dtype).eps * ref.abs()  # rounding of the stored parameter, per step
    norm_bound = UPDATE_RTOL_NORM * update.norm() + ulps.norm()
    assert diff.norm() <= norm_bound, f"{name}: |diff| {diff.norm():.3e} > {norm_bound:.3e}"
    max_bound = UPDATE_RTOL_MAX * update.abs().max() + ulps.max()
    assert diff.abs().max() <= max_bound, f"{name}: max diff {diff.abs().max():.3e} > {max_bound:.3e}"


# ---- DDP: 2 ranks against 1 process ------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("run", sorted(RUNS))
def test_ddp_replicas_are_bitwise_equal(launched, run):
    ranks = [_record(launched, "two", run, r) for r in range(WORLD)]
    for r, record in enumerate(ranks):
        assert (record["world_size"], record["accumulation"]) == (WORLD, 2), f"rank {r} did not run distributed"
    for key, value in ranks[0]["params"].items():
        assert torch.equal(ranks[1]["params"][key], value), f"{run}: rank 1 holds another {key}"
    init = _initial_params()
    assert not torch.equal(ranks[0]["params"]["lm_head.weight"], init["lm_head.weight"])  # it did train


@pytest.mark.slow
def test_ranks_split_the_one_process_stream(launched):
    """Rank r reads records r, r + 2, r + 4 ... of the 1-process stream, so every step's union over ranks is
    the 1-process step's batch: 8 distinct sequences, each read by exactly one rank."""
    for run in RUNS:
        ranks = [_record(launched, "two", run, r) for r in range(WORLD)]
        one = _record(launched, "one", run)
        assert len(one["batches"]) == len(ranks[0]["batches"]) == STEPS[run]
        for step, reference in enumerate(one["batches"]):
            stream = _rows(reference)
            assert len(set(stream)) == 8
            for r in range(WORLD):
                assert _rows(ranks[r]["batches"][step]) == stream[r::WORLD], f"{run}, step {step}, rank {r}"


@pytest.mark.slow
def test_sgd_two_ranks_equal_one_process(launched):
    """lr 1, no momentum: the update is the gradient, so this checks the loss normalization by the global
    token count under DDP (each rank backpropagates sum_r * world / N, DDP averages)."""
    two, one = _record(launched, "two", "sgd"), _record(launched, "one", "sgd")
    init = _initial_params()
    for key, ref in one["params"].items():
        assert not torch.equal(ref, init[key]), f"{key} did not move"
        torch.testing.assert_close(two["params"][key], ref, rtol=1e-5, atol=1e-7, msg=key)
    logged = {n: [json.loads(line) for line in (launched[n] / "sgd" / "metrics.jsonl").read_text().splitlines()]
              for n in ("two", "one")}
    for a, b in zip(logged["two"], logged["one"], strict=True):
        assert a["train/tokens"] == b["train/tokens"]
        assert a["train/loss"] == pytest.approx(b["train/loss"], rel=1e-6)
        assert a["train/grad_norm"] == pytest.approx(b["train/grad_norm"], rel=1e-5)
    # the evaluation: the ranks split the one process's validation set (eval batch = micro: 2 per rank, 4 in
    # one process), so the token-weighted loss and the per-rank batch count (paper_loss's divisor) agree
    (two_eval,), (one_eval,) = ([r for r in logged[n] if "eval/loss" in r] for n in ("two", "one"))
    assert two_eval["eval/tokens"] == one_eval["eval/tokens"] > 0
    assert two_eval["eval/loss"] == pytest.approx(one_eval["eval/loss"], rel=1e-6)
    assert two_eval["eval/paper_batches"] == one_eval["eval/paper_batches"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("run", ["adamw", "scale", "sgd_ll", "ema_nesterov+adamw"])
def test_two_ranks_equal_one_process(launched, run):
    two, one = _record(launched, "two", run), _record(launched, "one", run)
    init = _initial_params()
    steps = STEPS[run]
    for key, ref in one["params"].items():
        assert not torch.equal(ref, init[key]), f"{run}: {key} did not move"
        assert_same_update(two["params"][key], ref, init[key], steps, f"{run} {key}")


@pytest.mark.slow
def test_ddp_run_resumed_from_a_checkpoint_equals_the_uninterrupted_one(launched):
    """2 ranks resume the AdamW run at step 2 of 3 (each its own data position): the same parameters, bit for bit,
    on both replicas, and the records of the first two steps carried over."""
    full = _record(launched, "two", "adamw")
    resumed = [_record(launched, "two", RESUMED, r) for r in range(WORLD)]
    assert len(resumed[0]["batches"]) == 1  # only step 3 trained
    for key, value in full["params"].items():
        for r in range(WORLD):
            assert torch.equal(resumed[r]["params"][key], value), f"rank {r}: {key}"
    logged = {n: [json.loads(line) for line in (launched["two"] / n / "metrics.jsonl").read_text().splitlines()]
              for n in ("adamw", RESUMED)}
    losses = {n: [(r["step"], r["train/loss"]) for r in logged[n] if "train/loss" in r] for n in logged}
    assert losses[RESUMED] == losses["adamw"] and [s for s, _ in losses["adamw"]] == [1, 2, 3]


def _cli_run_dirs(launched) -> list[Path]:
    return sorted(launched["cli"].glob("*/*_cli"))


@pytest.mark.slow
def test_cli_under_torchrun(launched):
    """The real entry point, ranks starting LATE_START_S apart: 2 ranks that each saved their own data position,
    and rank 0's export equal, bit for bit, to the worker's 2-rank SGD run (the same computation)."""
    (run_dir,) = [d for d in _cli_run_dirs(launched) if (d / "summary.json").is_file()]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["step"] == 2 and summary["optimizer"] == "sgd"
    (step_dir,) = (launched["cli"] / "checkpoints").glob("step_*")
    assert torch.load(step_dir / "trainer.pt", weights_only=False)["world_size"] == WORLD
    for r in range(WORLD):
        data_state = torch.load(step_dir / f"rank{r}.pt", weights_only=False)["data"]
        assert (data_state["rank"], data_state["world_size"], data_state["batches"]) == (r, WORLD, 4)
    from transformers import LlamaForCausalLM

    exported = LlamaForCausalLM.from_pretrained(run_dir / "hf_model").state_dict()
    worker = _record(launched, "two", "sgd")["params"]
    assert exported.keys() == worker.keys()
    for key, value in worker.items():
        assert torch.equal(exported[key], value), key


@pytest.mark.slow
def test_cli_ranks_starting_in_different_seconds_share_one_run_directory(launched):
    """hydra.run.dir holds ${now:%H-%M-%S}, resolved by each rank: run() adopts rank 0's directories."""
    run_dirs = _cli_run_dirs(launched)
    assert len(run_dirs) == 1, run_dirs


@pytest.mark.slow
def test_device_auto_joins_the_launch(launched):
    """trainer.device=auto without CUDA still joins the torchrun launch (gloo), as rank r of 2."""
    for r in range(WORLD):
        probe = torch.load(launched["two"] / "probe" / f"rank{r}.pt")
        assert (probe["num_processes"], probe["process_index"]) == (WORLD, r), probe


# ---- FSDP2 on the CPU ---------------------------------------------------------------------------------------
def _fsdp(launched, rank: int = 0) -> dict:
    return torch.load(launched["two"] / "fsdp" / f"rank{rank}.pt", weights_only=False)


@pytest.mark.slow
def test_fsdp2_shards_rows_and_reduces_the_gradient(launched):
    """fully_shard runs on the CPU with gloo: every parameter is Shard(0) (rows), and the gathered gradient of
    2 ranks x 2 sequences is the 1-process gradient of the 4 sequences."""
    for rank in range(WORLD):
        fsdp = _fsdp(launched, rank)
        assert fsdp["world_size"] == WORLD
        record = fsdp["adamw"]
        assert set(record["placements"].values()) == {"(Shard(dim=0),)"}
        assert record["local_rows"] == 128 // WORLD  # lm_head [128, 32]: half the rows on each rank
        for key, (gathered, whole) in record["grads"][0].items():
            torch.testing.assert_close(gathered, whole, rtol=1e-5, atol=1e-7, msg=key)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["adamw", "scale_rows"])
def test_fsdp2_elementwise_and_row_updates_equal_unsharded(launched, name):
    """Given the same gradient, AdamW and SCALE without the embedding (nn.Linear rows normalized over their own
    entries, 1-D parameters by AdamW) step the shards to exactly the unsharded parameters: their rules are
    local to a row (bitwise equal here; the bound allows a last-bit difference)."""
    record = _fsdp(launched)[name]
    assert record["error"] is None, record["error"]
    assert len(record["sharded"]) == 2
    for sharded, reference in zip(record["sharded"], record["reference"]):
        for key, value in reference.items():
            assert not torch.equal(value, record["init"][key]) or (name == "scale_rows" and "embed" in key)
            torch.testing.assert_close(sharded[key], value, rtol=1e-6, atol=1e-9, msg=key)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["scale", "sgd_ll"])
def test_fsdp2_cannot_step_scale_or_sgd_ll(launched, name):
    """What the trainer's refusal spares: FSDP2 hands the optimizer DTensors and both fail in step().
    SCALE: the embedding's RMS over dim 0 (across shards) is a pending (Partial) reduction that the in-place
    ops after the norm cannot take; SGD-LL: the same for its per-tensor norm. If a new torch lets either through,
    check the update against the unsharded one before changing an optimizer's whole_tensors registration."""
    for rank in range(WORLD):
        record = _fsdp(launched, rank)[name]
        assert record["error"] is not None and not record["sharded"]
        # both take a norm across the row shards (a pending Partial reduction) that the next in-place op rejects;
        # SGD-LL's per-tensor norms (DTensors) then meet its plain 1/sqrt(numel) vector
        error = record["error"]
        assert error.startswith("RuntimeError") and any(
            word in error for word in ("Partial", "placement", "mixed torch.Tensor and DTensor")), error


@pytest.mark.slow
def test_fsdp2_muon_gets_the_whole_matrix_newton_schulz(launched):
    """torch.optim.Muon on DTensor shards: the Newton-Schulz matmuls gather, so the update is the whole-matrix
    one up to Muon's bf16 rounding (<= 15% of the largest update entry; seen: 5%, most matrices bitwise equal),
    far from what the rule gives on each row shard alone (>= 30% off; seen: 50% to 100%)."""
    from llmopt.optim.roles import DEFAULT_PATTERNS

    record = _fsdp(launched)["muon"]
    assert record["error"] is None, record["error"]
    matrices = [k for k in record["init"] if re.search(DEFAULT_PATTERNS["matrix"], k)]
    assert len(matrices) == 14  # 7 per decoder layer, 2 layers
    sharded, whole, init = record["sharded"][0], record["reference"][0], record["init"]
    grads = record["grads"][0]
    for key in matrices:
        update = (whole[key] - init[key]).abs().max()
        assert (sharded[key] - whole[key]).abs().max() <= 0.15 * update, key
        parts = [torch.nn.Parameter(c.clone()) for c in init[key].chunk(WORLD)]
        for p, g in zip(parts, grads[key][0].chunk(WORLD)):
            p.grad = g.clone()
        torch.optim.Muon(parts, lr=0.02, momentum=0.95, nesterov=True, ns_steps=5, weight_decay=0.0,
                         adjust_lr_fn="original").step()
        local = torch.cat([p.detach() for p in parts])
        assert (local - whole[key]).abs().max() >= 0.3 * update, key


# ---- the refusal, and the sharding logic itself (in process) --------------------------------------------------
ELEMENTWISE = {"adam", "adamw", "sgd"}


class _PassedTheCheck(Exception):
    pass


@pytest.mark.parametrize("optimizer, lookahead", [*[(name, "none") for name in OPTIMIZERS],
                                                  ("scale", "ema_nesterov"), ("adamw", "ema_nesterov")])
def test_trainer_refuses_whole_tensor_optimizers_under_fsdp(monkeypatch, optimizer, lookahead):
    """run() under an FSDP accelerator: every optimizer but the element-wise ones is refused, with the way out,
    before anything is built. (Accelerate never sets DistributedType.FSDP without CUDA - on the CPU the fsdp2.yaml
    launch runs DDP over gloo, or one process with --cpu - so the accelerator is a stand-in here.)"""
    from accelerate.utils import DistributedType

    import llmopt.train.run as run_module

    fsdp = type("FSDPAccelerator", (), {"distributed_type": DistributedType.FSDP, "num_processes": WORLD,
                                     "device": torch.device("cpu")})()
    monkeypatch.setattr(run_module, "build_accelerator", lambda precision, device: fsdp)

    def next_step(*args, **kwargs):  # the first thing run() does once the check has passed
        raise _PassedTheCheck

    monkeypatch.setattr(run_module, "llama_config", next_step)
    cfg = compose_config([*C4_SMALL, f"optimizer={optimizer}", f"lookahead={lookahead}", "checkpoint.dir=unused"])
    if optimizer in ELEMENTWISE:
        with pytest.raises(_PassedTheCheck):
            run_module.run(cfg, Path("unused"))
    else:
        assert spec(optimizer).whole_tensors
        with pytest.raises(ValueError, match=rf"optimizer '{optimizer}' needs whole rows or tensors, which FSDP "
                                             r"shards; run it with DDP \(.*configs/accelerate/ddp.yaml\)"):
            run_module.run(cfg, Path("unused"))


def _muon(groups):
    from llmopt.optim import MuonWithAdamW

    return MuonWithAdamW(groups, [{"params": [torch.nn.Parameter(torch.zeros(1))], "role": "vector"}], lr=0.02)


def _scale(**kw):
    from llmopt.optim import SCALE

    return lambda groups: SCALE(groups, lr=1e-2, adam_lr=1e-2, **kw)


def _sgd_ll(**kw):
    from llmopt.optim import SGDLL

    return lambda groups: SGDLL(groups, lr=100.0, **kw)


# (rule, role, shape, optimizer, shard-local?)
RULES = [
    ("adamw", "matrix", (64, 32), lambda groups: torch.optim.AdamW(groups, lr=1e-2), True),
    ("scale column", "matrix", (64, 32), _scale(), True),
    ("scale column + momentum", "output", (128, 32), _scale(), True),
    ("scale adamw", "vector", (64,), _scale(), True),
    ("scale sign", "matrix", (64, 32), _scale(normalization="sign"), True),
    ("sgd_ll row clip only", "output", (128, 32), _sgd_ll(tau=None), True),
    ("scale column", "embedding", (128, 32), _scale(), False),
    ("scale row", "matrix", (64, 32), _scale(normalization="row"), False),
    ("scale spectral", "matrix", (64, 32), _scale(normalization="spectral"), False),
    ("sgd_ll rms clip", "matrix", (64, 32), _sgd_ll(), False),
    ("sgd_ll row + rms clip", "output", (128, 32), _sgd_ll(delta=0.5), False),  # first rows below delta
    ("muon", "matrix", (64, 32), _muon, False),
]


@pytest.mark.parametrize("rule, role, shape, make, local", RULES, ids=[f"{r[0]}-{r[1]}" for r in RULES])
def test_update_rule_on_row_shards(rule, role, shape, make, local):
    """Two optimizer steps on a tensor and, separately, on its two row halves (torch.chunk on dim 0, FSDP2's
    layout) with the matching gradient halves. Rows of different scale make any statistic that spans rows
    differ between the halves. Shard-local rules give the same tensor bit for bit; the others are off by a
    large part of the update, which is why those optimizers register whole_tensors=True."""
    from llmopt.optim import spec

    gen = torch.Generator().manual_seed(0)
    rows = torch.linspace(0.1, 3.0, shape[0]).reshape(-1, *[1] * (len(shape) - 1))
    init = torch.randn(shape, generator=gen) * 0.02
    grads = [torch.randn(shape, generator=gen) * rows for _ in range(2)]
    whole = torch.nn.Parameter(init.clone())
    halves = [torch.nn.Parameter(c.clone()) for c in init.chunk(WORLD)]
    opt_whole, opt_halves = make([{"params": [whole], "role": role}]), make([{"params": halves, "role": role}])
    for g in grads:
        whole.grad = g.clone()
        for p, c in zip(halves, g.chunk(WORLD)):
            p.grad = c.clone()
        opt_whole.step()
        opt_halves.step()
    sharded, update = torch.cat([p.detach() for p in halves]), (whole.detach() - init).abs().max()
    assert update > 0
    if local:
        assert torch.equal(sharded, whole.detach())
    else:
        assert (sharded - whole.detach()).abs().max() > 0.05 * update
        assert spec(rule.split()[0]).whole_tensors
