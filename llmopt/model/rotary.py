"""RoPE's numerics as the papers' code has them, and its cos/sin looked up from a table instead of recomputed.

Frequencies. The papers' modeling file (a copy of an older transformers `modeling_llama.py`, as in GaLore's
`peft_pretraining/modeling_llama.py`) computes inv_freq = 1 / base^(2i/d) and the cos/sin cache of every position in
fp32 while the model is still fp32; `model.to(torch.bfloat16)` then rounds the cache to bf16, which the attention
layers read. transformers' current LlamaRotaryEmbedding recomputes cos/sin in each forward from its `inv_freq`
buffer, which the same `.to(torch.bfloat16)` rounds to bf16: angles off by up to 2^-8 relative (at position 255 up
to 0.11 rad with the flavors' head size 64, 0.31 rad with 7B's 128). `cast_model` keeps the frequencies in fp32
through the cast, so cos/sin are the fp32 values rounded once to the run's dtype, in both paths (this table and
transformers' module). `LlamaForCausalLM.from_pretrained(path, dtype=torch.bfloat16)` computes them in fp32 too
(never `.to(torch.bfloat16)` after loading: that rounds them).

Table. transformers' module computes cos/sin from the position ids in each forward, and under torch.compile
inductor fuses that computation into every attention layer's RoPE kernels, forward and backward: two precise fp32
sin/cos per element of q and k, which makes those kernels compute-bound (8% of a 60M step on the H100). The table
holds the same fp32 values, computed once by the same formula, so the model's outputs are unchanged bit for bit.
"""

from __future__ import annotations

import torch
from torch import nn


def cast_model(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """model.to(dtype) for a transformers Llama-style model, its rotary embedding's frequency buffers left in fp32
    (their values as computed at construction); returns the model."""
    rotary = model.model.rotary_emb
    frequencies = dict(rotary.named_buffers(recurse=False))  # inv_freq, original_inv_freq: fp32 at construction
    model = model.to(dtype=dtype)
    for name, value in frequencies.items():
        setattr(rotary, name, value)
    return model


class RotaryTable(nn.Module):
    """A drop-in for LlamaRotaryEmbedding (default rope type): forward(x, position_ids) -> (cos, sin) in x's
    dtype, read from fp32 tables for positions 0 .. max_positions - 1 (non-persistent buffers: checkpoints and
    exported models do not change)."""

    def __init__(self, rotary: nn.Module, max_positions: int):
        super().__init__()
        inv_freq = rotary.inv_freq
        if inv_freq.dtype != torch.float32:
            raise ValueError(f"the rotary embedding's inv_freq is {inv_freq.dtype}: the model was cast with .to(), "
                             "which rounds RoPE's frequencies; cast it with llmopt.model.rotary.cast_model (as "
                             "llmopt.model.build_model does), which keeps them in fp32 as the papers' code computes "
                             "them")
        positions = torch.arange(max_positions, device=inv_freq.device, dtype=torch.float)
        freqs = positions[:, None] * inv_freq  # HF's product, one multiply per entry
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
