"""A micro model, its loss, random batches."""

import copy

import torch

from llmopt.model import build_model, llama_config


def micro_model(dtype=torch.float32, seed=0):
    return build_model(llama_config("micro"), seed=seed, dtype=dtype)


def lm_loss(model, tokens):
    return model(input_ids=tokens, labels=tokens).loss


def random_batches(n, batch=2, seq=12, vocab=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (batch, seq), generator=g) for _ in range(n)]


def clone(model):
    return copy.deepcopy(model)
