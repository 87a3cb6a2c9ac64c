"""Low-rank baselines: GaLore, Fira, APOLLO and APOLLO-Mini, from the authors' own packages.

Nothing here re-implements a method: the attention/MLP matrices are stepped by the package's optimizer
class (``galore_torch.GaLoreAdamW``, ``fira.FiraAdamW``, ``apollo_torch.APOLLOAdamW``); embedding,
lm_head and 1-D parameters are stepped by ``torch.optim.AdamW`` (protocol.md section 5: "embedding,
lm_head and norms use plain AdamW"). :func:`build_lowrank` returns one :class:`LowRankAdamW` (a
``torch.optim.Optimizer``) that owns both.

What the installed packages do (read from their source: galore-torch 1.0, fira 1.0.2, apollo-torch
1.0.3; all three are single-file ``torch.optim.Optimizer`` subclasses copied from transformers' old
AdamW)
--------------------------------------------------------------------------------------------------
Constructor (all three): ``(params, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0,
correct_bias=True, no_deprecation_warning=...)``; GaLore and Fira emit a FutureWarning unless
``no_deprecation_warning=True`` (we pass it); APOLLO adds ``scale_front=False, disable_nl=False``
(optimizer-wide, not per group). ``scale_front`` is llmopt's ``scale_front`` hyper-parameter (the APOLLO
scripts' ``--scale_front``, passed at 60M/130M APOLLO-Mini): True multiplies the scaled gradient by
``sqrt(scale)`` BEFORE the norm-growth limiter, False (the default) after it. The limiter compares the
ratio of successive norms, which a constant factor leaves unchanged, so the two differ only through the
limiter's ``+ 1e-8`` (for gradient norms near 1e-8) and rounding. ``disable_nl`` stays False (limiter on).

A param group is projected iff it has the key ``"rank"``; a group without it is the package's plain
AdamW. The projection keys have NO defaults in the optimizers (a missing key is a KeyError at the first
step), so we always pass all of them:

=========  ==========================================================================================
package    keys of the low-rank group (values we pass)
=========  ==========================================================================================
GaLore     rank, update_proj_gap, scale, proj_type
Fira       rank, update_proj_gap, alpha, proj_type   (``alpha`` plays GaLore's ``scale``; no ``scale``)
APOLLO     rank, proj ("random" | "svd"), scale_type ("channel" | "tensor"), scale, update_proj_gap,
           proj_type
=========  ==========================================================================================

(GaLore's reference script also passes ``proj_quant``, which ``GaLoreAdamW`` never reads.) The
projector classes' own defaults are ``update_proj_gap=200, scale=1.0 (Fira: alpha=1.0),
proj_type="std"``. ``proj_type`` is one of "std" (project the smaller side: an [m, n] gradient with
m >= n becomes G P^T, P [r, n], else P^T G, P [m, r]), "reverse_std", "left", "right", "full" (GaLore,
Fira; APOLLO's random projector raises NotImplementedError for "full", so it is refused here).

Update rules, briefly (so the numbers can be read):
  * the inner Adam is the transformers-style one: ``p -= lr * sqrt(1-b2^t)/(1-b1^t) * m / (sqrt(v) + eps)``
    (eps added before the bias correction, unlike torch's AdamW), then decoupled weight decay
    ``p -= lr * wd * p`` applied AFTER the update (torch.optim.AdamW decays before it);
  * GaLore: Adam on the projected gradient, projected back, times ``scale``. Projector = top-r singular
    vectors of the current gradient (SVD in float32), recomputed when ``step % update_proj_gap == 0``;
  * Fira: GaLore's update (``alpha`` as the scale) plus the residual ``(G - alpha * P P^T G)`` rescaled by
    the per-column/row norm ratio ||Adam update|| / ||projected G||, with the norm-growth limiter (ratio
    of successive residual norms capped at 1.01). Note: the package subtracts ``alpha * P P^T G`` (its
    ``project_back`` multiplies by ``alpha``), not ``P P^T G``; we use the package as it is;
  * APOLLO: Adam moments of a RANDOM projection of the gradient (``proj="random"``: Gaussian /
    sqrt(r)), used only to get a scaling factor (per channel, or one per tensor with
    ``scale_type="tensor"``) that multiplies the raw full-rank gradient; norm-growth limiter as Fira;
    the result is multiplied by ``sqrt(scale)`` -- the package takes the square root, so APOLLO-Mini's
    ``scale=128`` is a factor sqrt(128) ~ 11.3 (the README's "[sqrt 128, sqrt 256, ...]").

Per-parameter optimizer state of a projected [m, n] matrix (``step`` is a Python int in all three):
  * GaLore: step, projector (GaLoreProjector; ``ortho_matrix`` [r, n] or [m, r], in the param dtype),
    exp_avg, exp_avg_sq (shape of the projected gradient, [m, r] or [r, n]);
  * Fira: the same + ``scaling_grad`` (0-d tensor: last residual norm, for the limiter);
  * APOLLO: ``seed`` (int, set in ``__init__``: the 1-based position of the parameter among ALL the
    optimizer's params), step, projector (GradientProjector: ``ortho_matrix``, ``seed`` -- the seed of
    the NEXT random matrix -- and ``svd_count``; or GaLoreProjector for ``proj="svd"``), exp_avg,
    exp_avg_sq, ``scaled_grad`` (0-d tensor, the limiter's last norm).
The non-matrix params carry torch.optim.AdamW's state (step as a float32 0-d tensor, exp_avg, exp_avg_sq).

Randomness. APOLLO's random matrices come from a private ``torch.Generator`` seeded from the
projector's ``seed`` (``stable_randn``), and the next seed is derived from the current one
(``next_seed``). The global torch RNG is never used, so a run is resumed exactly if the projector's
``seed`` (and its current matrix) are saved -- which the state dict below does. Seeds are assigned by
the position of the parameter in the APOLLO optimizer; here that optimizer holds only the matrices (in
model order), so the seeds are 1..N, whereas the reference scripts list the regular params first: the
random draws differ from a reference run's but are drawn from the same distribution.

Checkpoints. The packages keep the projector as a Python object in the state, which makes
``optimizer.state_dict()`` unloadable with ``torch.load(weights_only=True)`` (torch's default) and would
share the object between optimizers on an in-memory ``load_state_dict``. :meth:`LowRankAdamW.state_dict`
therefore stores each projector as a plain dict of its non-configuration attributes (tensors and ints:
``ortho_matrix``, and for APOLLO ``seed``, ``svd_count``); its hyper-parameters come from the restored
param group. :meth:`LowRankAdamW.load_state_dict` rebuilds the objects with the packages' own
constructors. Strings are kept out of the per-parameter state on purpose: torch's ``load_state_dict``
casts every Iterable value with ``type(v)(generator)``, which turns a ``str`` into garbage.

Deviations from the reference training scripts (deliberate, per this project's protocol; say so when
comparing with the papers' numbers):
  * the reference scripts put the regular params in the package optimizer too (transformers-style
    AdamW, see above); here they get ``torch.optim.AdamW``. With wd 0 the two differ only by the eps
    placement (eps / sqrt(1 - b2^t) instead of eps);
  * eps is the packages' default ``1e-6``, which the reference scripts use (they do not pass it), for the
    projected matrices and the rest alike; the protocol's plain Adam uses 1e-8 (configs/optimizer/*.yaml);
  * APOLLO seeds, above.

Not installed by default: ``pip install 'llmopt[baselines]'``. galore-torch and apollo-torch import
bitsandbytes when imported (their ``__init__`` imports the 8-bit variants); all three packages declare
it as a dependency, so the extra pulls it in. Imports happen inside :func:`build_lowrank`.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from llmopt.optim.common import evaluate_closure
from llmopt.optim.registry import register

__all__ = ["LOWRANK_METHODS", "LowRankAdamW", "build_lowrank", "lowrank_state_elements"]

LOWRANK_METHODS = ("galore", "fira", "apollo", "apollo_mini")

# method -> (module, optimizer class, pip distribution)
_PACKAGES = {
    "galore": ("galore_torch", "GaLoreAdamW", "galore-torch"),
    "fira": ("fira", "FiraAdamW", "fira"),
    "apollo": ("apollo_torch", "APOLLOAdamW", "apollo-torch"),
    "apollo_mini": ("apollo_torch", "APOLLOAdamW", "apollo-torch"),
}

# protocol.md section 5 (rank: the 60M value; pass the model's rank for larger models)
# (scale_front: apollo-torch's own default)
_DEFAULTS: dict[str, dict[str, Any]] = {
    "galore": {"rank": 128, "scale": 0.25},
    "fira": {"rank": 128, "alpha": 0.25},
    "apollo": {"rank": 128, "scale": 1.0, "scale_type": "channel", "proj": "random", "scale_front": False},
    "apollo_mini": {"rank": 1, "scale": 128.0, "scale_type": "tensor", "proj": "random", "scale_front": False},
}

# method-specific hyper-parameters: which method takes which, and the value meaning "not given"
_SPECIFIC_UNSET: dict[str, Any] = {"scale": None, "alpha": None, "scale_type": None, "proj": "random",
                                   "scale_front": None}
_APPLIES: dict[str, frozenset[str]] = {
    "galore": frozenset({"scale"}),
    "fira": frozenset({"alpha"}),
    "apollo": frozenset({"scale", "scale_type", "proj", "scale_front"}),
    "apollo_mini": frozenset({"scale", "scale_type", "proj", "scale_front"}),
}
# of those, the ones the package takes as constructor arguments rather than param-group keys
_CONSTRUCTOR_KEYS = frozenset({"scale_front"})

_PROJ_TYPES = {
    "galore": ("std", "reverse_std", "left", "right", "full"),
    "fira": ("std", "reverse_std", "left", "right", "full"),
    "apollo": ("std", "reverse_std", "left", "right"),
    "apollo_mini": ("std", "reverse_std", "left", "right"),
}

# projector attributes that come from the param group (not saved in the per-parameter state)
_PROJECTOR_CONFIG = frozenset({"rank", "verbose", "update_proj_gap", "scale", "alpha", "proj_type"})

_ROLES_PLAIN = ("embedding", "output", "vector")


def _check_method(method: str) -> None:
    if method not in LOWRANK_METHODS:
        raise ValueError(f"unknown low-rank method {method!r}; choose one of {list(LOWRANK_METHODS)}")


def _import_optimizer_class(method: str) -> type[torch.optim.Optimizer]:
    module, cls, dist = _PACKAGES[method]
    try:
        mod = importlib.import_module(module)
    except ImportError as e:  # the package itself, or bitsandbytes which galore-torch/apollo-torch import
        raise ImportError(
            f"the {method!r} optimizer needs the {dist!r} package (galore-torch and apollo-torch also need "
            f"bitsandbytes at import time): pip install 'llmopt[baselines]'  [import of {module!r} failed: "
            f"{e}]") from e
    return getattr(mod, cls)


def _new_projector(method: str, inner: torch.optim.Optimizer, group: dict, state: dict) -> Any:
    """A fresh projector, built exactly as the package's step() builds it."""
    if method == "galore":
        from galore_torch.galore_projector import GaLoreProjector
        return GaLoreProjector(group["rank"], update_proj_gap=group["update_proj_gap"],
                               scale=group["scale"], proj_type=group["proj_type"])
    if method == "fira":
        from fira.gradient_projection import GradientProjector
        return GradientProjector(group["rank"], update_proj_gap=group["update_proj_gap"],
                                 alpha=group["alpha"], proj_type=group["proj_type"])
    return inner._initialize_projector(group, state)  # APOLLO: random or svd, seeded from state["seed"]


