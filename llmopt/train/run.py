"""From one resolved config to a finished run: validate, build each component, train, summarize.

Each builder is a plain function of its own config group; only this file reads the whole config.
Everything that can be checked is checked before the model is allocated or anything is written.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
import logging
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from llmopt.accounting import estimate_train_bytes, llmopt_memory_gb, paper_memory_gb
from llmopt.model import build_model, flops_per_token, llama_config, param_counts, use_rotary_table
from llmopt.model.attention import check_attention, check_sdpa_backend, sdpa_backend, use_attention
from llmopt.model.embedding import use_ordered_embedding
from llmopt.model.loss import CausalLMLoss, check_loss
from llmopt.optim import EMANesterov, build_optimizer, spec, state_bytes
from llmopt.train.checkpoint import Checkpointer, export_hf, new_run_id
from llmopt.train.reproducible import deterministic_mode
from llmopt.train.schedule import make_schedule
from llmopt.train.trainer import Trainer, TrainerConfig, WeightCopy

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: "try again" - the sbatch templates requeue the job on it

log = logging.getLogger("llmopt")

TRAINER_ONLY_KEYS = ("compile", "compile_options", "device", "activation_checkpointing", "loss_head", "loss_dtype",
                     "rotary_table", "attention", "sdpa_backend", "deterministic")


def trainer_config(cfg: DictConfig) -> TrainerConfig:
    values = {k: v for k, v in OmegaConf.to_container(cfg.trainer, resolve=True).items()
              if k not in TRAINER_ONLY_KEYS}
    check_known("trainer", values, [f.name for f in dataclasses.fields(TrainerConfig)] + list(TRAINER_ONLY_KEYS))
    return TrainerConfig(**values)


# the sections and keys of configs/train.yaml read here; a `+key` outside them would be silently ignored
TOP_LEVEL_KEYS = ("seed", "run_name", "output_root", "checkpoint", "diagnostics", "model", "data", "optimizer",
                  "lookahead", "schedule", "trainer", "logger")
CHECKPOINT_KEYS = ("dir", "every", "keep", "final", "resume", "export_hf", "allow_other_runs")
DIAGNOSTICS_KEYS = ("every", "init_device")


def check_config_keys(cfg: DictConfig) -> None:
    check_known("top-level", [k for k in cfg if k != "hydra"], TOP_LEVEL_KEYS)
    check_known("checkpoint", cfg.checkpoint, CHECKPOINT_KEYS)
    check_known("diagnostics", cfg.diagnostics, DIAGNOSTICS_KEYS)


def check_known(section: str, names: Iterable[str], known: Iterable[str]) -> None:
    """Refuse names (a config section's keys, a dict's) outside `known`, listing the known ones."""
    unknown = sorted(set(names) - set(known))
    if unknown:
        raise ValueError(f"unknown {section} keys {unknown}; the known ones are {sorted(known)}")


def schedule_from_config(cfg: DictConfig, steps: int):
    """The schedule of cfg.schedule over `steps` updates; an unknown key or a bad value is refused here."""
    values = OmegaConf.to_container(cfg.schedule, resolve=True)
    check_known("schedule", values, [k for k in inspect.signature(make_schedule).parameters if k != "steps"])
    return make_schedule(steps=steps, **values)


def check_lookahead_window(lookahead: dict, steps: int) -> None:
    """A window that never opens in this run would make EMA-Nesterov a silent no-op (e.g. an experiment's
    fixed window in a shortened run)."""
    start, end = lookahead.get("start_step", 0), lookahead.get("end_step")
    if start >= steps or (end is not None and end <= start):
        raise ValueError(f"the lookahead window [lookahead.start_step={start}, lookahead.end_step={end}) is empty "
                         f"in a run of trainer.steps={steps}: EMA-Nesterov would never look ahead. Set a window "
                         f"inside [0, {steps}) (the default is 30%-80% of trainer.steps)")


def inductor_options(options) -> dict:
    """trainer.compile_options as torch.compile's flat inductor options ({"triton": {"enable_pdl": true}} ->
    {"triton.enable_pdl": True}); an unknown name is refused before anything is built."""
    from torch._inductor import config as inductor_config

    def flat(tree, prefix=""):
        for key, value in tree.items():
            if isinstance(value, dict):
                yield from flat(value, f"{prefix}{key}.")
            else:
                yield f"{prefix}{key}", value
    if options is None:
        return {}
    tree = OmegaConf.to_container(options, resolve=True) if isinstance(options, DictConfig) else dict(options)
    flat_options = dict(flat(tree))
    unknown = sorted(set(flat_options) - set(inductor_config.get_config_copy()))
    if unknown:
        raise ValueError(f"trainer.compile_options: unknown inductor options {unknown}; the names are those of "
                         "torch._inductor.config, e.g. trainer.compile_options.coordinate_descent_tuning=true")
    return flat_options


def optimizer_kwargs(cfg: DictConfig) -> tuple[str, dict, dict | None]:
    hparams = OmegaConf.to_container(cfg.optimizer, resolve=True)
    name = hparams.pop("name")
    lookahead = OmegaConf.to_container(cfg.lookahead, resolve=True)
    lookahead = None if lookahead.pop("name") == "none" else lookahead
    if lookahead is not None:
        check_known("lookahead", lookahead, list(inspect.signature(EMANesterov).parameters)[1:])
    return name, hparams, lookahead


def build_accelerator(precision: str, device: str):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"trainer.device must be auto, cpu or cuda, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("trainer.device=cuda but no CUDA device is visible; use trainer.device=auto or cpu")

    mixed = "bf16" if precision == "amp_bf16" else "no"
    if AcceleratorState._shared_state and str(AcceleratorState().mixed_precision) != mixed:
        # several runs in one process (sweeps, benchmarks) may differ in precision; Accelerate keeps one
        # process-wide state, which must be reset to change it (the distributed setup is kept)
        AcceleratorState._reset_state(reset_partial_state=False)
    # without CUDA, "auto" must still set up gloo under torchrun / accelerate launch
    cpu = device == "cpu" or (device == "auto" and not torch.cuda.is_available())
    accelerator = Accelerator(mixed_precision=mixed, cpu=cpu, step_scheduler_with_optimizer=False)
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != accelerator.num_processes:
        raise ValueError(f"the launcher started {launched} processes but Accelerate set up "
                         f"{accelerator.num_processes}; check the accelerate config / trainer.device")
    return accelerator


def check_memory(counts: dict, optimizer: str, lookahead: dict | None, precision: str, device,
                 fp32_eval_copy: bool = False) -> None:
    """Refuse a model too large for the device before allocating it (`fp32_eval_copy`: plus an fp32 copy of the
    weights for evaluation)."""
    from llmopt.metrics.throughput import device_memory_bytes

    need = estimate_train_bytes(counts, optimizer, "ema_nesterov" if lookahead else None, precision,
                                (lookahead or {}).get("momentum_dtype", "float32"))
    if need is not None and fp32_eval_copy:
        need += 4 * counts["total"]
    have = device_memory_bytes(device)
    if need is not None and have is not None and need > 0.95 * have:
        raise MemoryError(
            f"weights + gradients + {optimizer} state need about {need / 1e9:.1f} GB in {precision} "
            f"before any activation ({counts['total'] / 1e6:.0f}M parameters), but the device has "
            f"{have / 1e9:.1f} GB. Use a smaller model flavor, trainer.precision=bf16_pure, a "
            "lighter optimizer, or more devices." + (" (The fp32 evaluation copy of trainer.eval_precision=fp32 "
                                                     "is included.)" if fp32_eval_copy else ""))


class ModelCache:
    """Built, compiled and prepared models kept across the runs of one process (a sweep, the mini-protocol),
    so that compilation is paid once per model kind: a reused model gets its initial weights back, copied
    into the same parameter tensors (the compiled graph stays valid)."""

    def __init__(self):
        self._entries: dict[tuple, tuple] = {}

    def get(self, key: tuple, build):
        """What `build()` returns for `key`, a tuple (model, ...): built the first time, after that the same objects
        with the model's initial weights back."""
        if key not in self._entries:
            built = build()
            initial = {k: v.detach().to("cpu", copy=True) for k, v in built[0].state_dict().items()}
            self._entries[key] = (built, initial)
            return built
        built, initial = self._entries[key]
        built[0].load_state_dict(initial)
        built[0].zero_grad(set_to_none=True)
        return built


