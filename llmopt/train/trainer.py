"""The training loop: one optimizer step = accumulate micro-batches, step, schedule, log, evaluate.

Loss normalization: the loss of a step is the sum of token losses over every micro-batch of every
rank divided by the global number of target tokens, so accumulation and DDP give the same update as
one big batch. Each rank backpropagates sum_r * world_size / N_global (DDP averages over ranks).
trainer.loss_weighting=micro_batch_mean instead backpropagates each micro-batch's mean loss / accumulation
steps, as the reference loop does (then the micro-batch size changes the maths).

Host syncs happen only at log, eval and checkpoint steps: losses, token counts and gradient norms
stay on the device in between.
"""

from __future__ import annotations

import contextlib
import math
import time

import numpy as np
import torch

from llmopt.config import TrainerConfig
from llmopt.metrics.throughput import peak_memory_bytes
from llmopt.optim.memory import state_bytes


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """The batch on the device without stalling the host: a copy from pageable memory first waits for
    all the work queued on the GPU, one from pinned memory is queued behind it."""
    if device.type == "cuda":
        return {k: pinned(v).to(device, non_blocking=True) for k, v in batch.items()}
    return {k: v.to(device) for k, v in batch.items()}


def pinned(tensor: torch.Tensor) -> torch.Tensor:
    """A copy in pinned memory, made by numpy on this thread. Tensor.pin_memory() copies through torch's
    intra-op thread pool, whose parallel region waits for threads on every core: with the tokenizer workers
    busy that took ~12 ms per tensor on the H100 machine (16 cores), host time the GPU then waited for."""
    out = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    np.copyto(out.numpy(), tensor.numpy())
    return out


class NonFiniteError(RuntimeError):
    pass


class WeightCopy:
    """The training model's weights copied (upcast) into another model of the same architecture, e.g. an fp32 model
    that evaluates a bf16 one: `refresh()` before each evaluation. The training weights are only read."""

    def __init__(self, source: torch.nn.Module, target: torch.nn.Module):
        sources, targets = dict(source.named_parameters()), dict(target.named_parameters())
        if sources.keys() != targets.keys():
            raise ValueError("WeightCopy: the two models have different parameters")
        self.sources = list(sources.values())
        self.targets = [targets[name] for name in sources]

    @torch.no_grad()
    def refresh(self) -> None:
        torch._foreach_copy_(self.targets, self.sources)  # on the device, no host sync


