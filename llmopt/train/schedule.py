"""Learning-rate schedules as multipliers of every group's peak lr (torch LambdaLR).

The factor of update s (0-based, s = 0..steps-1):
  cosine    linear warmup to 1 over `warmup` updates, then cosine down to min_lr_ratio at the last update
  wsd       warmup, stable at 1, then a linear decay to min_lr_ratio over the last `decay` updates
  constant  warmup, then 1
Warmup reaches the peak on its last update and the first update is not at lr 0.

reference_quirks=True reproduces the GaLore-protocol code exactly: factor(s) = s / warmup during
warmup (the first update runs at lr 0) and the loop makes steps + 1 updates. Its cosine is cyclical with
the run as one cycle, so the extra update N starts a second cycle: 1e-7 (a restarted warmup's first steps),
or 1 without warmup. Without the quirks, factor_ours(s) = factor_reference(s + 1) and there are `steps`
updates.

start_at_zero=True reproduces the SGD-LL code's loop: its counter starts at 0 too (factor(s) = factor_reference(s),
the first update at lr 0 during warmup), but it stops after exactly `steps` updates.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

SCHEDULES = ("cosine", "wsd", "constant")


@dataclass(frozen=True)
class Schedule:
    name: str = "cosine"
    steps: int = 1000
    warmup: int = 100
    min_lr_ratio: float = 0.1
    decay: int = 0                  # wsd only: updates of the final decay
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
        return 1.0 - (1.0 - self.min_lr_ratio) * progress


def build_schedule(optimizer: torch.optim.Optimizer, name: str = "cosine", steps: int = 1000,
                   warmup_ratio: float = 0.1, min_lr_ratio: float = 0.1, decay_ratio: float = 0.1,
                   reference_quirks: bool = False,
                   start_at_zero: bool = False) -> tuple[Schedule, torch.optim.lr_scheduler.LambdaLR]:
    """The schedule and a LambdaLR on the optimizer; the trainer steps it once per optimizer step."""
    schedule = Schedule(name=name, steps=steps, warmup=round(warmup_ratio * steps), min_lr_ratio=min_lr_ratio,
                        decay=round(decay_ratio * steps) if name == "wsd" else 0,
                        reference_quirks=reference_quirks, start_at_zero=start_at_zero)
    return schedule, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule.factor)
