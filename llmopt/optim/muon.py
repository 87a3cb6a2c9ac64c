"""Muon baseline: Muon on the hidden matrices, AdamW on everything else, as ONE optimizer.

Muon takes 2-D parameters only; the embedding, lm_head and 1-D parameters go to torch.optim.AdamW
(the usual Muon recipe). `MuonWithAdamW` presents both as one optimizer: one `step`, one
`state_dict`, and the param groups of both visible to a scheduler (AdamW's groups carry their own
peak lr, `adam_lr`). Muon's defaults here are the protocol's: Newton-Schulz (3.4445, -4.7750,
2.0315), 5 steps, momentum 0.95, Nesterov; weight decay is explicit (torch's default is 0.1).
adjust_lr: "original" scales the lr by sqrt(max(1, rows/cols)); "match_rms_adamw" by
0.2 * sqrt(max(rows, cols)).

The matrix part is `BatchedMuon`: torch.optim.Muon's algorithm and state (one "momentum_buffer" per
parameter, the same param-group keys, so state_dicts load either way), but each step runs
Newton-Schulz once per (shape, dtype, device) group on the stacked matrices instead of once per
matrix. On CUDA (`fused`: None = there, True = required, False = never) the momentum, the Nesterov update,
the bf16 stack and its norms come from one Triton kernel pass (llmopt/kernels/muon.py), elsewhere from foreach ops.
`MuonWithAdamW(..., batched=False)` falls back to torch.optim.Muon itself (`optimizer.batched=false`).

One deliberate difference: with bf16 parameters and nesterov=False, torch.optim.Muon (up to at least
torch 2.13) normalizes the momentum buffer in place (`grad.bfloat16()` returns the buffer itself,
then `div_`; fixed upstream by pytorch/pytorch#194664). BatchedMuon never writes to the buffer
there, i.e. it follows the fixed torch.
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch

from llmopt.kernels import common as kernel_common
from llmopt.kernels import muon as muon_kernels
from llmopt.optim.common import (
    OptimizerWrapper,
    check_choice,
    check_nonnegative,
    check_unit_interval,
    evaluate_closure,
    with_grads,
)
from llmopt.optim.registry import groups_by_role, register

ADJUST_LR = ("original", "match_rms_adamw")
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # torch.optim.Muon's defaults (Keller Jordan's)


def adjusted_lr(lr: float, adjust_lr_fn: str | None, shape) -> float:
    """torch.optim.Muon's per-shape lr scaling (the same float expressions, so the same values)."""
    rows, cols = shape[:2]
    if adjust_lr_fn is None or adjust_lr_fn == "original":
        return lr * math.sqrt(max(1, rows / cols))
    if adjust_lr_fn == "match_rms_adamw":
        return lr * (0.2 * math.sqrt(max(rows, cols)))
    return lr


def padded_stack(shape: torch.Size, n: int, device: torch.device, pad_multiple: int = 1):
    """An uninitialized bf16 stack for n matrices of `shape`, its long side zero-padded to a multiple of
    `pad_multiple`, and the n [rows, cols] windows to fill. Zero rows or columns change no value of
    Newton-Schulz (they add nothing to the Gram matrix or the norm and stay zero), but a long side such
    as the 1B flavor's 5461 leaves bf16 rows unaligned and the GPU's matmul kernels several times slower."""
    rows, cols = shape
    padded = [rows, cols]
    long_dim = 0 if rows > cols else 1
    padded[long_dim] = -(-shape[long_dim] // pad_multiple) * pad_multiple
    x = torch.empty((n, *padded), dtype=torch.bfloat16, device=device)
    if padded[long_dim] != shape[long_dim]:
        x.narrow(1 + long_dim, shape[long_dim], padded[long_dim] - shape[long_dim]).zero_()
    return x, list(x[:, :rows, :cols].unbind(0))


def newton_schulz_batched(x: torch.Tensor, coefficients, steps: int, eps: float | None) -> torch.Tensor:
    """torch.optim.Muon's Newton-Schulz on a [n, rows, cols] bf16 stack: per-matrix Frobenius
    normalization clamped at eps, then `steps` iterations of X <- a X + (b G + c G^2) X with the Gram
    matrix G on the short side, so each matrix gets what torch computes for it alone, up to bf16
    rounding. One difference in how, none in what: a tall stack is not transposed (no copy), its Gram
    matrix is X^T X and the step X <- a X + X (b G + c G^2), torch's step on X^T transposed."""
    a, b, c = coefficients
    tall = x.size(-2) > x.size(-1)
    if eps is not None:  # None: the caller normalized the stack (muon_kernels.divide_stack_)
        x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)
    for _ in range(steps):
        gram = x.mT @ x if tall else x @ x.mT
        poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)
        x = torch.baddbmm(x, x, poly, beta=a) if tall else torch.baddbmm(x, poly, x, beta=a)
    return x