class LowRankAdamW(torch.optim.Optimizer):
    """A package low-rank optimizer for the matrices plus torch.optim.AdamW for the rest, as one optimizer.

    ``param_groups`` is the low-rank optimizer's groups followed by the AdamW groups -- the same dict
    objects, so LR schedulers and ``group["lr"] = ...`` reach both; ``state`` is one mapping shared by
    the three. ``step`` steps both. ``state_dict``/``load_state_dict`` use the standard torch layout with
    the projectors stored as tensors/ints (module docstring, "Checkpoints"), plus ``"lowrank_method"``;
    each group carries ``"param_names"`` (torch's named-parameter groups).
    Attributes: ``method``, ``lowrank`` (the package optimizer), ``adamw`` (torch AdamW or None). Their
    ``state`` is this optimizer's (shared), so checkpoint through this optimizer: ``lowrank.state_dict()``
    or ``adamw.state_dict()`` alone would meet the other's parameters in the state and fail.
    """

    def __init__(self, method: str, lowrank: torch.optim.Optimizer, adamw: torch.optim.Optimizer | None):
        self.method = method
        self.lowrank = lowrank
        self.adamw = adamw
        self._n_lowrank_groups = len(lowrank.param_groups)
        groups = list(lowrank.param_groups) + (list(adamw.param_groups) if adamw is not None else [])
        self._building = True
        super().__init__(groups, defaults={})  # keeps the dict objects (add_param_group appends them)
        self._building = False
        shared = lowrank.state  # APOLLO has already written its seeds there
        if adamw is not None:
            shared.update(adamw.state)
            adamw.state = shared
        self.state = shared

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if not getattr(self, "_building", False):
            raise RuntimeError("LowRankAdamW does not take new param groups; build a new optimizer "
                                      "with build_lowrank()")
        super().add_param_group(param_group)

    @torch.no_grad()
    def step(self, closure=None):
        loss = evaluate_closure(closure)
        self.lowrank.step()
        if self.adamw is not None:
            self.adamw.step()
        return loss

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        packed = {}
        for k, st in sd["state"].items():
            proj = st.get("projector")
            if proj is not None and not isinstance(proj, dict):
                st = dict(st)  # never modify the live state
                st["projector"] = self._pack_projector(proj)
            packed[k] = st
        sd["state"] = packed
        sd["lowrank_method"] = self.method
        return sd

    @staticmethod
    def _pack_projector(proj: Any) -> dict[str, Any]:
        out = {}
        for name, value in vars(proj).items():
            if name in _PROJECTOR_CONFIG:
                continue
            if isinstance(value, str):  # torch's load_state_dict would mangle it (see module docstring)
                raise TypeError(f"projector attribute {name!r} of {type(proj).__name__} is a string; this "
                                "package version is not supported by LowRankAdamW.state_dict")
            out[name] = value
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict.get("lowrank_method", self.method)
        if saved != self.method:
            raise ValueError(f"this state dict is of a {saved!r} optimizer, not {self.method!r}")
        saved_roles = [g.get("role") for g in state_dict["param_groups"]]
        roles = [g.get("role") for g in self.param_groups]
        if saved_roles != roles:
            raise ValueError(f"param-group roles differ: saved {saved_roles}, this optimizer {roles}")
        super().load_state_dict(state_dict)  # new self.state and new group dicts
        n = self._n_lowrank_groups
        self.lowrank.__setstate__({"state": self.state, "param_groups": self.param_groups[:n]})
        if self.adamw is not None:
            self.adamw.__setstate__({"state": self.state, "param_groups": self.param_groups[n:]})
        for group in self.param_groups[:n]:
            for p in group["params"]:
                st = self.state.get(p)
                if st and isinstance(st.get("projector"), dict):
                    proj = _new_projector(self.method, self.lowrank, group, st)
                    for name, value in st["projector"].items():
                        setattr(proj, name, value)
                    st["projector"] = proj


