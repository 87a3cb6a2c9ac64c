"""From one resolved config to a finished run: validate, build each component, train, summarize.

Each builder is a plain function of its own config group; only this file reads the whole config.
Everything that can be checked is checked before the model is allocated or anything is written.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from llmopt.config import TrainerConfig, check_schema
from llmopt.model import build_model, flops_per_token, llama_config, param_counts, use_rotary_table
from llmopt.model.attention import check_attention, check_sdpa_backend, sdpa_backend, use_attention
from llmopt.model.embedding import use_ordered_embedding
from llmopt.model.loss import CausalLMLoss, check_loss
from llmopt.optim import EMANesterov, build_optimizer, llmopt_memory_gb, paper_memory_gb, spec, state_bytes
from llmopt.train.checkpoint import Checkpointer, export_hf, new_run_id
from llmopt.train.checks import check_arguments, check_lookahead_window, check_memory, check_positions, check_sharding
from llmopt.train.reproducible import deterministic_mode
from llmopt.train.schedule import make_schedule
from llmopt.train.trainer import Trainer, WeightCopy

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: "try again" - the sbatch templates requeue the job on it

log = logging.getLogger("llmopt")

def trainer_config(cfg: DictConfig) -> TrainerConfig:
    """cfg.trainer as the TrainerConfig it was composed onto, its values checked (TrainerConfig.__post_init__)."""
    return TrainerConfig(**OmegaConf.to_container(cfg.trainer, resolve=True))


def schedule_from_config(cfg: DictConfig, steps: int):
    """The schedule of cfg.schedule over `steps` updates; an unknown key or a bad value is refused here."""
    values = OmegaConf.to_container(cfg.schedule, resolve=True)
    check_arguments("schedule", {"steps": steps, **values}, make_schedule)
    return make_schedule(steps=steps, **values)


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
    entry = spec(name)
    check_arguments("optimizer", hparams, entry.cls or entry.build, known=False)
    if lookahead is not None:
        check_arguments("lookahead", lookahead, EMANesterov.__init__)
    return name, hparams, lookahead


def build_accelerator(precision: str, device: str):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

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
    check_schema(cfg)
    tcfg = trainer_config(cfg)
    check_sdpa_backend(tcfg.sdpa_backend, tcfg.deterministic)  # before anything is built
    with deterministic_mode(tcfg.deterministic), sdpa_backend(tcfg.sdpa_backend), contextlib.ExitStack() as held:
        return _run(cfg, tcfg, run_dir, models, held)


def _run(cfg: DictConfig, tcfg: TrainerConfig, run_dir: Path, models: ModelCache | None,
         held: contextlib.ExitStack) -> dict:
    from accelerate.utils import DistributedType

    from llmopt.data import build_data
    from llmopt.metrics.loggers import build_loggers

    # -- validate ---------------------------------------------------------------------------------
    schedule = schedule_from_config(cfg, tcfg.steps)
    opt_name, opt_hparams, lookahead = optimizer_kwargs(cfg)
    if lookahead is not None:
        check_lookahead_window(lookahead, tcfg.steps)
    check_attention(tcfg.attention)  # before anything is built
    check_loss(tcfg.loss_head, tcfg.loss_dtype)
    compile_options = inductor_options(tcfg.compile_options)
    accelerator = build_accelerator(tcfg.precision, tcfg.device)
    check_sdpa_backend(tcfg.sdpa_backend, tcfg.deterministic, accelerator.device.type, tcfg.precision)
    tcfg.accumulation(accelerator.num_processes)
    tcfg.eval_batch(accelerator.num_processes)
    check_sharding(accelerator.distributed_type == DistributedType.FSDP, opt_name, tcfg)
    fp32_eval = tcfg.fp32_eval
    model_config = llama_config(cfg.model.flavor, vocab_size=cfg.model.vocab_size, padding_idx=cfg.model.padding_idx)
    check_positions(cfg.data.seq_len, model_config)
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

    def build_lm(weights_dtype):
        model = build_model(model_config, seed=cfg.seed, device=accelerator.device, dtype=weights_dtype)
        if tcfg.rotary_table:
            use_rotary_table(model)
        use_attention(model, tcfg.attention)
        return model

    def loss_module(lm):
        loss_model = CausalLMLoss(lm, head=tcfg.loss_head, loss_dtype=tcfg.loss_dtype)
        return torch.compile(loss_model, options=compile_options or None) if tcfg.compile else loss_model

    def build():
        model = build_lm(dtype)
        if tcfg.deterministic:  # compiled, the embedding's ordered gradient is otherwise slow on real text
            use_ordered_embedding(model)
        if tcfg.activation_checkpointing:
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
               tcfg.precision, tcfg.compile, tuple(sorted(compile_options.items())),
               tcfg.activation_checkpointing, tcfg.loss_head, tcfg.loss_dtype, tcfg.rotary_table, tcfg.attention,
               tcfg.sdpa_backend,  # a compiled graph holds the kernel chosen when it was traced
               str(accelerator.device), accelerator.num_processes, tcfg.deterministic, tcfg.eval_precision)
        model, loss_model, eval_model, eval_weights = models.get(key, build)
    optimizer = build_optimizer(model, opt_name, lookahead=lookahead, **opt_hparams)
    scheduler = schedule.lr_scheduler(optimizer)
    prepared_optimizer = accelerator.prepare_optimizer(optimizer, device_placement=False)

    checkpointer = Checkpointer(checkpoint_dir, accelerator, every=cfg.checkpoint.every,
                                keep=cfg.checkpoint.keep,
                                sharded=accelerator.distributed_type == DistributedType.FSDP,
                                identity=run_identity(cfg),
                                allow_other_runs=cfg.checkpoint.allow_other_runs, run_id=run_id)
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
