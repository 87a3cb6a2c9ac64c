"""Checkpoints: exact resume for every optimizer and both data modes, preemption by a real signal,
non-finite values, and a process killed while writing a checkpoint."""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from llmopt.train.checkpoint import Checkpointer
from tests.helpers.train import C4_SMALL, ROOT, metrics, run_cli, run_in_process

OPTIMIZERS = {
    "adamw": ["optimizer=adamw", "optimizer.lr=3e-3"],
    "adam": ["optimizer=adam", "optimizer.lr=3e-3"],
    "sgd": ["optimizer=sgd", "optimizer.lr=0.3"],
    "muon": ["optimizer=muon"],
    "sgd_ll": ["optimizer=sgd_ll", "optimizer.tau=1e-3"],
    "scale": ["optimizer=scale", "optimizer.lr=3e-3"],
    "galore": ["optimizer=galore", "optimizer.rank=4", "optimizer.update_proj_gap=2"],
    "fira": ["optimizer=fira", "optimizer.rank=4", "optimizer.update_proj_gap=2"],
    "apollo": ["optimizer=apollo", "optimizer.rank=4", "optimizer.update_proj_gap=2"],
    "apollo_mini": ["optimizer=apollo_mini", "optimizer.update_proj_gap=2"],
    "ema_nesterov+adamw": ["optimizer=adamw", "optimizer.lr=3e-3", "lookahead=ema_nesterov",
                           "lookahead.start_step=1", "lookahead.init=first_update"],
    "ema_nesterov+scale": ["optimizer=scale", "optimizer.lr=3e-3", "lookahead=ema_nesterov"],
}
CASES = [(name, "truncate_pad") for name in OPTIMIZERS] + [
    (name, "packed") for name in ("adamw", "sgd_ll", "scale", "ema_nesterov+scale")]


def _hf_state(run_dir: Path) -> dict:
    from transformers import LlamaForCausalLM
    return LlamaForCausalLM.from_pretrained(run_dir / "hf_model").state_dict()


@pytest.mark.parametrize("name, mode", CASES)
def test_resumed_run_equals_the_uninterrupted_one(tmp_path, name, mode):
    common = [*C4_SMALL, f"data.mode={mode}", "trainer.steps=6", "trainer.eval_every=3", "checkpoint.export_hf=true",
              "schedule.warmup_ratio=0.34", *OPTIMIZERS[name]]
    full, full_dir = run_in_process(tmp_path, [*common, "checkpoint.every=3"], name="full")
    step3 = full_dir / "checkpoints" / "step_00000003"
    assert Checkpointer.verify(step3) is None
    resumed, resumed_dir = run_in_process(tmp_path, [*common, f"checkpoint.resume={step3}"], name="resumed")

    ref, got = _hf_state(full_dir), _hf_state(resumed_dir)
    for key in ref:
        assert torch.equal(ref[key], got[key]), key
    # steps 1-3: the records of the run that wrote the checkpoint; 4-6 trained by the resumed run
    ref_losses = {m["step"]: m["train/loss"] for m in metrics(full_dir) if "train/loss" in m}
    got_losses = {m["step"]: m["train/loss"] for m in metrics(resumed_dir) if "train/loss" in m}
    assert got_losses == ref_losses and sorted(got_losses) == [1, 2, 3, 4, 5, 6]
    for key in ("eval/loss", "eval/paper_loss", "tokens_seen", "step"):
        assert resumed[key] == full[key], key