def _resolve(method: str, rank, scale, alpha, proj, scale_type, scale_front) -> dict[str, Any]:
    given = {"scale": scale, "alpha": alpha, "proj": proj, "scale_type": scale_type, "scale_front": scale_front}
    for name, value in given.items():
        if name not in _APPLIES[method] and value != _SPECIFIC_UNSET[name]:
            takers = [m for m in LOWRANK_METHODS if name in _APPLIES[m]]
            raise ValueError(f"{name}={value!r} does not apply to {method!r} (only to {takers})")
    d = _DEFAULTS[method]
    out: dict[str, Any] = {"rank": d["rank"] if rank is None else rank}
    for name in _APPLIES[method]:
        value = given[name]
        out[name] = d[name] if value is None else value
    return out


def build_lowrank(method: str, roles, *, lr: float = 0.01, rank: int | None = None,
                  update_proj_gap: int = 200, scale: float | None = None, weight_decay: float = 0.0,
                  betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-6, proj_type: str = "std",
                  alpha: float | None = None, proj: str = "random",
                  scale_type: str | None = None, scale_front: bool | None = None) -> torch.optim.Optimizer:
    """GaLore / Fira / APOLLO / APOLLO-Mini on the "matrix" params, torch.optim.AdamW on the others.

    ``roles``: a :class:`llmopt.optim.roles.ParamRoles`. Groups: one low-rank group ``role="matrix"``
    (keys of the package, module docstring), then one AdamW group per non-empty role among "embedding",
    "output", "vector"; all share lr, betas, eps and weight_decay. Method defaults (protocol.md section 5,
    60M values): rank 128 (apollo_mini 1); GaLore scale 0.25; Fira alpha 0.25 (use 0.0625 from 1B);
    APOLLO scale 1, channel scaling, random projection; APOLLO-Mini scale 128, tensor scaling; APOLLO*
    ``scale_front`` False (the package's default; module docstring). A method-specific hyper-parameter
    given to a method that does not take it is an error (``scale``: galore/apollo*, ``alpha``: fira,
    ``scale_type``/``proj``/``scale_front``: apollo*).
    """
    _check_method(method)
    hp = _resolve(method, rank, scale, alpha, proj, scale_type, scale_front)
    r = hp["rank"]
    if isinstance(r, bool) or not isinstance(r, int):
        raise TypeError(f"rank must be an int >= 1, got {r!r}")
    if r < 1:
        raise ValueError(f"rank must be >= 1, got {r}")
    if not lr >= 0.0:
        raise ValueError(f"lr must be >= 0, got {lr}")
    if isinstance(update_proj_gap, bool) or not isinstance(update_proj_gap, int) or update_proj_gap < 1:
        raise ValueError(f"update_proj_gap must be an int >= 1, got {update_proj_gap!r}")
    if not weight_decay >= 0.0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    if not eps >= 0.0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        raise ValueError(f"betas must be two numbers in [0, 1), got {betas!r}")
    if proj_type not in _PROJ_TYPES[method]:
        raise ValueError(f"proj_type {proj_type!r} is not valid for {method!r}; choose one of "
                         f"{list(_PROJ_TYPES[method])}")
    if "scale" in hp and not hp["scale"] > 0:
        raise ValueError(f"scale must be > 0, got {hp['scale']}")
    if "alpha" in hp and not hp["alpha"] >= 0:
        raise ValueError(f"alpha must be >= 0, got {hp['alpha']}")
    if "scale_type" in hp and hp["scale_type"] not in ("channel", "tensor"):
        raise ValueError(f"scale_type must be 'channel' or 'tensor', got {hp['scale_type']!r}")
    if "proj" in hp and hp["proj"] not in ("random", "svd"):
        raise ValueError(f"proj must be 'random' or 'svd', got {hp['proj']!r}")
    if "scale_front" in hp and not isinstance(hp["scale_front"], bool):
        raise ValueError(f"scale_front must be true or false, got {hp['scale_front']!r}")

    def named(role):  # (name, param) pairs: torch stores the names as the group's "param_names"
        return list(zip(roles.names(role), roles.params(role), strict=True))

    matrices = named("matrix")
    if not matrices:
        raise ValueError(f"{method!r} needs 'matrix' parameters to project; the roles have none")
    cls = _import_optimizer_class(method)

    lowrank_group = {"params": matrices, "role": "matrix", "rank": r, "update_proj_gap": update_proj_gap,
                     "proj_type": proj_type}
    lowrank_group.update({k: v for k, v in hp.items() if k != "rank" and k not in _CONSTRUCTOR_KEYS})
    common = {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay}
    kwargs: dict[str, Any] = {"correct_bias": True, "no_deprecation_warning": True,
                              **{k: v for k, v in hp.items() if k in _CONSTRUCTOR_KEYS}}
    lowrank = cls([lowrank_group], **common, **kwargs)

    plain = [{"params": named(role), "role": role} for role in _ROLES_PLAIN if roles.params(role)]
    adamw = torch.optim.AdamW(plain, **common) if plain else None
    return LowRankAdamW(method, lowrank, adamw)