class Trainer:
    """`model` is the (Accelerate-prepared) CausalLMLoss; `data` follows llmopt.data's contract. `eval_model`: the
    CausalLMLoss evaluations run (default `model`); `eval_weights`: a WeightCopy into it, refreshed before each
    evaluation. The loggers come with fit() (run() starts them once a checkpoint to resume has loaded)."""

    def __init__(self, model, optimizer, scheduler, schedule, data, accelerator, config: TrainerConfig,
                 seq_len: int, flops_per_token: float | None = None, peak_flops: float | None = None,
                 extra_metrics: dict | None = None, diagnostics=None, checkpointer=None, stop_requested=None,
                 eval_model=None, eval_weights: WeightCopy | None = None):
        self.model, self.optimizer, self.scheduler, self.schedule = model, optimizer, scheduler, schedule
        self.eval_model = model if eval_model is None else eval_model
        self.eval_weights = eval_weights
        self.data, self.accelerator, self.config = data, accelerator, config
        self.seq_len = seq_len
        self.flops_per_token, self.peak_flops = flops_per_token, peak_flops
        self.extra_metrics = extra_metrics or {}   # constant facts, logged with the first record
        self.diagnostics, self.checkpointer = diagnostics, checkpointer
        self.stop_requested = stop_requested or (lambda: False)   # True once a preemption signal arrived
        self.accumulation = config.accumulation(accelerator.num_processes)
        self.raw_optimizer = getattr(optimizer, "optimizer", optimizer)  # under Accelerate's wrapper
        self.step = 0              # optimizer updates done
        self.skipped_steps = 0
        self.preempted = False
        self.last_eval: dict = {}
        # non-pad input tokens over all ranks, kept on the device: read back only when logged
        self._tokens_seen = torch.zeros((), dtype=torch.float64, device=accelerator.device)
        self.train_iter = iter(data.train)
        self._data_wait_s = 0.0    # host time spent waiting for batches since the last log record
        # the first step whose loss was not finite (-1: none), kept on the device: read at log steps and before
        # checkpoints, so a NaN between them is caught before a checkpoint could hold it
        self._first_nonfinite = torch.full((), -1, dtype=torch.int64, device=accelerator.device)

    @property
    def tokens_seen(self) -> int:
        return int(self._tokens_seen.item())

    @tokens_seen.setter
    def tokens_seen(self, value: int) -> None:
        self._tokens_seen.fill_(value)

    def _due(self, every: int, step: int) -> bool:
        """Whether completed-step count `step` is a multiple of `every` or the last one."""
        return step % every == 0 or step == self.schedule.num_updates

    # -- one optimizer step -------------------------------------------------------------------------
    def train_step(self) -> dict:
        acc, device = self.accelerator, self.accelerator.device
        logging_now = self._due(self.config.log_every, self.step + 1)
        waited = time.perf_counter()
        host_batches = [next(self.train_iter) for _ in range(self.accumulation)]
        self._data_wait_s += time.perf_counter() - waited
        batches = [to_device(b, device) for b in host_batches]
        per_micro = torch.stack([torch.stack([(b["labels"][:, 1:] != -100).sum(), b["attention_mask"].sum()])
                                 for b in batches]).double()    # [micro-batch, (target tokens, input tokens)]
        totals = acc.reduce(per_micro.sum(0), reduction="sum")  # [target tokens, input tokens], all ranks
        target_tokens = totals[0].clamp_min(1)
        if self.config.loss_weighting == "tokens":  # every target token of the global batch weighs the same
            weights = (acc.num_processes / target_tokens).expand(len(batches))
        else:  # the reference loop: each micro-batch's mean loss / accumulation steps (DDP averages the ranks)
            weights = 1.0 / (per_micro[:, 0].clamp_min(1) * len(batches))

        if hasattr(self.raw_optimizer, "pre_forward"):   # EMA-Nesterov: once per step, not per micro-batch
            self.raw_optimizer.pre_forward()
        self.model.train()
        loss_sum = torch.zeros((), device=device, dtype=torch.float64)
        for i, batch in enumerate(batches):
            last = i == len(batches) - 1
            with contextlib.nullcontext() if last else acc.no_sync(self.model), acc.autocast():
                micro_loss, _ = self.model(batch["input_ids"], batch["labels"])
                acc.backward(micro_loss * weights[i].to(micro_loss.dtype))
            loss_sum += micro_loss.detach().double()
        loss = acc.reduce(loss_sum, reduction="sum") / target_tokens

        grad_norm = None
        if self.config.grad_clip > 0 or logging_now:
            grad_norm = acc.clip_grad_norm_(self.model.parameters(), self.config.grad_clip or math.inf)
        if logging_now and self.config.nonfinite == "stop":
            self.raise_if_nonfinite_since()
        if (logging_now or self.config.nonfinite == "skip") and not self._finite(loss, grad_norm):
            return {"skipped": True}
        self._first_nonfinite = torch.where((self._first_nonfinite < 0) & ~torch.isfinite(loss),
                                            self.step + 1, self._first_nonfinite)
        lr = self.scheduler.get_last_lr()[0]  # this update's (the scheduler then moves to the next one's)
        if self.diagnostics is not None:
            self.diagnostics.before_step(self.step)
        self.optimizer.step()
        if self.diagnostics is not None:
            self.diagnostics.after_step(self.step)
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self._tokens_seen += totals[1]
        return {"skipped": False, "loss": loss, "grad_norm": grad_norm, "lr": lr}

    def raise_if_nonfinite_since(self) -> None:
        """Stop if a step since the last check had a non-finite loss (its update was applied: the
        parameters are no longer finite, and no checkpoint has been written since)."""
        first = int(self._first_nonfinite.item())
        if first >= 0:
            raise NonFiniteError(f"non-finite loss at step {first}, found at step {self.step + 1} (the loss is "
                                 "checked at log steps and before checkpoints): no checkpoint was written after "
                                 f"step {first - 1}. Lower the learning rate, set trainer.grad_clip, or set "
                                 "trainer.nonfinite=skip to skip such steps (checked every step).")

    def check_before_checkpoint(self) -> None:
        """Never write a diverged model: the losses since the last check, then the weights themselves (an update
        can make them non-finite while its loss was finite), in one fused reduction and one host read."""
        self.raise_if_nonfinite_since()
        params = [p.detach() for p in self.model.parameters()]
        finite = torch.isfinite(torch.stack(torch._foreach_norm(params)).float()).all().to(torch.int32)
        if torch.distributed.is_available() and torch.distributed.is_initialized():  # every rank stops together
            torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)
        if not finite.item():
            raise NonFiniteError(f"the weights are not finite after step {self.step} (its loss was finite): no "
                                 f"checkpoint was written after the last one. Lower the learning rate, set "
                                 f"trainer.grad_clip, or set trainer.nonfinite=skip to skip steps whose loss or "
                                 f"gradient is non-finite.")

    def _finite(self, loss: torch.Tensor, grad_norm) -> bool:
        bad = not torch.isfinite(loss).item() or (grad_norm is not None and not torch.isfinite(grad_norm).item())
        if not bad:
            return True
        if self.config.nonfinite == "stop":
            raise NonFiniteError(f"non-finite loss or gradient at step {self.step + 1} (loss={loss.item()}); "
                                 "nothing was updated and the last checkpoint is intact. Lower the learning "
                                 "rate, set trainer.grad_clip, or set trainer.nonfinite=skip to skip such steps.")
        self.optimizer.zero_grad(set_to_none=True)
        self.skipped_steps += 1
        if self.skipped_steps > 100:
            raise NonFiniteError("more than 100 steps skipped for non-finite values; the run has diverged")
        return False

    # -- evaluation ---------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict:
        """Every held-out set: the validation set as eval/..., each of data.extra_eval as eval/<name>/...;
        perf/eval_s: the seconds the passes took (tokenizing a set on first use excluded)."""
        if self.eval_weights is not None:
            self.eval_weights.refresh()
        self.model.eval()
        self.eval_model.eval()
        for name in (None, *self.data.extra_eval_names):
            self.data.held_out_set(name)  # tokenized on first use: not part of the timed passes
        started = time.perf_counter()
        metrics = self._evaluate_set(None, "eval/")
        for name in self.data.extra_eval_names:
            metrics.update(self._evaluate_set(name, f"eval/{name}/"))
        metrics["perf/eval_s"] = time.perf_counter() - started  # each pass ends in .tolist(): the device is done
        self.model.train()
        return metrics

    def _evaluate_set(self, name: str | None, prefix: str) -> dict:
        """Token-weighted loss (exact) and the reference code's paper-compatible loss.

        Paper-compatible: each rank divides the sum of its per-batch mean losses by (batches + 1), the
        reference's off-by-one batch counter; the ranks' figures are then averaged.
        """
        acc = self.accelerator
        sums = torch.zeros(3, device=acc.device, dtype=torch.float64)  # loss sum, tokens, sum of batch means
        batches = 0
        batch_size = self.config.eval_batch(acc.num_processes)
        # fp32: no autocast (eval_model is then not wrapped by Accelerate, whose forward would apply its own)
        autocast = acc.autocast if self.config.eval_precision == "train" else contextlib.nullcontext
        for batch in self.data.eval_batches(batch_size, name):
            batch = to_device(batch, acc.device)
            with autocast():
                loss_sum, count = self.eval_model(batch["input_ids"], batch["labels"])
            loss_sum, count = loss_sum.double(), count.double()
            sums += torch.stack([loss_sum, count, loss_sum / count.clamp_min(1)])
            batches += 1
        paper_rank = sums[2] / (batches + 1)
        totals = acc.reduce(torch.stack([sums[0], sums[1], paper_rank]), reduction="sum").tolist()
        loss = totals[0] / max(totals[1], 1.0)
        paper_loss = totals[2] / acc.num_processes
        return {f"{prefix}loss": loss, f"{prefix}ppl": math.exp(min(loss, 50.0)), f"{prefix}tokens": int(totals[1]),
                f"{prefix}paper_loss": paper_loss, f"{prefix}paper_ppl": math.exp(min(paper_loss, 50.0)),
                f"{prefix}paper_batches": batches}  # this rank's; its paper figure divides by batches + 1

    # -- the run ------------------------------------------------------------------------------------
    def fit(self, loggers) -> dict:
        """Train to the end of the schedule (or a preemption), logging through `loggers` (llmopt.metrics.loggers)."""
        cfg, acc = self.config, self.accelerator
        slots_per_step = cfg.global_batch_size * self.seq_len
        progress = self._progress_bar()
        t_last, step_last, first_record = time.perf_counter(), self.step, True
        while self.step < self.schedule.num_updates:
            if self._stop_now():
                self.preempted = True
                break
            out = self.train_step()
            if out["skipped"]:
                continue
            metrics = {}
            if self._due(cfg.log_every, self.step):
                elapsed = time.perf_counter() - t_last
                steps = self.step - step_last
                slots_per_s = slots_per_step * steps / max(elapsed, 1e-9)
                metrics = {"train/loss": out["loss"].item(), "train/lr": out["lr"],
                           "train/grad_norm": out["grad_norm"].item(), "train/tokens": self.tokens_seen,
                           "perf/token_slots_per_s": slots_per_s, "perf/step_time_s": elapsed / steps,
                           "perf/data_wait_frac": self._data_wait_s / max(elapsed, 1e-9),
                           "perf/peak_memory_gb": peak_memory_bytes(acc.device) / 1e9}
                self._data_wait_s = 0.0
                if self.flops_per_token and self.peak_flops:
                    metrics["perf/mfu"] = slots_per_s * self.flops_per_token / (self.peak_flops * acc.num_processes)
                if self.skipped_steps:
                    metrics["train/skipped_steps"] = self.skipped_steps
                if first_record:  # constant facts, and the optimizer state once it exists
                    metrics.update(self.extra_metrics)
                    metrics["memory/optimizer_state_gb"] = state_bytes(self.raw_optimizer) / 1e9
                    first_record = False
                if self.diagnostics is not None:
                    self.diagnostics.observe_loss(metrics["train/loss"])
                if progress is not None:
                    progress.set_postfix(loss=f"{metrics['train/loss']:.3f}", lr=f"{metrics['train/lr']:.2e}",
                                         tok_s=f"{slots_per_s:,.0f}", refresh=False)
                t_last, step_last = time.perf_counter(), self.step
            if self.diagnostics is not None and self.diagnostics.due(self.step):
                metrics.update(self.diagnostics.collect())
            paused = time.perf_counter()  # evaluation, logging, checkpoints: outside the next record's step time
            if self._due(cfg.eval_every, self.step):
                self.last_eval = self.evaluate()
                metrics.update(self.last_eval)
            if metrics:
                loggers.log(metrics, step=self.step)
            if self.checkpointer is not None and self.step < self.schedule.num_updates and \
                    self.checkpointer.due(self.step):
                self.check_before_checkpoint()
                self.checkpointer.save(self)
            t_last += time.perf_counter() - paused
            if progress is not None:
                progress.update(self.step - progress.n)
        if progress is not None:
            progress.close()
        return self.summary()

    def _stop_now(self) -> bool:
        """A preemption signal stops every rank at the same step boundary."""
        if self.accelerator.num_processes == 1:
            return self.stop_requested()
        if self.step % self.config.log_every:
            return False
        flag = torch.tensor(float(self.stop_requested()), device=self.accelerator.device)
        return bool(self.accelerator.reduce(flag, reduction="sum").item() > 0)

    def _progress_bar(self):
        if not self.accelerator.is_main_process:
            return None
        from tqdm.auto import tqdm
        return tqdm(total=self.schedule.num_updates, initial=self.step, desc="train", dynamic_ncols=True,
                    mininterval=2.0)

    def summary(self) -> dict:
        return {"step": self.step, "updates_planned": self.schedule.num_updates, "tokens_seen": self.tokens_seen,
                "skipped_steps": self.skipped_steps, "preempted": self.preempted, **self.last_eval}
