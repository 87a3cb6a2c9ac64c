"""Classify every parameter once, by role; every optimizer builder uses this.

Roles:
  matrix     attention/MLP weight matrices (the hidden layers)
  embedding  the token embedding [vocab, hidden]
  output     the output layer lm_head [vocab, hidden] (untied)
  vector     1-D parameters (RMSNorm gains, biases)

Patterns are regular expressions matched (re.search) against parameter names; the defaults follow
transformers' LLaMA naming and can be replaced for other models.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

ROLES = ("matrix", "embedding", "output", "vector")

DEFAULT_PATTERNS: dict[str, str] = {
    "embedding": r"(^|\.)embed_tokens\.weight$",
    "output": r"(^|\.)lm_head\.weight$",
    "matrix": r"\.layers\.\d+\.(self_attn|mlp)\.\w+\.weight$",
}


@dataclass
class ParamRoles:
    """Trainable parameters by role, in model order: role -> list of (name, parameter)."""

    by_role: dict[str, list[tuple[str, torch.nn.Parameter]]] = field(default_factory=dict)

    def params(self, role: str) -> list[torch.nn.Parameter]:
        return [p for _, p in self.by_role.get(role, [])]

    def names(self, role: str) -> list[str]:
        return [n for n, _ in self.by_role.get(role, [])]

    def role_of(self) -> dict[int, str]:
        """id(parameter) -> role."""
        return {id(p): role for role, items in self.by_role.items() for _, p in items}

    def name_of(self) -> dict[int, str]:
        """id(parameter) -> name."""
        return {id(p): n for items in self.by_role.values() for n, p in items}


def classify_parameters(model: torch.nn.Module, patterns: dict[str, str] | None = None) -> ParamRoles:
    """Assign each trainable parameter exactly one role; raise if one gets none or several.

    A 1-D parameter is a vector whatever its name (that is what every optimizer here needs of it);
    the patterns decide among the 2-D ones.
    """
    patterns = {**DEFAULT_PATTERNS, **(patterns or {})}
    unknown = set(patterns) - set(DEFAULT_PATTERNS)
    if unknown:
        raise ValueError(f"unknown role(s) {sorted(unknown)} in patterns; patterns are given for "
                         f"{list(DEFAULT_PATTERNS)} (1-D parameters are always 'vector')")
    compiled = {role: re.compile(rx) for role, rx in patterns.items()}
    by_role: dict[str, list] = {role: [] for role in ROLES}
    seen: set[int] = set()
    unmatched, ambiguous = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:  # tied weights are listed once
            continue
        seen.add(id(p))
        if p.ndim < 2:
            by_role["vector"].append((name, p))
            continue
        hits = [role for role in ("matrix", "embedding", "output") if compiled[role].search(name)]
        if not hits:
            unmatched.append(name)
        elif len(hits) > 1:
            ambiguous.append(f"{name} ({', '.join(hits)})")
        else:
            by_role[hits[0]].append((name, p))
    if unmatched or ambiguous:
        lines = []
        if unmatched:
            lines.append(f"no role matches {len(unmatched)} parameter(s): {unmatched[:8]}")
        if ambiguous:
            lines.append(f"several roles match: {ambiguous[:8]}")
        raise ValueError("; ".join(lines) + ". Pass role patterns (regular expressions over parameter "
                         "names) for 'matrix', 'embedding' and 'output' that match each 2-D parameter once.")
    return ParamRoles(by_role)
