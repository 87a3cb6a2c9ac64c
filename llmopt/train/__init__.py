"""Training: the loop, schedules, evaluation, the Hydra entry point (python -m llmopt.train)."""
