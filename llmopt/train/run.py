"""From one composed config to a finished run: check, build, resume, train, finish.

Only this file reads the whole config; each part is built by a plain function of its own group (build.py), and
everything that can be checked is checked (the schema, checks.py) before the model is allocated or anything is
written.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from llmopt.config import TrainerConfig, check_schema
from llmopt.metrics.throughput import peak_flops
from llmopt.model import flops_per_token, llama_config, param_counts
from llmopt.model.attention import check_attention, check_sdpa_backend, sdpa_backend
from llmopt.model.loss import check_loss
from llmopt.optim import build_optimizer, state_bytes
from llmopt.train.build import (
    ModelCache,
    build_accelerator,
    build_checkpointer,
    build_diagnostics,
    build_models,
    fixed_metrics,
    inductor_options,
    model_key,
    optimizer_kwargs,
    resume_path,
    schedule_from_config,
    trainer_config,
)
from llmopt.train.checkpoint import Checkpointer, export_hf, new_run_id
from llmopt.train.checks import check_lookahead_window, check_memory, check_positions, check_sharding
from llmopt.train.reproducible import deterministic_mode
from llmopt.train.rundir import remove_if_empty
from llmopt.train.signals import stop_signal
from llmopt.train.trainer import Trainer


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

    # -- check ---------------------------------------------------------------------------------------
    schedule = schedule_from_config(cfg, tcfg.steps)
    opt_name, opt_hparams, lookahead = optimizer_kwargs(cfg)
    if lookahead is not None:
        check_lookahead_window(lookahead, tcfg.steps)
    check_attention(tcfg.attention)
    check_loss(tcfg.loss_head, tcfg.loss_dtype)
    compile_options = inductor_options(tcfg.compile_options)
    accelerator = build_accelerator(tcfg.precision, tcfg.device)
    check_sdpa_backend(tcfg.sdpa_backend, tcfg.deterministic, accelerator.device.type, tcfg.precision)
    tcfg.accumulation(accelerator.num_processes)
    tcfg.eval_batch(accelerator.num_processes)
    check_sharding(accelerator.distributed_type == DistributedType.FSDP, opt_name, tcfg)
    model_config = llama_config(cfg.model.flavor, vocab_size=cfg.model.vocab_size, padding_idx=cfg.model.padding_idx)
    check_positions(cfg.data.seq_len, model_config)
    counts = param_counts(model_config)
    check_memory(counts, opt_name, lookahead, tcfg.precision, accelerator.device,
                 fp32_eval_copy=tcfg.fp32_eval and tcfg.precision == "bf16_pure")
    data = build_data(OmegaConf.to_container(cfg.data, resolve=True), micro_batch_size=tcfg.micro_batch_size,
                      rank=accelerator.process_index, world_size=accelerator.num_processes, seed=cfg.seed)
    data.check_vocab(model_config.vocab_size)
    run_dir, checkpoint_dir, run_id = _same_on_every_rank(accelerator, run_dir, Path(cfg.checkpoint.dir))
    _lock_directories(accelerator, {"run directory": run_dir, "checkpoint directory": checkpoint_dir}, held)
    data.build_held_out_sets()  # a source smaller than data.eval_tokens is refused now, not at the first evaluation

    # -- build ---------------------------------------------------------------------------------------
    def build():
        return build_models(model_config, tcfg, cfg.seed, accelerator, compile_options)
    model, loss_model, eval_model, eval_weights = build() if models is None else \
        models.get(model_key(cfg, accelerator), build)
    optimizer = build_optimizer(model, opt_name, lookahead=lookahead, **opt_hparams)
    scheduler = schedule.lr_scheduler(optimizer)
    prepared_optimizer = accelerator.prepare_optimizer(optimizer, device_placement=False)
    checkpointer = build_checkpointer(cfg, checkpoint_dir, accelerator, run_id)

    # -- resume --------------------------------------------------------------------------------------
    resume_from = resume_path(cfg.checkpoint.resume, checkpointer)
    checkpointer.claim(resume_from, continue_run=cfg.checkpoint.resume == "auto")
    resumed = Checkpointer.saved_meta(resume_from) if resume_from is not None else {}
    if resume_from is not None:
        checkpointer.check_identity(resume_from, resumed.get("identity"))  # before anything is written
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
    fixed = fixed_metrics(counts, cfg.model.flavor, opt_name, lookahead)
    trainer = Trainer(loss_model, prepared_optimizer, scheduler, schedule, data, accelerator, tcfg,
                      seq_len=cfg.data.seq_len, flops_per_token=flops_per_token(model_config, cfg.data.seq_len),
                      peak_flops=peak_flops(accelerator.device), extra_metrics=fixed,
                      diagnostics=build_diagnostics(cfg, model, optimizer), checkpointer=checkpointer,
                      stop_requested=stop_signal.requested, eval_model=eval_model, eval_weights=eval_weights)
    if resume_from is not None:
        checkpointer.load(trainer, resume_from)
    start_step = trainer.step

    # -- train ---------------------------------------------------------------------------------------
    stop_signal.install()
    loggers = None
    try:
        # the records start once the checkpoint has loaded: a refused one leaves the earlier records as they were
        loggers = build_loggers(run_dir, OmegaConf.to_container(cfg, resolve=True), accelerator.is_main_process,
                                OmegaConf.to_container(cfg.logger.wandb, resolve=True), resumed=resumed,
                                continue_wandb=cfg.checkpoint.resume == "auto")
        # passed on in the checkpoints (the main process writes trainer.pt)
        checkpointer.lineage = loggers.lineage(run_dir, previous=resumed.get("lineage"))
        summary = trainer.fit(loggers)
        # -- finish: a run resumed at its end trained nothing, its checkpoint is already there -------
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
