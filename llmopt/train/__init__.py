"""Training: the loop, schedules, evaluation, the Hydra entry point (python -m llmopt.train)."""

from omegaconf import OmegaConf


def fraction_of_steps(fraction: float, *, _root_) -> int:
    """`${fraction_of_steps:0.3}` in a config: that share of trainer.steps, rounded (e.g. a lookahead window)."""
    return round(float(fraction) * _root_.trainer.steps)


OmegaConf.register_new_resolver("fraction_of_steps", fraction_of_steps, replace=True)
