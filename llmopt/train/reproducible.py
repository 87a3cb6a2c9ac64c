"""`trainer.deterministic`: GPU runs that repeat bit for bit, for a measured cost (benchmarks/RESULTS.md).

On the CPU the seed already fixes every bit. On a GPU some kernels add in the order their threads finish
(atomics): cuDNN attention's backward and the embedding's gradient (eager, and inductor's scatter-add). AdamW
hardly notices; SCALE's full-learning-rate first steps amplify the last bits into visibly different losses
(README, Reproducibility). This mode, for the length of one run:
  * torch.use_deterministic_algorithms(True): ordered implementations everywhere (SDPA then leaves cuDNN for
    flash attention, inductor scatters through aten's sorted index_put), or an error at the first op that has
    none, named by torch;
  * CUBLAS_WORKSPACE_CONFIG=:4096:8 unless set: torch refuses cuBLAS in this mode without it;
  * cuDNN deterministic, no cuDNN benchmarking;
  * inductor's `deterministic`: no choice between kernels by timing where the choice changes the numerics;
  * no NaN-filling of new tensors (torch.utils.deterministic.fill_uninitialized_memory, on by default in this
    mode): a debugging aid against reading memory never written, which the runs do not need to repeat and which
    writes every matrix product's output twice.
Everything is put back afterwards, so the runs of one process (a sweep) each get their own setting; torch may read
CUBLAS_WORKSPACE_CONFIG only once per process, so a sweep that mixes both modes in one process should set it in
the environment before it starts (measured: runs in fresh processes, one GPU). The run also
swaps the model's input embedding for llmopt.model.embedding's (an ordered gradient that stays fast under
torch.compile on real text). Measured on the H200: bit-identical SCALE runs for 2.6% of the speed at 60M.
"""

from __future__ import annotations

import contextlib
import os

import torch

CUBLAS_WORKSPACE = ":4096:8"


@contextlib.contextmanager
def deterministic_mode(enabled: bool):
    """Within the block, torch (and torch.compile's kernels) run in deterministic mode if `enabled`."""
    if not enabled:
        yield
        return
    from torch._inductor import config as inductor_config

    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark,
             os.environ.get("CUBLAS_WORKSPACE_CONFIG"), inductor_config.deterministic,
             torch.utils.deterministic.fill_uninitialized_memory)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    inductor_config.deterministic = True
    torch.utils.deterministic.fill_uninitialized_memory = False
    try:
        yield
    finally:
        (enabled_before, warn_only, cudnn_deterministic, cudnn_benchmark, workspace, inductor_deterministic,
         fill_memory) = saved
        torch.use_deterministic_algorithms(enabled_before, warn_only=warn_only)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = cudnn_deterministic, cudnn_benchmark
        if workspace is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
        inductor_config.deterministic = inductor_deterministic
        torch.utils.deterministic.fill_uninitialized_memory = fill_memory