def run(cfg: DictConfig, run_dir: Path, models: ModelCache | None = None) -> dict:
    """Train one run in `run_dir`; `models` (optional) reuses compiled models across runs of one process."""
    deterministic = bool(cfg.trainer.get("deterministic", False))
    attention_kernel = str(cfg.trainer.get("sdpa_backend", "auto"))
    check_sdpa_backend(attention_kernel, deterministic)  # before anything is built
    with deterministic_mode(deterministic), sdpa_backend(attention_kernel), contextlib.ExitStack() as held:
        return _run(cfg, run_dir, models, deterministic, attention_kernel, held)


def _run(cfg: DictConfig, run_dir: Path, models: ModelCache | None, deterministic: bool,
         attention_kernel: str, held: contextlib.ExitStack) -> dict:
    from accelerate.utils import DistributedType

    from llmopt.data import build_data
    from llmopt.metrics.loggers import build_loggers

    # -- validate ---------------------------------------------------------------------------------
    check_config_keys(cfg)
    tcfg = trainer_config(cfg)
    schedule = schedule_from_config(cfg, tcfg.steps)
    opt_name, opt_hparams, lookahead = optimizer_kwargs(cfg)
    if lookahead is not None:
        check_lookahead_window(lookahead, tcfg.steps)
    check_attention(str(cfg.trainer.get("attention", "sdpa")))  # before anything is built
    loss_head = str(cfg.trainer.get("loss_head", "auto"))
    loss_dtype = str(cfg.trainer.get("loss_dtype", "float32"))
    check_loss(loss_head, loss_dtype)
    compile_options = inductor_options(cfg.trainer.get("compile_options"))
    accelerator = build_accelerator(tcfg.precision, cfg.trainer.device)
    check_sdpa_backend(attention_kernel, deterministic, accelerator.device.type, tcfg.precision)
    tcfg.accumulation(accelerator.num_processes)
    tcfg.eval_batch(accelerator.num_processes)
    if accelerator.distributed_type == DistributedType.FSDP and spec(opt_name).whole_tensors:
        raise ValueError(f"optimizer {opt_name!r} needs whole rows or tensors, which FSDP shards; run it "
                         "with DDP (accelerate config configs/accelerate/ddp.yaml)")
    # fp32 evaluation runs a module of its own beside the prepared one (see build()); FSDP's shards live in the latter
    fp32_eval = tcfg.eval_precision == "fp32" and tcfg.precision != "fp32"
    if accelerator.distributed_type == DistributedType.FSDP and fp32_eval:
        raise ValueError(f"trainer.eval_precision=fp32 with trainer.precision={tcfg.precision} runs under DDP or on "
                         "one device, not FSDP: use configs/accelerate/ddp.yaml, or trainer.eval_precision=train")
    model_config = llama_config(cfg.model.flavor, vocab_size=cfg.model.vocab_size,
                                max_seq_len=max(2048, int(cfg.data.seq_len)),
                                padding_idx=int(cfg.model.get("padding_idx", 0)))
    counts = param_counts(model_config)
    check_memory(counts, opt_name, lookahead, tcfg.precision, accelerator.device,
                 fp32_eval_copy=fp32_eval and tcfg.precision == "bf16_pure")
    data = build_data(OmegaConf.to_container(cfg.data, resolve=True), micro_batch_size=tcfg.micro_batch_size,
                      rank=accelerator.process_index, world_size=accelerator.num_processes, seed=cfg.seed)
    data.check_vocab(model_config.vocab_size)
    run_dir, checkpoint_dir, run_id = _same_on_every_rank(accelerator, run_dir, Path(cfg.checkpoint.dir))
    _lock_directories(accelerator, {"run directory": run_dir, "checkpoint directory": checkpoint_dir}, held)

    # -- build --------------------------------------------------------------------------------------
    dtype = torch.bfloat16 if tcfg.precision == "bf16_pure" else torch.float32
    checkpoint_activations = bool(cfg.trainer.get("activation_checkpointing", False))
    rotary_table = bool(cfg.trainer.get("rotary_table", True))
    attention = str(cfg.trainer.get("attention", "sdpa"))

    def build_lm(weights_dtype):
        model = build_model(model_config, seed=cfg.seed, device=accelerator.device, dtype=weights_dtype)
        if rotary_table:
            use_rotary_table(model)
        use_attention(model, attention)
        return model

    def loss_module(lm):
        loss_model = CausalLMLoss(lm, head=loss_head, loss_dtype=loss_dtype)
        return torch.compile(loss_model, options=compile_options or None) if cfg.trainer.compile else loss_model

    def build():
        model = build_lm(dtype)
        if deterministic:  # compiled, the embedding's ordered gradient is otherwise slow on real text
            use_ordered_embedding(model)
        if checkpoint_activations:
            # recompute each decoder layer's activations in the backward pass: memory for time (large
            # flavors on one GPU); non-reentrant, which torch.compile and no_sync accumulation support
            if hasattr(model, "activation_checkpointing_enable"):   # the name since transformers 5.x
                model.activation_checkpointing_enable({"use_reentrant": False})
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        loss_model = accelerator.prepare_model(loss_module(model))
        eval_model, eval_weights = loss_model, None
        if fp32_eval and tcfg.precision == "amp_bf16":
            # the same fp32 weights through a module Accelerate has not wrapped: its forward would autocast
            eval_model = loss_module(model)
        elif fp32_eval:  # bf16_pure: an fp32 model, given the training weights before each evaluation
            eval_lm = build_lm(torch.float32)
            eval_model, eval_weights = loss_module(eval_lm), WeightCopy(model, eval_lm)
        return model, loss_model, eval_model, eval_weights

    if models is None:
        model, loss_model, eval_model, eval_weights = build()
    else:
        key = (cfg.model.flavor, model_config.vocab_size, model_config.max_position_embeddings,
               model_config.pad_token_id, cfg.seed,
               tcfg.precision, bool(cfg.trainer.compile), tuple(sorted(compile_options.items())),
               checkpoint_activations, loss_head, loss_dtype, rotary_table, attention,
               attention_kernel,  # a compiled graph holds the kernel chosen when it was traced
               str(accelerator.device), accelerator.num_processes, deterministic, tcfg.eval_precision)
        model, loss_model, eval_model, eval_weights = models.get(key, build)
    optimizer = build_optimizer(model, opt_name, lookahead=lookahead, **opt_hparams)
    scheduler = schedule.lr_scheduler(optimizer)
    prepared_optimizer = accelerator.prepare_optimizer(optimizer, device_placement=False)

    checkpointer = Checkpointer(checkpoint_dir, accelerator, every=cfg.checkpoint.every,
                                keep=cfg.checkpoint.keep,
                                sharded=accelerator.distributed_type == DistributedType.FSDP,
                                identity=run_identity(cfg),
                                allow_other_runs=bool(cfg.checkpoint.get("allow_other_runs", False)), run_id=run_id)
    resume_from = _resume_path(cfg.checkpoint.resume, checkpointer)
    checkpointer.claim(resume_from, continue_run=cfg.checkpoint.resume == "auto")
    resumed = Checkpointer.saved_meta(resume_from) if resume_from is not None else {}
    if resume_from is not None:
        checkpointer.check_identity(resume_from, resumed.get("identity"))  # before anything is written
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
    diagnostics = None
    if cfg.diagnostics.every:
        from llmopt.metrics.diagnostics import Diagnostics
        diagnostics = Diagnostics(model, optimizer, every=cfg.diagnostics.every,
                                  init_device=cfg.diagnostics.init_device)
    fixed = {"model/params": counts["total"],
             "memory/paper_gb": _memory_gb(paper_memory_gb, cfg.model.flavor, opt_name, lookahead),
             "memory/llmopt_gb": _memory_gb(llmopt_memory_gb, cfg.model.flavor, opt_name, lookahead)}
    trainer = Trainer(loss_model, prepared_optimizer, scheduler, schedule, data, accelerator, tcfg, None,
                      seq_len=int(cfg.data.seq_len),
                      flops_per_token=flops_per_token(model_config, int(cfg.data.seq_len)),
                      peak_flops=_peak(accelerator.device), extra_metrics=fixed, diagnostics=diagnostics,
                      checkpointer=checkpointer, stop_requested=stop_signal.requested,
                      eval_model=eval_model, eval_weights=eval_weights)
    if resume_from is not None:
        checkpointer.load(trainer, resume_from)
    start_step = trainer.step
    # -- train --------------------------------------------------------------------------------------
    stop_signal.install()
    loggers = None
    try:
        # the records start once the checkpoint has loaded: a refused one leaves the earlier records as they were
        trainer.loggers = loggers = build_loggers(
            run_dir, OmegaConf.to_container(cfg, resolve=True), accelerator.is_main_process,
            OmegaConf.to_container(cfg.logger.wandb, resolve=True), resumed=resumed,
            continue_wandb=cfg.checkpoint.resume == "auto")
        # passed on in the checkpoints (the main process writes trainer.pt)
        checkpointer.lineage = loggers.lineage(run_dir, previous=resumed.get("lineage"))
        summary = trainer.fit()
        # a run resumed at its end trained nothing: its checkpoint is already there
        if (cfg.checkpoint.final or trainer.preempted) and trainer.step > start_step:
            trainer.check_before_checkpoint()
            checkpointer.save(trainer)
        if cfg.checkpoint.export_hf and not trainer.preempted and accelerator.is_main_process:
            export_hf(accelerator.unwrap_model(loss_model).lm, run_dir / "hf_model")
    finally:
        stop_signal.uninstall()
        if loggers is not None:
            loggers.close()
        data.close()
    summary.update({"run_dir": str(run_dir), "is_main": accelerator.is_main_process, "optimizer": opt_name,
                    "resumed_from": str(resume_from) if resume_from is not None else None,
                    "lookahead": bool(lookahead), "flavor": cfg.model.flavor, "precision": tcfg.precision,
                    "processes": accelerator.num_processes, "params": counts["total"],
                    "optimizer_state_bytes": state_bytes(optimizer), **fixed})
    if accelerator.is_main_process:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _lock_directories(accelerator, directories: dict[str, Path], held: contextlib.ExitStack) -> None:
    """One run at a time in each directory (llmopt.train.lock): the main process takes the locks, held until the
    run ends; a refusal stops every rank."""
    from llmopt.train.lock import DirectoryLocked, RunLock

    refusal = None
    if accelerator.is_main_process:
        try:
            locked = set()
            for what, directory in directories.items():
                if directory.resolve() not in locked:  # checkpoint.dir may be the run directory itself
                    held.enter_context(RunLock(directory, what))
                    locked.add(directory.resolve())
        except DirectoryLocked as err:
            refusal = (str(err), str(err.directory))
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        refusal = broadcast_object_list([refusal], from_process=0)[0]
    if refusal is not None:
        raise DirectoryLocked(*refusal)