def _check_group(group: dict) -> None:
    """torch.optim.Muon's argument checks, raised as ValueError when a group is added (torch checks
    ns_steps and the coefficients only inside step)."""
    lr = group["lr"]
    if isinstance(lr, torch.Tensor):
        if lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        lr = lr.item()
    check_nonnegative(lr=lr, weight_decay=group["weight_decay"], momentum=group["momentum"], eps=group["eps"])
    if group["adjust_lr_fn"] is not None:
        check_choice("adjust_lr_fn", group["adjust_lr_fn"], ADJUST_LR)
    if len(group["ns_coefficients"]) != 3:
        raise ValueError(f"ns_coefficients must be 3 values (a, b, c), got {group['ns_coefficients']}")
    if not 0 <= group["ns_steps"] < 100:
        raise ValueError(f"ns_steps must be in [0, 100), got {group['ns_steps']}")
    for p in group["params"]:
        if p.ndim != 2:
            raise ValueError(f"Muon only takes 2-D parameters; got one of shape {tuple(p.shape)}")
        if torch.is_complex(p):
            raise ValueError("Muon does not support complex parameters")


class BatchedMuon(torch.optim.Optimizer):
    """torch.optim.Muon (same arguments, defaults, state and update) with Newton-Schulz batched over
    same-shape matrices. Per parameter p with gradient g and buffer B, as torch:
      B <- lerp(B, g, 1 - momentum);  U <- lerp(g, B, momentum) if nesterov else B
      O <- NS(U) in bf16;  p <- p * (1 - lr * weight_decay) - adjusted_lr(lr, shape) * O
    Memory: one step holds the stacked updates of a shape group (bf16, plus the param-dtype
    Nesterov vectors while stacking), i.e. a few times the largest shape group's matrices.
    """

    def __init__(self, params, lr: float = 1e-3, weight_decay: float = 0.1, momentum: float = 0.95,
                 nesterov: bool = True, ns_coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
                 eps: float = 1e-7, ns_steps: int = 5, adjust_lr_fn: str | None = None,
                 fused: bool | None = None):
        # the same keys as torch.optim.Muon's defaults: load_state_dict replaces a group by the saved
        # one, so an extra or missing key would not survive a round trip between the two
        defaults = {"lr": lr, "weight_decay": weight_decay, "momentum": momentum, "nesterov": nesterov,
                    "ns_coefficients": ns_coefficients, "eps": eps, "ns_steps": ns_steps,
                    "adjust_lr_fn": adjust_lr_fn}
        super().__init__(params, defaults)
        self.fused = fused  # an attribute, not a group key: state_dicts stay torch.optim.Muon's

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        _check_group(self.param_groups[-1])  # after super(): the group now has every default filled in

    @torch.no_grad()
    def step(self, closure=None):
        loss = evaluate_closure(closure)
        for group in self.param_groups:
            self._step_group(group)
        return loss

    def _step_group(self, group: dict) -> None:
        lr = group["lr"].item() if isinstance(group["lr"], torch.Tensor) else group["lr"]
        momentum, weight_decay = group["momentum"], group["weight_decay"]
        params, grads = with_grads(group)
        if not params:
            return
        if any(g.is_sparse for g in grads):
            raise RuntimeError("Muon does not support sparse gradients")
        states = [self.state[p] for p in params]
        for g, state in zip(grads, states):
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(g, memory_format=torch.preserve_format)
        bufs = [state["momentum_buffer"] for state in states]

        if weight_decay != 0:  # torch multiplies by 1.0 here; skipping it changes no bit
            # a CPU float64 0-dim tensor, not a Python float: CPU foreach rounds a Python scalar to a
            # bf16 p's dtype first (0.998 -> 0.9961) where p.mul_ keeps it in fp32; CUDA takes a CPU
            # scalar tensor as the plain scalar (fp32 opmath), as p.mul_ does
            torch._foreach_mul_(params, torch.tensor(1 - lr * weight_decay, dtype=torch.float64))

        by_shape = defaultdict(list)
        for i, p in enumerate(params):
            by_shape[(p.shape, p.dtype, p.device)].append(i)
        for (shape, _, device), idx in by_shape.items():
            g = [grads[i] for i in idx]
            b = [bufs[i] for i in idx]
            # the bf16 stack torch's Newton-Schulz would see (a fresh copy: never aliases the buffers); tensor
            # subclasses (FSDP2's DTensor shards) are stacked as they are and gather in the matmuls
            plain = type(g[0]) is torch.Tensor
            if plain:
                x, windows = padded_stack(shape, len(idx), device, pad_multiple=64 if device.type == "cuda" else 1)
            if plain and kernel_common.use_kernels(self.fused, g + b, "BatchedMuon"):
                # momentum, update and stack in one pass (with each update's sum of squares), then the
                # normalization as torch: divided by the bf16 norm clamped at eps
                sums = muon_kernels.muon_stack_(b, g, x, momentum, group["nesterov"])
                muon_kernels.divide_stack_(x, sums.sqrt().bfloat16().clamp(min=group["eps"]).float())
                x = newton_schulz_batched(x, group["ns_coefficients"], group["ns_steps"], eps=None)
            else:
                torch._foreach_lerp_(b, g, 1 - momentum)
                updates = torch._foreach_lerp(g, b, momentum) if group["nesterov"] else b
                if plain:
                    torch._foreach_copy_(windows, updates)
                else:
                    x = torch.stack(updates).bfloat16()
                del updates
                x = newton_schulz_batched(x, group["ns_coefficients"], group["ns_steps"], group["eps"])
            if x.shape[1:] != shape:
                x = x[:, :shape[0], :shape[1]]
            # p += alpha * O, O in bf16: mixed dtypes compute in fp32 as torch's p.add_(O) does
            torch._foreach_add_([params[i] for i in idx], list(x.unbind(0)),
                                alpha=-adjusted_lr(lr, group["adjust_lr_fn"], shape))


