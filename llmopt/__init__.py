"""llmopt: LLaMA pre-training for optimizer research."""

__version__ = "0.1.0"

from llmopt import config  # noqa: E402,F401  (registers the config schema and resolvers for any compose of configs/)
