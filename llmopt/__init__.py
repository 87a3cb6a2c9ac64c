"""llmopt: LLaMA pre-training for optimizer research."""

__version__ = "0.1.0"
