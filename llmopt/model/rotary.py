"""Rotary position embeddings looked up from a table instead of recomputed in every layer.

transformers' LlamaRotaryEmbedding computes cos/sin from the position ids in each forward, and under
torch.compile inductor fuses that computation into every attention layer's RoPE kernels, forward and backward:
two precise fp32 sin/cos per element of q and k, which makes those kernels compute-bound (8% of a 60M step on
the H100). The table holds the same fp32 values, computed once by the same formula, so the model's outputs
are unchanged bit for bit.
"""

from __future__ import annotations

import torch
from torch import nn


class RotaryTable(nn.Module):
    """A drop-in for LlamaRotaryEmbedding (default rope type): forward(x, position_ids) -> (cos, sin) in x's
    dtype, read from fp32 tables for positions 0 .. max_positions - 1 (non-persistent buffers: checkpoints and
    exported models do not change)."""

    def __init__(self, rotary: nn.Module, max_positions: int):
        super().__init__()
        inv_freq = rotary.inv_freq  # as the model holds it (in a bf16 model, rounded to bf16, as HF then uses it)
        positions = torch.arange(max_positions, device=inv_freq.device, dtype=torch.float)
        freqs = positions[:, None] * inv_freq.to(torch.float)  # HF's product, one multiply per entry
        angles = torch.cat((freqs, freqs), dim=-1)
        self.attention_scaling = rotary.attention_scaling
        self.register_buffer("cos_table", angles.cos() * self.attention_scaling, persistent=False)
        self.register_buffer("sin_table", angles.sin() * self.attention_scaling, persistent=False)

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cos_table[position_ids].to(x.dtype), self.sin_table[position_ids].to(x.dtype)


def use_rotary_table(model: nn.Module) -> nn.Module:
    """Swap a LlamaForCausalLM's rotary embedding for a RotaryTable over its max_position_embeddings (in place;
    returns the model). Other rope types (scaled, dynamic) keep transformers' module."""
    rotary = model.model.rotary_emb
    if isinstance(rotary, RotaryTable) or getattr(rotary, "rope_type", "default") != "default":
        return model
    model.model.rotary_emb = RotaryTable(rotary, model.config.max_position_embeddings)
    return model
