"""One measured update's device values, each under its key, read back in one device-to-host copy."""

from __future__ import annotations

import math

import torch

from llmopt.metrics.diagnostics.tensors import _dist, _local, _sq_norms


class Record:
    """Collects the values of one measured update on the device. Sums (of squares) are added up across
    FSDP ranks, the rest is each rank's own; `finish()` reduces the sums in one all_reduce, copies
    everything back in one transfer and returns the logged values in the order they were recorded.

    For an optimizer's `diagnostics(self, record)` hook (called right after its step):
      add_scalar(key, value)            log a 0-d tensor (or a float) as it is
      add_norm(key, tensors)            log the l2 norm over `tensors` (their squares summed across ranks)
      add_per_tensor(key, values, role_key=None)   log the mean of {parameter: 0-d tensor}, and with
                                        role_key (role -> key) the mean over each role's parameters
    """

    def __init__(self, device, params: list[torch.Tensor], roles: list[str]):
        self.device = device
        self._order = {id(p): i for i, p in enumerate(params)}
        self._roles = roles
        self._entries: list = []     # (key, 1-D float64 tensor or None, float or None, summed, how logged)

    def add_sum(self, key: str, values: torch.Tensor) -> None:
        """Squared norms summed across ranks, not logged: read back by key from finish()'s first result."""
        self._entries.append((key, values.reshape(-1).to(self.device), None, True, None))

    def add_values(self, key: str, values: torch.Tensor) -> None:
        """This rank's values, not logged: read back by key from finish()'s first result."""
        self._entries.append((key, values.reshape(-1).double().to(self.device), None, False, None))

    def add_scalar(self, key: str, value) -> None:
        if torch.is_tensor(value):
            self._entries.append((key, value.detach().reshape(1).double().to(self.device), None, False, "value"))
        else:   # a host number stays on the host
            self._entries.append((key, None, float(value), False, "value"))

    def add_norm(self, key: str, tensors: list[torch.Tensor]) -> None:
        sq = _sq_norms([_local(t).detach() for t in tensors]).sum().reshape(1).to(self.device)
        self._entries.append((key, sq, None, True, "sqrt"))

    def add_per_tensor(self, key: str, values: dict, role_key=None) -> None:
        items = sorted(((self._order[id(p)], v) for p, v in values.items() if id(p) in self._order),
                       key=lambda item: item[0])
        if not items:
            return
        vals = [v.detach().reshape(()).double().to(self.device) for _, v in items]
        self.add_scalar(key, torch.stack(vals).mean())
        if role_key is not None:
            for role in dict.fromkeys(self._roles[i] for i, _ in items):
                sel = [v for (i, _), v in zip(items, vals) if self._roles[i] == role]
                self.add_scalar(role_key(role), torch.stack(sel).mean())

    def finish(self, reduce: bool = False) -> tuple[dict[str, list[float]], dict[str, float]]:
        """(the unlogged values by key, the logged values by key in recording order): one all_reduce of
        the sums when `reduce`, then one copy to the host."""
        summed = [e for e in self._entries if e[1] is not None and e[3]]
        own = [e for e in self._entries if e[1] is not None and not e[3]]
        parts = []
        if summed:
            sums = torch.cat([e[1] for e in summed])
            if reduce:
                _dist().all_reduce(sums)
            parts.append(sums)
        parts += [e[1] for e in own]
        flat = torch.cat(parts).cpu().tolist() if parts else []
        pos, got = 0, {}
        for key, tensor, *_ in summed + own:
            got[key] = flat[pos:pos + tensor.numel()]
            pos += tensor.numel()
        raw, logged = {}, {}
        for key, tensor, host, _, how in self._entries:
            if how is None:
                raw[key] = got[key]
            elif how == "sqrt":
                logged[key] = math.sqrt(got[key][0])
            else:
                logged[key] = host if tensor is None else got[key][0]
        return raw, logged
