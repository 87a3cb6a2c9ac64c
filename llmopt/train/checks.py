"""The checks that read more than one config group, made before the model is allocated or anything is written.

(One group's own values are checked by the schema, llmopt/config.py, and by what builds it.)
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable

from llmopt.accounting import estimate_train_bytes
from llmopt.config import TrainerConfig
from llmopt.optim import spec


def check_known(section: str, names: Iterable[str], known: Iterable[str]) -> None:
    """Refuse names (a config section's keys, a dict's) outside `known`, listing the known ones."""
    unknown = sorted(set(names) - set(known))
    if unknown:
        raise ValueError(f"unknown {section} keys {unknown}; the known ones are {sorted(known)}")


def check_arguments(section: str, values: dict, function: Callable, known: bool = True) -> None:
    """A config group given as keyword arguments to `function` (an optimizer class, EMANesterov, make_schedule):
    refuse a value of another kind than the argument's default (`optimizer.lr=abc`); with `known`, also a key
    outside the arguments (the optimizer registry checks its own)."""
    params = inspect.signature(function).parameters
    if known:
        check_known(section, values, [name for name, p in params.items() if p.kind is p.POSITIONAL_OR_KEYWORD])
    for key, value in values.items():
        default = params[key].default if key in params else None
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if isinstance(default, bool) and not isinstance(value, bool) or \
                isinstance(default, (int, float)) and not isinstance(default, bool) and not number:
            kind = "true or false" if isinstance(default, bool) else "a number"
            raise ValueError(f"{section}.{key}={value!r} must be {kind} (its default is {default!r})")


def check_lookahead_window(lookahead: dict, steps: int) -> None:
    """A window that never opens in this run would make EMA-Nesterov a silent no-op (e.g. an experiment's
    fixed window in a shortened run)."""
    start, end = lookahead.get("start_step", 0), lookahead.get("end_step")
    if start >= steps or (end is not None and end <= start):
        raise ValueError(f"the lookahead window [lookahead.start_step={start}, lookahead.end_step={end}) is empty "
                         f"in a run of trainer.steps={steps}: EMA-Nesterov would never look ahead. Set a window "
                         f"inside [0, {steps}) (the default is 30%-80% of trainer.steps)")


def check_sharding(fsdp: bool, optimizer: str, trainer: TrainerConfig) -> None:
    """What FSDP cannot run: an optimizer that reads whole tensors, and a separate fp32 evaluation module (FSDP's
    shards live in the prepared one)."""
    if fsdp and spec(optimizer).whole_tensors:
        raise ValueError(f"optimizer {optimizer!r} needs whole rows or tensors, which FSDP shards; run it "
                         "with DDP (accelerate config configs/accelerate/ddp.yaml)")
    if fsdp and trainer.fp32_eval:
        raise ValueError(f"trainer.eval_precision=fp32 with trainer.precision={trainer.precision} runs under DDP or "
                         "on one device, not FSDP: use configs/accelerate/ddp.yaml, or trainer.eval_precision=train")


def check_positions(seq_len: int, model_config) -> None:
    """A sequence longer than the model's positions would run past the RoPE range it was built for."""
    if seq_len > model_config.max_position_embeddings:
        raise ValueError(f"data.seq_len={seq_len} is above the model's {model_config.max_position_embeddings} "
                         f"positions; set data.seq_len <= {model_config.max_position_embeddings}")


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
