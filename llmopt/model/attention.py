"""Causal attention without a mask tensor under torch.compile.

transformers cannot tell, while torch.compile traces the model, that a batch without an attention mask is
plain causal: it materializes the causal mask (and, from the position ids it makes itself, a packed-sequence
mask) and hands SDPA a [batch, 1, seq, seq] mask tensor with is_causal=False, which keeps SDPA's kernels off
their causal path (cuDNN's on the H100: 5.8 ms of attention per 60M micro-batch against 3.4 ms with is_causal,
benchmarks/RESULTS.md). CausalLMLoss knows that every row is one causal sequence and says so with `causal_rows`;
the attention function registered here reads it as SDPA's is_causal. Padding masks and caches take
transformers' own path, unchanged.
"""

from __future__ import annotations

import torch

ATTENTIONS = ("sdpa", "transformers")
_NAME = "llmopt_sdpa"  # the attention function's name in transformers' registries


def check_attention(attention: str) -> None:
    if attention not in ATTENTIONS:
        raise ValueError(f"unknown attention {attention!r} (trainer.attention); choose one of {list(ATTENTIONS)}")


def causal_rows(model: torch.nn.Module, like: torch.Tensor) -> torch.Tensor | None:
    """The attention_mask argument that says "each row is one causal sequence" to the attention function of
    `use_attention(model, "sdpa")`: a 4D mask of no elements, which transformers passes to the attention
    function untouched. None (transformers builds the mask) for any other attention implementation."""
    if model.config._attn_implementation == _NAME:
        return like.new_empty((0, 0, 0, 0), dtype=torch.bool)
    return None


def _sdpa_attention(module, query, key, value, attention_mask, **kwargs):
    """transformers' SDPA attention function, reading `causal_rows`' mask as no mask (is_causal)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    if attention_mask is not None and attention_mask.dim() == 4 and attention_mask.numel() == 0:
        attention_mask = None
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def use_attention(model: torch.nn.Module, attention: str) -> torch.nn.Module:
    """How a transformers causal LM runs self-attention (`trainer.attention`; in place, returns the model):
      sdpa          torch's SDPA with is_causal for `causal_rows` (the trainer's batches), also under torch.compile
      transformers  the model's own setting (under torch.compile, SDPA with the causal mask as a tensor)
    With sdpa, other masks (padding, a cache) run transformers' SDPA path with its own mask."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    check_attention(attention)
    if attention == "sdpa":
        AttentionInterface.register(_NAME, _sdpa_attention)
        AttentionMaskInterface.register(_NAME, sdpa_mask)
        model.set_attn_implementation(_NAME)
    return model