def lowrank_state_elements(method: str, shapes_of_matrices: Iterable[Sequence[int]], n_other_params: int,
                           rank: int | None = None, *, proj_type: str = "std", proj: str = "random") -> int:
    """Optimizer-state elements (numbers, not bytes) of ``method`` after its first step.

    Derived from the packages' step() code (module docstring) for each projected [m, n] matrix, with
    r' = min(r, m, n) for SVD projectors (GaLore, Fira, APOLLO ``proj="svd"``: ``U[:, :r]`` truncates)
    and r' = r for APOLLO's random projector (a Gaussian [r, n] / [m, r], never truncated):
      * Adam moments exp_avg + exp_avg_sq of the projected gradient, 2 * r' * (projected side), plus the
        projector r' * (other side); with proj_type "std" the projected gradient is [max(m,n), r'] and the
        projector [r', min(m,n)]; "reverse_std" swaps them; "right": moments 2*m*r', projector r'*n;
        "left": moments 2*r'*n, projector m*r'; "full" (GaLore/Fira): moments 2*r'*r', projector
        m*r' + r'*n;
      * Fira and APOLLO: + 1 (the norm-growth limiter's 0-d tensor);
    plus 2 * n_other_params for torch.optim.AdamW's exp_avg and exp_avg_sq of the other parameters.
    Not counted: step counters (a Python int per matrix, a 0-d tensor per other parameter), APOLLO's
    int seeds, and transient buffers (the full-size projected-back update inside step()).
    The unit test checks this count against the state of a real optimizer after a step.
    """
    _check_method(method)
    if method in ("galore", "fira") and proj != "random":
        raise ValueError(f"proj does not apply to {method!r}")
    r = _DEFAULTS[method]["rank"] if rank is None else rank
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"rank must be an int >= 1, got {r!r}")
    if proj_type not in _PROJ_TYPES[method]:
        raise ValueError(f"proj_type {proj_type!r} is not valid for {method!r}; choose one of "
                         f"{list(_PROJ_TYPES[method])}")
    svd = method in ("galore", "fira") or proj == "svd"
    total = 2 * int(n_other_params)
    for shape in shapes_of_matrices:
        m, n = (int(s) for s in shape)
        rr = min(r, m, n) if svd else r
        if proj_type == "std":
            proj_side, other = (m, n) if m >= n else (n, m)
        elif proj_type == "reverse_std":
            proj_side, other = (n, m) if m >= n else (m, n)
        elif proj_type == "right":
            proj_side, other = m, n
        elif proj_type == "left":
            proj_side, other = n, m
        else:  # full
            total += 2 * rr * rr + m * rr + rr * n
            proj_side = other = 0
        total += 2 * rr * proj_side + rr * other
        if method != "galore":
            total += 1
    return total


def _builder(method: str):
    def build(roles, **hparams):
        return build_lowrank(method, roles, **hparams)
    build.__name__ = f"build_{method}"
    return build


# whole matrices (the projection); the memory accounting is lowrank_state_elements, by shape; the contract
# tests leave them out (their packages are optional): tests/optim/test_lowrank.py covers them
for _method in LOWRANK_METHODS:
    register(_method, whole_tensors=True)(_builder(_method))