def _same_on_every_rank(accelerator, run_dir: Path, checkpoint_dir: Path) -> tuple[Path, Path, str]:
    """Rank 0's run and checkpoint directories for every rank (Hydra names them from the clock, and ranks that
    start in different seconds would otherwise disagree), and one new run id (Checkpointer)."""
    run_id = new_run_id()
    if accelerator.num_processes == 1:
        return run_dir, checkpoint_dir, run_id
    from accelerate.utils import broadcast_object_list

    chosen = broadcast_object_list([str(run_dir), str(checkpoint_dir), run_id], from_process=0)
    if not accelerator.is_main_process and str(run_dir) != chosen[0]:
        remove_if_empty(run_dir)
    return Path(chosen[0]), Path(chosen[1]), chosen[2]


# what a resumed run must share with the run that wrote the checkpoint (the rest: throughput, logging, I/O)
IDENTITY_SECTIONS = ("seed", "model", "optimizer", "lookahead", "schedule")
# (eval_precision: one run's evaluations are all in one precision)
IDENTITY_KEYS = {"trainer": ("steps", "global_batch_size", "precision", "grad_clip", "loss_weighting",
                             "eval_precision", "loss_dtype"),
                 "data": ("name", "mode", "seq_len", "tokenizer", "vocab_size", "shuffle_seed", "train",
                          "window_shuffle_buffer")}


