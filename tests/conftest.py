import copy
import os
from pathlib import Path

import pytest
import torch

# Without a GPU the Triton kernels (llmopt/kernels/) run on CPU tensors in Triton's interpreter;
# set before llmopt is imported, since llmopt/kernels/common.py reads it then.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from llmopt.model import build_model, llama_config

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real text of ../shared/data; its absence is an error, not a skip."""
    assert SHARED_DATA.is_dir(), f"expected the shared data next to the checkout at {SHARED_DATA}"
    return SHARED_DATA


def micro_model(dtype=torch.float32, seed=0):
    return build_model(llama_config("micro"), seed=seed, dtype=dtype)


def lm_loss(model, tokens):
    return model(input_ids=tokens, labels=tokens).loss


def random_batches(n, batch=2, seq=12, vocab=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (batch, seq), generator=g) for _ in range(n)]


def clone(model):
    return copy.deepcopy(model)
