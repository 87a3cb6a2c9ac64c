"""The papers' memory accounting, and llmopt's optimizer states in the papers' units: counted from a model flavor's
parameter counts (llmopt.model) and each optimizer's registration (llmopt.optim), so this module sits above both.
The bytes a live optimizer holds are measured in llmopt.optim.memory.

The papers' accounting (protocol.md section 2) reproduces their tables exactly:
bytes = 2 x (parameters + optimizer-state elements), everything counted in bf16, 1 GB = 1e9 B.
Adam keeps 2 states per parameter, Muon and momentum SGD one, SCALE only the lm_head momentum
(the 1-D parameters' Adam states are negligible and ignored, as in the paper), EMA-Nesterov adds
two parameter-sized buffers to its base.

The published figures are rounded to 0.01 GB, and not all in one way: Adam's are the weights and
the states each rounded, then added (60M: 0.12 + 0.23 = 0.35; 130M: 0.27 + 0.54 = 0.81, where the
rounded total would be 0.80); SCALE's and Muon's are the rounded total (350M SCALE: 0.80, where
rounding each part would give 0.81). `paper_memory_gb(..., as_printed=True)` applies that rule so
the tables can be compared digit for digit; the default returns the exact value.

llmopt's optimizers hold more than the papers count where a method steps some parameters with AdamW:
Muon keeps ONE state (its momentum) per attention/MLP matrix element but TWO (AdamW's moments) per element
of the embedding, lm_head and norms, where the paper counts one per parameter; SCALE keeps the norms' two
AdamW moments, which the paper ignores. `llmopt_memory_gb` counts those states in the paper's units
(bf16, 1e9 B), to print beside `paper_memory_gb`; `estimate_train_bytes` adds the weights and gradients for the
trainer's check before a run allocates them.
"""

from __future__ import annotations

from llmopt.model import llama_config, param_counts
from llmopt.optim.registry import SPECS, lookahead_spec, spec


def paper_state_elements(flavor: str, optimizer: str, lookahead: str | None = None) -> int:
    return state_elements(param_counts(llama_config(flavor)), optimizer, lookahead)


def state_elements(counts: dict[str, int], optimizer: str, lookahead: str | None = None,
                   accounting: str = "paper") -> int:
    """Optimizer-state elements from model.param_counts(...): the paper's accounting, or llmopt's states
    (accounting="llmopt"), as each optimizer's registration gives them."""
    entry = spec(optimizer)
    count = entry.paper_states if accounting == "paper" else entry.held_states
    if count is None:
        defined = sorted(n for n, e in SPECS.items() if e.paper_states is not None)
        raise ValueError(f"the {accounting} memory accounting is defined here for {defined}, not {optimizer!r} "
                         "(its registration gives no paper_states); use state_bytes(optimizer) for the measured "
                         "figure")
    elements = count(counts)
    if lookahead not in (None, "none"):
        elements += lookahead_spec(lookahead).paper_states(counts)
    return elements


def paper_memory_gb(flavor: str, optimizer: str, lookahead: str | None = None,
                    as_printed: bool = False) -> float:
    """Weights + optimizer state in GB (1e9 B), bf16, as the SCALE paper counts them."""
    weights, states = _weights_and_states_gb(flavor, optimizer, lookahead, "paper")
    if not as_printed:
        return weights + states
    if optimizer in ("adam", "adamw"):
        return round(round(weights, 2) + round(states, 2), 2)
    return round(weights + states, 2)


def llmopt_memory_gb(flavor: str, optimizer: str, lookahead: str | None = None) -> float:
    """Weights + the optimizer states llmopt holds, in the paper's units (bf16, 1e9 B): beside paper_memory_gb."""
    return sum(_weights_and_states_gb(flavor, optimizer, lookahead, "llmopt"))


def _weights_and_states_gb(flavor: str, optimizer: str, lookahead: str | None, accounting: str):
    counts = param_counts(llama_config(flavor))
    return 2 * counts["total"] / 1e9, 2 * state_elements(counts, optimizer, lookahead, accounting) / 1e9


def estimate_train_bytes(counts: dict[str, int], optimizer: str, lookahead: str | None,
                         precision: str, lookahead_momentum_dtype: str = "float32") -> int | None:
    """Weights + gradients + optimizer state (the states llmopt holds) before any
    activation, for refusing a run that cannot fit before allocating it; None where the optimizer's state is
    not accounted for here. EMA-Nesterov's m is fp32 unless lookahead_momentum_dtype="param" (EMANesterov's
    momentum_dtype)."""
    if spec(optimizer).paper_states is None:
        return None
    weight_bytes = 2 if precision == "bf16_pure" else 4  # amp_bf16 keeps fp32 master weights and grads
    need = weight_bytes * (2 * counts["total"] + state_elements(counts, optimizer, lookahead, "llmopt"))
    if lookahead == "ema_nesterov" and lookahead_momentum_dtype == "float32":
        need += (4 - weight_bytes) * counts["total"]  # m wider than the weights
    return need
