"""Causal attention without a mask tensor under torch.compile.

transformers cannot tell, while torch.compile traces the model, that a batch without an attention mask is
plain causal: it materializes the causal mask (and, from the position ids it makes itself, a packed-sequence
mask) and hands SDPA a [batch, 1, seq, seq] mask tensor with is_causal=False, which keeps SDPA's kernels off
their causal path (cuDNN's on the H100: 5.8 ms of attention per 60M micro-batch against 3.4 ms with is_causal,
benchmarks/RESULTS.md). CausalLMLoss knows that every row is one causal sequence and says so with `causal_rows`;
the attention function registered here reads it as SDPA's is_causal. Padding masks and caches take
transformers' own path, unchanged.

`sdpa_backend` (trainer.sdpa_backend) restricts SDPA to one kernel for a whole run, e.g. the papers' math kernel.
"""

from __future__ import annotations

import contextlib

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

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


# trainer.sdpa_backend: the kernels SDPA may choose from (None: torch's own choice). The papers' trainers turn flash
# and memory-efficient attention off process-wide (torchrun_main_DDP.py in Minimalist_LLM_Pretraining and
# train_llama.py in large_lr_sgd: torch.backends.cuda.enable_flash_sdp(False), enable_mem_efficient_sdp(False));
# on torch 2.4 (ema-nesterov's env.sh) SDPA then ran its math kernel, in bf16 (math_bf16). torch >= 2.5 computes the
# math kernel in fp32 from bf16 inputs (math), and on an H100 prefers cuDNN attention, which those flags leave on.
SDPA_BACKENDS = {"auto": None, "math": SDPBackend.MATH, "math_bf16": SDPBackend.MATH,
                 "flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                 "cudnn": SDPBackend.CUDNN_ATTENTION}
CUDA_ONLY_BACKENDS = ("efficient", "cudnn")      # the CPU has math and flash
HALF_PRECISION_BACKENDS = ("flash", "cudnn")     # on CUDA: bf16/fp16 inputs only (trainer.precision fp32 has none)


def check_sdpa_backend(backend: str, deterministic: bool, device_type: str | None = None,
                       precision: str | None = None) -> None:
    """Refuse a trainer.sdpa_backend that is unknown, contradicts trainer.deterministic, or has no kernel for the
    device (`device_type`) or trainer.precision (when given): SDPA itself would fail at the first forward."""
    if backend not in SDPA_BACKENDS:
        raise ValueError(f"unknown trainer.sdpa_backend {backend!r}; choose one of {list(SDPA_BACKENDS)}")
    if deterministic and backend == "cudnn":
        raise ValueError("trainer.sdpa_backend=cudnn contradicts trainer.deterministic=true: torch refuses cuDNN "
                         "attention in deterministic mode (its backward is not deterministic). Set "
                         "trainer.sdpa_backend to auto, math, math_bf16, flash or efficient, or "
                         "trainer.deterministic=false")
    if device_type is not None and device_type != "cuda" and backend in CUDA_ONLY_BACKENDS:
        raise ValueError(f"trainer.sdpa_backend={backend} runs on CUDA only (the device is {device_type}); the CPU "
                         "has math, math_bf16 and flash")
    if device_type == "cuda" and precision == "fp32" and backend in HALF_PRECISION_BACKENDS:
        raise ValueError(f"trainer.sdpa_backend={backend} takes bf16/fp16 inputs only, and trainer.precision=fp32 "
                         "gives SDPA fp32 ones; use bf16_pure or amp_bf16, or sdpa_backend auto, math or efficient")


@contextlib.contextmanager
def sdpa_backend(backend: str):
    """Within the block (a whole run: training, evaluation, the recomputation of checkpointed activations, and
    torch.compile's tracing, which fixes the kernel in the graph), SDPA uses only `backend`'s kernel."""
    check_sdpa_backend(backend, deterministic=False)
    if SDPA_BACKENDS[backend] is None:
        yield
        return
    reduced_math = torch.backends.cuda.fp16_bf16_reduction_math_sdp_allowed()
    torch.backends.cuda.allow_fp16_bf16_reduction_math_sdp(backend == "math_bf16")
    try:
        with sdpa_kernel(SDPA_BACKENDS[backend]):
            yield
    finally:
        torch.backends.cuda.allow_fp16_bf16_reduction_math_sdp(reduced_math)