def run_identity(cfg: DictConfig) -> dict:
    """The settings that define a run's trajectory, flat ("optimizer.lr": 0.001, ...)."""
    tree = {k: OmegaConf.to_container(cfg[k], resolve=True) if OmegaConf.is_config(cfg[k]) else cfg[k]
            for k in IDENTITY_SECTIONS}
    for section, keys in IDENTITY_KEYS.items():
        values = OmegaConf.to_container(cfg[section], resolve=True)
        tree[section] = {k: values.get(k) for k in keys}

    def flat(value, prefix):
        if isinstance(value, dict):
            for key, item in value.items():
                yield from flat(item, f"{prefix}.{key}" if prefix else key)
        else:
            yield prefix, value
    return dict(flat(tree, ""))


def _resume_path(resume: str, checkpointer: Checkpointer) -> Path | None:
    if resume in (None, "none"):
        return None
    if resume == "auto":
        return checkpointer.latest_valid()
    path = Path(resume)
    if not path.is_dir():
        raise ValueError(f"checkpoint.resume={resume!r} is not a directory; give a step_<8 digits> directory, "
                         "auto or none")
    return path


class StopSignal:
    """SIGTERM / SIGUSR1 (SLURM's warning before the time limit) ask the loop to stop at the next step
    boundary; the run then checkpoints and exits with PREEMPTED_EXIT_CODE."""

    SIGNALS = ("SIGTERM", "SIGUSR1")

    def __init__(self):
        self.received: str | None = None
        self._previous: dict = {}

    def requested(self) -> bool:
        return self.received is not None

    def _handle(self, signum, frame) -> None:
        import signal
        self.received = signal.Signals(signum).name
        log.warning("received %s: stopping after the current step to checkpoint", self.received)

    def install(self) -> None:
        import signal
        import threading
        if threading.current_thread() is not threading.main_thread():
            return
        for name in self.SIGNALS:
            if hasattr(signal, name):
                self._previous[name] = signal.signal(getattr(signal, name), self._handle)

    def uninstall(self) -> None:
        import signal
        for name, handler in self._previous.items():
            signal.signal(getattr(signal, name), handler)
        self._previous.clear()


