"""Optimizers for LLaMA pre-training research; each is a plain torch.optim.Optimizer."""

from llmopt.optim.ema_nesterov import EMANesterov
from llmopt.optim.memory import state_bytes
from llmopt.optim.muon import MuonWithAdamW
from llmopt.optim.registry import LOOKAHEADS, SPECS, build_optimizer, import_families, spec
from llmopt.optim.roles import ROLES, ParamRoles, classify_parameters
from llmopt.optim.scale import SCALE
from llmopt.optim.sgd_ll import SGDLL

import_families()  # every family module registers its optimizers
OPTIMIZERS = tuple(sorted(SPECS))

__all__ = ["EMANesterov", "LOOKAHEADS", "MuonWithAdamW", "OPTIMIZERS", "ParamRoles", "ROLES", "SCALE", "SGDLL",
           "SPECS", "build_optimizer", "classify_parameters", "spec", "state_bytes"]
