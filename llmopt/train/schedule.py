"""Learning-rate schedules as multipliers of every group's peak lr (torch LambdaLR).

The factor of update s (0-based, s = 0..steps-1):
  cosine    linear warmup to 1 over `warmup` updates, then cosine down to min_lr_ratio at the last update
  wsd       warmup, stable at 1, then a decay to min_lr_ratio over the last `decay` updates: linear, or
            exponential (decay_type), factor = min_lr_ratio ** progress (the EMA-Nesterov code's
            wsd_quick_recovery default)
  constant  warmup, then 1
Warmup reaches the peak on its last update and the first update is not at lr 0.

reference_quirks=True reproduces the GaLore-protocol code exactly: factor(s) = s / warmup during
warmup (the first update runs at lr 0) and the loop makes steps + 1 updates. Its cosine is cyclical with
the run as one cycle, so the extra update N starts a second cycle: 1e-7 (a restarted warmup's first steps),
or 1 without warmup. Without the quirks, factor_ours(s) = factor_reference(s + 1) and there are `steps`
updates.

start_at_zero=True reproduces the SGD-LL and EMA-Nesterov code's loop: its counter starts at 0 too (factor(s) =
factor_reference(s), the first update at lr 0 during warmup), but it stops after exactly `steps` updates.

The wsd decay, in the reference counter s: progress = (s - (steps - decay)) / decay, clipped to [0, 1], so the
counter steps - decay is still at 1; the last of `steps` updates runs at progress (decay - 1) / decay under
start_at_zero (the authors' loop), at progress 1 (min_lr_ratio) otherwise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

SCHEDULES = ("cosine", "wsd", "constant")
DECAY_TYPES = ("linear", "exponential")   # the wsd decay


@dataclass(frozen=True)
class Schedule:
    name: str = "cosine"
    steps: int = 1000
    warmup: int = 100
    min_lr_ratio: float = 0.1
    decay: int = 0                  # wsd only: updates of the final decay
    decay_type: str | None = None   # wsd only: linear (None) | exponential
    reference_quirks: bool = False
    start_at_zero: bool = False     # update s at the reference's factor(s); implied by reference_quirks

    def __post_init__(self):
        if self.name not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.name!r}; choose one of {list(SCHEDULES)}")
        if self.steps < 1 or self.warmup < 0 or self.warmup > self.steps:
            raise ValueError(f"schedule needs steps >= 1 and 0 <= warmup <= steps, got steps={self.steps}, "
                             f"warmup={self.warmup}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.name == "wsd" and not 0 <= self.decay <= self.steps - self.warmup:
            raise ValueError(f"wsd decay must be in [0, steps - warmup], got {self.decay}")
        if self.decay_type is not None and self.name != "wsd":
            raise ValueError(f"schedule.decay_type is the wsd decay's shape; schedule={self.name} has none. Remove "
                             f"schedule.decay_type, or use schedule=wsd")
        if self.decay_type not in (None, *DECAY_TYPES):
            raise ValueError(f"unknown schedule.decay_type {self.decay_type!r}; choose one of {list(DECAY_TYPES)}")
        if self.decay_type == "exponential" and self.min_lr_ratio <= 0:
            raise ValueError("schedule.decay_type=exponential decays to min_lr_ratio x peak, which must be > 0 "
                             f"(got min_lr_ratio={self.min_lr_ratio}); raise it, or use decay_type=linear")

    @property
    def num_updates(self) -> int:
        return self.steps + 1 if self.reference_quirks else self.steps

    def factor(self, update: int) -> float:
        # the reference's step counter for this update
        s = update if self.reference_quirks or self.start_at_zero else update + 1
        if self.reference_quirks and self.name == "cosine" and s >= self.steps:
            s -= self.steps  # the reference's next cycle (cycle length = steps): its restarted warmup starts at 1e-7
            if s < min(2, self.warmup):
                return 1e-7
        if s < self.warmup:
            return s / self.warmup
        if self.name == "constant":
            return 1.0
        if self.name == "cosine":
            progress = min(1.0, (s - self.warmup) / max(1, self.steps - self.warmup))
            return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
        decay_start = self.steps - self.decay
        if s <= decay_start:
            return 1.0
        progress = min(1.0, (s - decay_start) / max(1, self.decay))
        if self.decay_type == "exponential":
            return self.min_lr_ratio ** progress
        return 1.0 - (1.0 - self.min_lr_ratio) * progress

    def lr_scheduler(self, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
        """A LambdaLR on the optimizer; the trainer steps it once per optimizer step."""
        return torch.optim.lr_scheduler.LambdaLR(optimizer, self.factor)


def make_schedule(name: str = "cosine", steps: int = 1000, warmup_ratio: float = 0.1, min_lr_ratio: float = 0.1,
                  decay_ratio: float = 0.1, reference_quirks: bool = False, start_at_zero: bool = False,
                  decay_type: str | None = None) -> Schedule:
    """The schedule of a config's `schedule` group (its keys are these arguments but `steps`)."""
    return Schedule(name=name, steps=steps, warmup=round(warmup_ratio * steps), min_lr_ratio=min_lr_ratio,
                    decay=round(decay_ratio * steps) if name == "wsd" else 0, decay_type=decay_type,
                    reference_quirks=reference_quirks, start_at_zero=start_at_zero)


def build_schedule(optimizer: torch.optim.Optimizer, *args, **kwargs) -> tuple[Schedule,
                                                                               torch.optim.lr_scheduler.LambdaLR]:
    """The schedule (make_schedule's arguments) and its LambdaLR on the optimizer."""
    schedule = make_schedule(*args, **kwargs)
    return schedule, schedule.lr_scheduler(optimizer)