stop_signal = StopSignal()


def _memory_gb(accounting, flavor: str, optimizer: str, lookahead) -> float | None:
    """paper_memory_gb or llmopt_memory_gb of the run; None where the accounting or the paper's vocabulary
    does not apply."""
    from llmopt.model import FLAVORS

    if spec(optimizer).paper_states is None or FLAVORS[flavor].vocab != 32000:
        return None
    return accounting(flavor, optimizer, "ema_nesterov" if lookahead else None)


def _peak(device):
    from llmopt.metrics.throughput import peak_flops
    return peak_flops(device)


def remove_if_empty(run_dir: Path) -> None:
    """Hydra creates the run directory before the job starts; a refused run leaves nothing behind."""
    if run_dir.is_dir() and not any(run_dir.iterdir()):
        _remove_run_dir(run_dir)


def remove_if_unstarted(run_dir: Path) -> None:
    """A run that failed before logging its first step (bad data files, a logger that cannot start, a refused
    checkpoint) leaves nothing behind: no summary, no metrics, no checkpoint in its directory."""
    metrics = run_dir / "metrics.jsonl"
    if not run_dir.is_dir() or (run_dir / "summary.json").exists() or any(run_dir.rglob("step_*")):
        return
    if not metrics.exists() or metrics.stat().st_size == 0:
        _remove_run_dir(run_dir)


