"""Per-layer optimizer diagnostics; core.py's docstring describes them and their keys."""

from llmopt.metrics.diagnostics.core import BLOCK_KINDS, MATRIX_KINDS, MOMENTUM_KEYS, Diagnostics, benchmark
from llmopt.metrics.diagnostics.keys import EFF_LR_QUANTILES, QUANTITIES, TOKEN_QUANTILES
from llmopt.metrics.diagnostics.record import Record
from llmopt.metrics.diagnostics.tensors import layer_of, tensor_id

__all__ = ["BLOCK_KINDS", "EFF_LR_QUANTILES", "MATRIX_KINDS", "MOMENTUM_KEYS", "QUANTITIES", "TOKEN_QUANTILES",
           "Diagnostics", "Record", "benchmark", "layer_of", "tensor_id"]