def test_truncated_or_corrupt_checkpoint_falls_back_to_the_previous(tmp_path, caplog):
    _, run_dir = run_in_process(tmp_path, [*C4_SMALL, "trainer.steps=4", "checkpoint.every=1", "checkpoint.keep=3"])
    ckpt = Checkpointer(run_dir / "checkpoints", accelerator=None)
    names = [p.name for p in ckpt.checkpoints()]
    assert names == ["step_00000002", "step_00000003", "step_00000004"]  # the last 3 kept
    newest = ckpt.checkpoints()[-1]
    model_file = newest / "model.pt"
    model_file.write_bytes(model_file.read_bytes()[:-100])          # truncated
    assert "truncated" in Checkpointer.verify(newest)
    middle = ckpt.checkpoints()[-2] / "optimizer.pt"
    data = bytearray(middle.read_bytes())
    data[len(data) // 2] ^= 0xFF                                     # one flipped byte
    middle.write_bytes(bytes(data))
    assert "corrupt" in Checkpointer.verify(ckpt.checkpoints()[-2])
    with caplog.at_level("WARNING", logger="llmopt"):
        assert ckpt.latest_valid().name == "step_00000002"
    assert "skipping checkpoint" in caplog.text and "truncated" in caplog.text


def _wait_for(predicate, timeout=120.0, interval=0.05):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return False


def _start(args, cwd):
    """The CLI in a session of its own, so that a signal can go to its whole process group (a terminal's Ctrl-C)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "offline"}
    return subprocess.Popen([sys.executable, "-m", "llmopt.train", *args], cwd=cwd, env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_a_step(proc, tmp_path, name: str) -> None:
    assert _wait_for(lambda: any(p.stat().st_size > 0 for p in tmp_path.glob(f"*/*_{name}/metrics.jsonl"))), \
        proc.communicate()[1][-2000:]


# SIGINT as a terminal's Ctrl-C sends it: to the process group, DataLoader workers included
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1, signal.SIGINT])
def test_preemption_signal_checkpoints_and_exits_for_requeue(tmp_path, sig):
    ckpt_dir = tmp_path / "ckpt"
    args = ["trainer.steps=60", "trainer.log_every=1", "trainer.eval_every=1000", "data.eval_tokens=2000",
            f"checkpoint.dir={ckpt_dir}", f"output_root={tmp_path}", "run_name=pre"]
    if sig == signal.SIGINT:
        args.insert(0, "data.num_workers=2")
    proc = _start(args, tmp_path)
    _wait_for_a_step(proc, tmp_path, "pre")
    if sig == signal.SIGINT:
        os.killpg(proc.pid, sig)
    else:
        proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err[-2000:]
    assert f"received {sig.name}" in out + err and "preempted" in out
    ckpts = Checkpointer(ckpt_dir, accelerator=None).checkpoints()
    assert len(ckpts) == 1 and Checkpointer.verify(ckpts[0]) is None
    stopped_at = int(ckpts[0].name.split("_")[1])
    assert 0 < stopped_at < 60
    summary = json.loads(next(tmp_path.glob("*/*_pre/summary.json")).read_text())
    assert summary["preempted"] is True and summary["step"] == stopped_at

    # the requeued job: same checkpoint dir, resume=auto, finishes the schedule
    done = run_cli([*args[:-1], "run_name=pre2"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"resumed from {ckpts[0]}" in done.stdout + done.stderr
    summary = json.loads(next(tmp_path.glob("*/*_pre2/summary.json")).read_text())
    assert summary["step"] == 60 and summary["preempted"] is False


def test_ctrl_c_asks_for_a_stop_and_a_second_one_stops_at_once(caplog):
    from llmopt.train.signals import StopSignal

    stop = StopSignal()
    stop.install()
    try:
        os.kill(os.getpid(), signal.SIGINT)  # the handler runs at the next bytecode boundary of this thread
        assert stop.requested() and stop.received == "SIGINT"
        assert "Ctrl-C again to stop at once" in caplog.text
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
    finally:
        stop.uninstall()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    stop.install()  # a new run in the same process starts unstopped
    stop.uninstall()
    assert not stop.requested()


@pytest.mark.parametrize("log_every", [1, 7])
def test_nonfinite_loss_stops_with_a_clear_message_and_intact_checkpoints(tmp_path, log_every):
    """Caught on a log step (before its update) or between them (a checkpoint is never written after it)."""
    ckpt_dir = tmp_path / "ckpt"
    out = run_cli(["optimizer=sgd", "optimizer.lr=1e6", "trainer.steps=50", f"trainer.log_every={log_every}",
                   "checkpoint.every=1", f"checkpoint.dir={ckpt_dir}", f"output_root={tmp_path}"], cwd=tmp_path)
    assert out.returncode == 3, out.stderr[-2000:]
    assert re.search(r"non-finite loss (or gradient )?at step|the weights are not finite after step", out.stderr)
    assert "trainer.nonfinite=skip" in out.stderr
    ckpt = Checkpointer(ckpt_dir, accelerator=None)
    latest = ckpt.latest_valid()
    assert latest is not None and Checkpointer.verify(latest) is None
    for path in ckpt.checkpoints():
        state = torch.load(path / "model.pt", weights_only=False)
        assert all(torch.isfinite(t).all() for t in state.values()), path


def test_resume_refuses_a_checkpoint_of_other_settings(tmp_path):
    """A shared checkpoint.dir (a sweep) or an edited config: the resume names what differs and writes nothing;
    throughput and logging settings may change."""
    ckpt_dir = tmp_path / "ckpt"
    base = ["trainer.steps=4", "checkpoint.every=2", "data.eval_tokens=2000", f"checkpoint.dir={ckpt_dir}",
            "checkpoint.resume=auto", "checkpoint.export_hf=false"]
    first, _ = run_in_process(tmp_path, base, name="a")
    assert first["step"] == 4
    other = run_cli([*base, "optimizer.lr=0.01", f"output_root={tmp_path / 'b'}"], cwd=tmp_path)
    assert other.returncode == 2 and "Traceback" not in other.stderr, other.stderr[-2000:]
    assert "optimizer.lr: 0.001 -> 0.01" in other.stderr and "its own checkpoint.dir" in other.stderr
    assert not (tmp_path / "b").exists() or not [p for p in (tmp_path / "b").rglob("*") if p.is_file()]
    final = ckpt_dir / "step_00000004" / "manifest.json"
    written = final.stat().st_mtime_ns
    same, run_dir = run_in_process(tmp_path, [*base, "trainer.log_every=1"], name="c")
    # resumed at its end: nothing left to train (nor to checkpoint again); its records are the first run's
    assert same["step"] == 4 and metrics(run_dir) == metrics(tmp_path / "a")
    assert final.stat().st_mtime_ns == written


def test_metrics_history_keeps_the_steps_up_to_the_checkpoint(tmp_path, caplog):
    from llmopt.metrics.loggers import metrics_history, read_metrics

    lines = [json.dumps({"step": s, "train/loss": 10.0 - s}) for s in (1, 2, 3)] + ['{"step": 4, "train/lo']
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines))  # the last line cut short by a killed process
    lineage, elsewhere = {"run_dir": str(tmp_path)}, tmp_path / "new_run"
    assert metrics_history(lineage, 2, elsewhere) == [{"step": 1, "train/loss": 9.0}, {"step": 2, "train/loss": 8.0}]
    assert [r["step"] for r in metrics_history(lineage, 10, elsewhere)] == [1, 2, 3]
    # the writing run's directory gone (a moved tree): this run's own file, if it has one (the same run, moved)
    gone = {"run_dir": str(tmp_path / "gone")}
    assert [r["step"] for r in metrics_history(gone, 2, tmp_path)] == [1, 2]
    assert metrics_history(gone, 2, elsewhere) is None  # nothing to start from: append, never empty a file
    assert "steps 1-2 are not in this run's metrics.jsonl" in caplog.text
    # the one reader of metrics files (report, plots, scripts): an archived copy reads the same
    archived = tmp_path / "metrics.jsonl.gz"
    archived.write_bytes(gzip.compress((tmp_path / "metrics.jsonl").read_bytes()))
    assert read_metrics(archived) == read_metrics(tmp_path / "metrics.jsonl") == metrics_history(lineage, 10, tmp_path)


def test_a_refused_resume_leaves_the_earlier_records_as_they_were(tmp_path):
    base = [*C4_SMALL, "trainer.steps=6", "checkpoint.every=4", "checkpoint.final=false",
            f"checkpoint.dir={tmp_path / 'ckpt'}", "checkpoint.resume=auto"]
    _, run_dir = run_in_process(tmp_path, base, name="a")
    before = (run_dir / "metrics.jsonl").read_bytes()
    damaged = tmp_path / "ckpt" / "step_00000004" / "optimizer.pt"
    data = bytearray(damaged.read_bytes())
    data[len(data) // 2] ^= 0xFF
    damaged.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="optimizer.pt is corrupt"):
        run_in_process(tmp_path, [*base, f"checkpoint.resume={damaged.parent}"], name="a")
    assert (run_dir / "metrics.jsonl").read_bytes() == before


def test_a_chain_of_resumes_keeps_one_wandb_run_through_a_link_without_wandb(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    ckpt = tmp_path / "ckpt"
    base = [*C4_SMALL, "trainer.steps=6", "checkpoint.every=2", "checkpoint.keep=3", "checkpoint.final=false",
            f"checkpoint.dir={ckpt}", "checkpoint.resume=auto"]
    run_in_process(tmp_path, [*base, "logger=wandb"], name="a")          # checkpoints 2, 4 (6: final=false)
    assert [p.name for p in Checkpointer(ckpt, None).checkpoints()] == ["step_00000002", "step_00000004"]
    first_id = Checkpointer.saved_meta(ckpt / "step_00000002")["lineage"]["wandb_id"]
    shutil.rmtree(ckpt / "step_00000004")
    run_in_process(tmp_path, base, name="b")                             # W&B off: from 2, writes 4
    assert Checkpointer.saved_meta(ckpt / "step_00000004")["lineage"]["wandb_id"] == first_id
    run_in_process(tmp_path, [*base, "logger=wandb"], name="c")          # from 4: A's W&B run again
    ids = [p.name.rsplit("-", 1)[1] for p in sorted((tmp_path / "wandb").glob("offline-run-*"))]
    assert ids == [first_id, first_id]
    # a run branched from a chosen checkpoint (not a requeue) gets its own W&B run, with the earlier records (a new
    # run in this checkpoint.dir: allowed beside the other's)
    _, branch = run_in_process(tmp_path, [*base, "logger=wandb", f"checkpoint.resume={ckpt / 'step_00000002'}",
                                          "checkpoint.allow_other_runs=true"], name="d")
    ids = {p.name.rsplit("-", 1)[1] for p in (tmp_path / "wandb").glob("offline-run-*")}
    assert len(ids) == 2 and first_id in ids
    assert [r["step"] for r in metrics(branch) if "train/loss" in r] == [1, 2, 3, 4, 5, 6]


def test_wandb_starts_a_new_run_where_it_refuses_to_continue_one(tmp_path, monkeypatch, caplog):
    """W&B refuses the id of a run deleted in its UI (HTTP 409): the resumed run must still train and log."""
    import wandb

    from llmopt.metrics.loggers import WandbLogger

    real_init = wandb.init

    def init(**kwargs):
        if kwargs.get("id"):
            raise wandb.errors.CommError("run abc123 was previously created and deleted")
        return real_init(**kwargs)
    monkeypatch.setattr(wandb, "init", init)
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    logger = WandbLogger(tmp_path, {}, project="llmopt-tests", mode="offline", run_id="abc123")
    try:
        assert logger.run.id != "abc123" and "did not continue run abc123" in caplog.text
    finally:
        logger.close()


def trained(records: list[dict]) -> list[dict]:
    """The records' numbers of the training itself (not timings, nor the facts a process logs with its first)."""
    return [{k: v for k, v in r.items() if k == "step" or k.startswith(("train/", "eval/"))} for r in records]


def test_resumed_run_continues_its_records_in_metrics_jsonl_and_in_wandb(tmp_path, monkeypatch):
    """A run that crashed after its last checkpoint, resumed twice: in its own directory (a SLURM requeue) and in
    a new one. Each time metrics.jsonl holds every step once (the steps trained again replace the lost ones), and
    W&B continues the same run."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    base = [*C4_SMALL, "trainer.steps=6", "trainer.eval_every=2", "checkpoint.every=4", "checkpoint.final=false",
            f"checkpoint.dir={tmp_path / 'ckpt'}", "checkpoint.resume=auto", "logger=wandb"]
    first, first_dir = run_in_process(tmp_path, base, name="a")  # checkpoint at 4, then steps 5-6: the "crash"
    crashed = metrics(first_dir)
    step4 = tmp_path / "ckpt" / "step_00000004"
    lineage = Checkpointer.saved_meta(step4)["lineage"]
    assert lineage["run_dir"] == str(first_dir.resolve()) and lineage["wandb_id"]
    assert first["resumed_from"] is None

    requeued, _ = run_in_process(tmp_path, base, name="a")  # the same directory
    moved, moved_dir = run_in_process(tmp_path, base, name="b")  # a new one
    for summary, records in ((requeued, metrics(first_dir)), (moved, metrics(moved_dir))):
        assert summary["resumed_from"] == str(step4) and summary["step"] == 6
        for key in ("train/loss", "eval/loss"):
            steps = [r["step"] for r in records if key in r]
            assert steps == sorted(set(steps)) and steps[-1] == 6, (key, steps)
        # steps 1-4 are the first run's records, 5-6 trained again to the same numbers (exact resume)
        assert [r for r in records if r["step"] <= 4] == [r for r in crashed if r["step"] <= 4]
        assert trained(records) == trained(crashed)
    offline_runs = sorted((tmp_path / "wandb").glob("offline-run-*"))
    assert len(offline_runs) == 3 and {p.name.rsplit("-", 1)[1] for p in offline_runs} == {lineage["wandb_id"]}


def test_nonfinite_skip_counts_and_leaves_parameters_alone(tmp_path):
    """trainer.nonfinite=skip: a step with a non-finite loss changes nothing and is counted."""
    from llmopt.train.trainer import Trainer, TrainerConfig


    params = [torch.nn.Parameter(torch.ones(3))]
    params[0].grad = torch.full((3,), float("nan"))
    trainer = Trainer.__new__(Trainer)
    trainer.config = TrainerConfig(nonfinite="skip")
    trainer.optimizer = torch.optim.SGD(params, lr=1.0)
    trainer.skipped_steps = 0
    assert trainer._finite(torch.tensor(float("nan")), None) is False
    assert trainer.skipped_steps == 1 and params[0].grad is None and torch.equal(params[0], torch.ones(3))
    assert trainer._finite(torch.tensor(1.0), torch.tensor(2.0)) is True


def test_sigkill_while_writing_a_checkpoint_leaves_the_previous_loadable(tmp_path):
    ckpt_dir = tmp_path / "ckpt"
    args = ["trainer.steps=60", "trainer.log_every=50", "trainer.eval_every=1000", "checkpoint.every=1",
            "checkpoint.keep=2", "data.eval_tokens=2000", f"checkpoint.dir={ckpt_dir}", f"output_root={tmp_path}"]
    proc = _start(args, tmp_path)
    # wait until at least one checkpoint is complete and the next one is being written, then kill -9
    assert _wait_for(lambda: len(list(ckpt_dir.glob("step_*"))) >= 1 and list(ckpt_dir.glob(".tmp_step_*")),
                     interval=0.001)
    proc.kill()
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    ckpt = Checkpointer(ckpt_dir, accelerator=None)
    latest = ckpt.latest_valid()
    assert latest is not None and Checkpointer.verify(latest) is None
    for name in ("model.pt", "optimizer.pt", "trainer.pt", "rank0.pt"):
        torch.load(latest / name, weights_only=False)
    resumed = run_cli([*args, "run_name=after"], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resumed from {latest}" in resumed.stdout + resumed.stderr


def _hf_eval_loss(model, data, batch_size: int, autocast: bool = False) -> float:
    """Token-weighted loss of a plain transformers model over the run's validation batches (its logits, then
    F.cross_entropy summed in fp32 per batch, as the trainer sums; no attention mask: right padding is causal)."""
    import torch.nn.functional as F
    total, tokens = 0.0, 0
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        for batch in data.eval_batches(batch_size):
            logits = model(input_ids=batch["input_ids"]).logits[:, :-1]
            targets = batch["labels"][:, 1:].flatten()
            total += F.cross_entropy(logits.flatten(0, 1).float(), targets, reduction="sum").double().item()
            tokens += int((targets != -100).sum())
    return total / tokens


@pytest.mark.parametrize("precision", ["bf16_pure", "fp32", "amp_bf16"])
def test_exported_model_in_plain_transformers_gives_the_runs_evaluation_loss(tmp_path, precision):
    """checkpoint.export_hf loaded by LlamaForCausalLM.from_pretrained in the run's dtype evaluates to the run's own
    final eval/loss exactly. In bf16 that needs RoPE's frequencies in fp32 on both sides: the recipe of loading and
    then calling .to(torch.bfloat16) rounds them and gives another loss."""
    from omegaconf import OmegaConf
    from transformers import LlamaForCausalLM

    from llmopt.data import build_data
    from tests.helpers.train import compose_config

    overrides = [*C4_SMALL, "trainer.steps=3", "checkpoint.export_hf=true", f"trainer.precision={precision}",
                 "optimizer=adamw", "optimizer.lr=3e-3"]
    summary, run_dir = run_in_process(tmp_path, overrides)
    cfg = compose_config(overrides)
    data = build_data(OmegaConf.to_container(cfg.data, resolve=True), micro_batch_size=cfg.trainer.micro_batch_size)
    dtype = torch.bfloat16 if precision == "bf16_pure" else torch.float32
    model = LlamaForCausalLM.from_pretrained(run_dir / "hf_model", dtype=dtype)
    assert model.dtype == dtype and model.model.rotary_emb.inv_freq.dtype == torch.float32
    loss = _hf_eval_loss(model, data, cfg.trainer.micro_batch_size, autocast=precision == "amp_bf16")
    assert loss == summary["eval/loss"]
    if precision == "bf16_pure":
        rounded = LlamaForCausalLM.from_pretrained(run_dir / "hf_model", dtype=torch.float32).to(torch.bfloat16)
        assert rounded.model.rotary_emb.inv_freq.dtype == torch.bfloat16
        assert _hf_eval_loss(rounded, data, cfg.trainer.micro_batch_size) != summary["eval/loss"]
