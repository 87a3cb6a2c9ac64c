import os
from pathlib import Path

import pytest
import torch

# Without a GPU the Triton kernels (llmopt/kernels/) run on CPU tensors in Triton's interpreter;
# set before llmopt is imported, since llmopt/kernels/common.py reads it then.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from tests.helpers.paths import SHARED_DATA  # noqa: E402


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real text of ../shared/data; its absence is an error, not a skip."""
    assert SHARED_DATA.is_dir(), f"expected the shared data next to the checkout at {SHARED_DATA}"
    return SHARED_DATA