def _remove_run_dir(run_dir: Path) -> None:
    shutil.rmtree(run_dir, ignore_errors=True)
    if not any(run_dir.parent.iterdir()):  # the date directory Hydra made for it
        run_dir.parent.rmdir()


def format_summary(summary: dict) -> str:
    rows = [("run", summary.get("run_dir")), ("optimizer", summary.get("optimizer")
                                               + (" + ema_nesterov" if summary.get("lookahead") else "")),
            ("model", f"{summary.get('flavor')} ({summary.get('params', 0) / 1e6:.2f}M params)"),
            ("steps", f"{summary.get('step')} / {summary.get('updates_planned')}"),
            ("tokens seen (non-pad)", f"{summary.get('tokens_seen', 0):,}")]
    if "eval/loss" in summary:
        rows += [("eval loss (token-weighted)", f"{summary['eval/loss']:.4f}  ppl {summary['eval/ppl']:.2f}"),
                 ("eval loss (paper-compatible)",
                  f"{summary['eval/paper_loss']:.4f}  ppl {summary['eval/paper_ppl']:.2f}")]
    rows += [(f"eval loss, {key.split('/')[1]} set", f"{value:.4f}  ppl {summary[key[:-4] + 'ppl']:.2f}")
             for key, value in summary.items() if key.count("/") == 2 and key.endswith("/loss")]
    rows.append(("optimizer state (measured)", f"{summary.get('optimizer_state_bytes', 0) / 1e6:.2f} MB"))
    if summary.get("memory/paper_gb") is not None:
        rows.append(("weights+state (paper accounting)", f"{summary['memory/paper_gb']:.2f} GB"))
    if summary.get("memory/llmopt_gb") is not None:
        rows.append(("weights+state (llmopt's states, paper units)", f"{summary['memory/llmopt_gb']:.2f} GB"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
