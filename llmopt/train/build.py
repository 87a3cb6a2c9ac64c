"""Building a run's parts, each a plain function of its own config: accelerator, models (and ModelCache),
optimizer and schedule arguments, checkpointer, diagnostics."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from llmopt.accounting import llmopt_memory_gb, paper_memory_gb
from llmopt.config import TrainerConfig
from llmopt.model import build_model, use_rotary_table
from llmopt.model.attention import use_attention
from llmopt.model.embedding import use_ordered_embedding
from llmopt.model.loss import CausalLMLoss
from llmopt.optim import EMANesterov, spec
from llmopt.train.checkpoint import Checkpointer
from llmopt.train.checks import check_arguments
from llmopt.train.schedule import make_schedule
from llmopt.train.trainer import WeightCopy


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


def model_key(cfg: DictConfig, accelerator) -> str:
    """What the built models depend on, a ModelCache key: the model and trainer groups, the seed, the devices."""
    groups = {k: OmegaConf.to_container(cfg[k], resolve=True) for k in ("model", "trainer")}
    return json.dumps({**groups, "seed": cfg.seed, "device": str(accelerator.device),
                       "processes": accelerator.num_processes}, sort_keys=True)


class ModelCache:
    """Built, compiled and prepared models kept across the runs of one process (a sweep, the mini-protocol),
    so that compilation is paid once per model kind: a reused model gets its initial weights back, copied
    into the same parameter tensors (the compiled graph stays valid)."""

    def __init__(self):
        self._entries: dict = {}

    def get(self, key, build):
        """What `build()` returns for `key` (model_key), a tuple (model, ...): built the first time, after that the
        same objects with the model's initial weights back."""
        if key not in self._entries:
            built = build()
            initial = {k: v.detach().to("cpu", copy=True) for k, v in built[0].state_dict().items()}
            self._entries[key] = (built, initial)
            return built
        built, initial = self._entries[key]
        built[0].load_state_dict(initial)
        built[0].zero_grad(set_to_none=True)
        return built


def build_models(model_config, tcfg: TrainerConfig, seed: int, accelerator, compile_options: dict) -> tuple:
    """(model, loss_model, eval_model, eval_weights): the LM, its loss module as Accelerate prepared it, the loss
    module evaluations run (a separate fp32 one under trainer.eval_precision=fp32) and the WeightCopy into it."""
    dtype = torch.bfloat16 if tcfg.precision == "bf16_pure" else torch.float32

    def build_lm(weights_dtype):
        model = build_model(model_config, seed=seed, device=accelerator.device, dtype=weights_dtype)
        if tcfg.rotary_table:
            use_rotary_table(model)
        use_attention(model, tcfg.attention)
        return model

    def loss_module(lm):
        loss_model = CausalLMLoss(lm, head=tcfg.loss_head, loss_dtype=tcfg.loss_dtype)
        return torch.compile(loss_model, options=compile_options or None) if tcfg.compile else loss_model

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
    if tcfg.fp32_eval and tcfg.precision == "amp_bf16":
        # the same fp32 weights through a module Accelerate has not wrapped: its forward would autocast
        eval_model = loss_module(model)
    elif tcfg.fp32_eval:  # bf16_pure: an fp32 model, given the training weights before each evaluation
        eval_lm = build_lm(torch.float32)
        eval_model, eval_weights = loss_module(eval_lm), WeightCopy(model, eval_lm)
    return model, loss_model, eval_model, eval_weights


def build_checkpointer(cfg: DictConfig, checkpoint_dir: Path, accelerator, run_id: str) -> Checkpointer:
    from accelerate.utils import DistributedType

    return Checkpointer(checkpoint_dir, accelerator, every=cfg.checkpoint.every, keep=cfg.checkpoint.keep,
                        sharded=accelerator.distributed_type == DistributedType.FSDP, identity=run_identity(cfg),
                        allow_other_runs=cfg.checkpoint.allow_other_runs, run_id=run_id)


def resume_path(resume: str, checkpointer: Checkpointer) -> Path | None:
    """checkpoint.resume as the checkpoint to resume from: none, the newest valid one (auto), or the one named."""
    if resume in (None, "none"):
        return None
    if resume == "auto":
        return checkpointer.latest_valid()
    path = Path(resume)
    if not path.is_dir():
        raise ValueError(f"checkpoint.resume={resume!r} is not a directory; give a step_<8 digits> directory, "
                         "auto or none")
    return path


def build_diagnostics(cfg: DictConfig, model, optimizer):
    """Per-layer diagnostics every cfg.diagnostics.every steps; None when off."""
    if not cfg.diagnostics.every:
        return None
    from llmopt.metrics.diagnostics import Diagnostics
    return Diagnostics(model, optimizer, every=cfg.diagnostics.every, init_device=cfg.diagnostics.init_device)


def fixed_metrics(counts: dict, flavor: str, optimizer: str, lookahead) -> dict:
    """The run's constant facts, logged with its first record and in its summary."""
    return {"model/params": counts["total"],
            "memory/paper_gb": memory_gb(paper_memory_gb, flavor, optimizer, lookahead),
            "memory/llmopt_gb": memory_gb(llmopt_memory_gb, flavor, optimizer, lookahead)}


def memory_gb(accounting, flavor: str, optimizer: str, lookahead) -> float | None:
    """paper_memory_gb or llmopt_memory_gb of the run; None where the accounting or the paper's vocabulary
    does not apply."""
    from llmopt.model import FLAVORS

    if spec(optimizer).paper_states is None or FLAVORS[flavor].vocab != 32000:
        return None
    return accounting(flavor, optimizer, "ema_nesterov" if lookahead else None)


def _peak(device):
    from llmopt.metrics.throughput import peak_flops
    return peak_flops(device)


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

