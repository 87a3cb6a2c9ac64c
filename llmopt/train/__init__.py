"""Training: the loop, schedules, evaluation, the Hydra entry point (python -m llmopt.train).

The config schema and the `fraction_of_steps` resolver the configs use are registered by importing llmopt
(llmopt/config.py)."""
