"""Model sizes as named flavors (the GaLore protocol's configs; protocol.md section 1).

Every flavor is a transformers LlamaConfig: SiLU MLP, RMSNorm eps 1e-6, init std 0.02, no biases,
RoPE base 10000, lm_head NOT tied to the embedding. The 1B flavor follows the config files the
reference code runs (32 heads, 24 layers), not the papers' tables (24 heads, 32 layers).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from llmopt.model.rotary import cast_model


@dataclass(frozen=True)
class Flavor:
    hidden: int
    intermediate: int
    heads: int
    layers: int
    vocab: int = 32000


FLAVORS: dict[str, Flavor] = {
    "60m": Flavor(512, 1376, 8, 8),
    "130m": Flavor(768, 2048, 12, 12),
    "350m": Flavor(1024, 2736, 16, 24),
    "1b": Flavor(2048, 5461, 32, 24),
    "7b": Flavor(4096, 11008, 32, 32),
    # small flavors for tests and the offline default (the vocabulary follows the tokenizer)
    "tiny": Flavor(64, 172, 4, 2, vocab=512),
    "micro": Flavor(32, 64, 2, 2, vocab=128),
}


def llama_config(flavor: str, vocab_size: int | None = None, max_seq_len: int = 2048,
                 padding_idx: int = 0) -> LlamaConfig:
    """The LlamaConfig of a named flavor; `vocab_size` overrides the flavor's vocabulary. `padding_idx`: the
    embedding row transformers zeroes and never trains; 0 is t5's pad, -1 the reference configs' (their
    `pad_token_id: -1` makes it the last row, 31999, a real t5 piece)."""
    if flavor not in FLAVORS:
        raise ValueError(f"unknown model flavor {flavor!r}; choose one of {sorted(FLAVORS)}")
    f = FLAVORS[flavor]
    return LlamaConfig(
        vocab_size=vocab_size or f.vocab,
        hidden_size=f.hidden,
        intermediate_size=f.intermediate,
        num_attention_heads=f.heads,
        num_key_value_heads=f.heads,
        num_hidden_layers=f.layers,
        hidden_act="silu",
        max_position_embeddings=max_seq_len,
        initializer_range=0.02,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        attention_bias=False,
        mlp_bias=False,
        pad_token_id=padding_idx,
        bos_token_id=None,
        eos_token_id=1,
        use_cache=False,
    )


def build_model(config: LlamaConfig, seed: int = 0, device: str | torch.device = "cpu",
                dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    """A freshly initialized LlamaForCausalLM; the same seed gives the same weights. Initialized in fp32, then cast
    to `dtype` with RoPE's frequencies kept in fp32 (llmopt.model.rotary: as the papers' code computes them)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with torch.device(device):
            model = LlamaForCausalLM(config)
    return cast_model(model, dtype)


def param_counts(config: LlamaConfig) -> dict[str, int]:
    """Parameter counts by part, computed on the meta device (no weights allocated)."""
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    embedding = model.model.embed_tokens.weight.numel()
    output = model.lm_head.weight.numel()
    total = sum(p.numel() for p in model.parameters())
    matrices = sum(p.numel() for n, p in model.named_parameters() if p.ndim == 2 and ".layers." in n)
    return {"total": total, "embedding": embedding, "output": output, "attn_mlp": matrices,
            "vector": total - embedding - output - matrices}


def flops_per_token(config: LlamaConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward), the protocol's count:
    6 * (params - embedding params) + 6 * layers * heads * head_dim * seq_len."""
    counts = param_counts(config)
    head_dim = config.hidden_size // config.num_attention_heads
    return 6.0 * (counts["total"] - counts["embedding"]) + 6.0 * (
        config.num_hidden_layers * config.num_attention_heads * head_dim * seq_len)