class MuonWithAdamW(OptimizerWrapper):
    def __init__(self, matrix_groups: list[dict], other_groups: list[dict], lr: float = 0.02,
                 momentum: float = 0.95, nesterov: bool = True, ns_steps: int = 5,
                 weight_decay: float = 0.0, adjust_lr: str = "original", adam_lr: float = 1e-3,
                 adam_betas: tuple[float, float] = (0.9, 0.95), adam_eps: float = 1e-8,
                 adam_weight_decay: float = 0.0, batched: bool = True, fused: bool | None = None):
        check_nonnegative(lr=lr, adam_lr=adam_lr, weight_decay=weight_decay, adam_eps=adam_eps,
                          adam_weight_decay=adam_weight_decay)
        check_unit_interval(momentum=momentum, adam_beta1=adam_betas[0], adam_beta2=adam_betas[1])
        check_choice("adjust_lr", adjust_lr, ADJUST_LR)
        if ns_steps < 1:
            raise ValueError(f"ns_steps must be >= 1, got {ns_steps}")
        if fused and not batched:
            raise ValueError("fused=True needs batched=True: torch.optim.Muon itself has no Triton kernels")
        muon_args = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps,
                         adjust_lr_fn=adjust_lr)
        self.muon = BatchedMuon(matrix_groups, fused=fused, **muon_args) if batched else \
            torch.optim.Muon(matrix_groups, **muon_args)
        self.adamw = torch.optim.AdamW(other_groups, lr=adam_lr, betas=tuple(adam_betas), eps=adam_eps,
                                       weight_decay=adam_weight_decay)
        self.inner = [self.muon, self.adamw]
        self._init_wrapper()

    @torch.no_grad()
    def step(self, closure=None):
        loss = evaluate_closure(closure)
        self.muon.step()
        self.adamw.step()
        return loss

    def state_dict(self) -> dict:
        return {"muon": self.muon.state_dict(), "adamw": self.adamw.state_dict()}

    def load_state_dict(self, state_dict: dict) -> None:
        self.muon.load_state_dict(state_dict["muon"])
        self.adamw.load_state_dict(state_dict["adamw"])


# the paper counts one state per parameter; llmopt's AdamW keeps two moments for the non-matrix parameters
@register("muon", cls=MuonWithAdamW, whole_tensors=True, test_lr=0.02, paper_states=lambda c: c["total"],
          llmopt_states=lambda c: c["attn_mlp"] + 2 * (c["embedding"] + c["output"] + c["vector"]))
def build_muon(roles, **hparams):
    return MuonWithAdamW(groups_by_role(roles, ["matrix"]),
                         groups_by_role(roles, ["embedding", "output", "vector"]), **hparams)
