"""LLaMA model flavors of the GaLore protocol, as transformers' LlamaConfig / LlamaForCausalLM."""

from llmopt.model.flavors import (
    FLAVORS,
    build_model,
    flops_per_token,
    llama_config,
    param_counts,
)
from llmopt.model.rotary import RotaryTable, use_rotary_table

__all__ = ["FLAVORS", "RotaryTable", "build_model", "flops_per_token", "llama_config", "param_counts",
           "use_rotary_table"]
