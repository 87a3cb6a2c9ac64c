"""LLaMA model flavors of the GaLore protocol, as transformers' LlamaConfig / LlamaForCausalLM."""

from llmopt.model.flavors import (
    FLAVORS,
    build_model,
    flops_per_token,
    llama_config,
    param_counts,
)

__all__ = ["FLAVORS", "build_model", "flops_per_token", "llama_config", "param_counts"]
