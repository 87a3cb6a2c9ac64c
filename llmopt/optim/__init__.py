"""Optimizers for LLaMA pre-training research; each is a plain torch.optim.Optimizer."""

from llmopt.optim.ema_nesterov import EMANesterov
from llmopt.optim.memory import llmopt_memory_gb, paper_memory_gb, state_bytes
from llmopt.optim.muon import MuonWithAdamW
from llmopt.optim.registry import BUILDERS, build_optimizer
from llmopt.optim.roles import ROLES, ParamRoles, classify_parameters
from llmopt.optim.scale import SCALE
from llmopt.optim.sgd_ll import SGDLL

OPTIMIZERS = tuple(sorted(BUILDERS))

__all__ = ["EMANesterov", "MuonWithAdamW", "OPTIMIZERS", "ParamRoles", "ROLES", "SCALE", "SGDLL",
           "build_optimizer", "classify_parameters", "llmopt_memory_gb", "paper_memory_gb",
           "state_bytes"]
