"""Per-layer optimizer diagnostics (the SGD-LL paper's, docs/protocol.md section 3), for every optimizer.

Every `every` optimizer updates the trainer measures one update: per parameter tensor the update RMS,
weight RMS, gradient RMS, ||w|| / ||g||, ||w|| / ||m|| (where a momentum exists) and the distance from
initialization; Adam's effective learning rates; the output layer's per-token-class gradient norms;
SGD-LL's clip fractions; global norms and loss spikes. Everything comes from what the model and the
optimizer already hold (no extra forward/backward); the norms are batched (torch._foreach_norm) and stay
on the device until `collect()`, which reads them back in one transfer.

Use (the trainer's calls)
-------------------------
    diag = Diagnostics(model, optimizer, every=100, init_device="cpu")   # snapshots w_0 now
    ...  backward, grad clipping ...
    diag.before_step(update)     # update = 0-based index of the update about to be made
    optimizer.step()
    diag.after_step(update)
    ...  step += 1
    diag.observe_loss(loss)      # optional, each logged training loss (spike detection)
    if diag.due(step): metrics.update(diag.collect())

`model` is the unwrapped LlamaForCausalLM (after Accelerate's prepare, so FSDP2's DTensor parameters are
the ones seen); `optimizer` the raw optimizer (an Accelerate AcceleratedOptimizer is unwrapped too).
Update `update` is measured when (update + 1) % every == 0; `due(step)` is true for step = update + 1.
Construct it BEFORE a checkpoint is loaded: w_0 is the weights at construction, and build_model
regenerates the same initial weights from the seed (run.py does so).

Keys (stable; T = a tensor id, L = a layer)
--------------------------------------------
Tensor ids: "<block>/<kind>" for the blocks' tensors, block "0".."L-1" and kind one of
q, k, v, o, gate, up, down, attn_norm, mlp_norm; "embed" (token embedding), "head" (lm_head),
"final_norm"; any other parameter "other/<its name, dots as underscores>".

  diag/T/update_rms      ||w_{t+1} - w_t|| / sqrt(numel): the change the step made (see EMA-Nesterov below)
  diag/T/weight_rms      ||w_{t+1}|| / sqrt(numel)
  diag/T/grad_rms        ||g_t|| / sqrt(numel), the gradient the optimizer received (after clipping)
  diag/T/w_over_g        ||w_{t+1}|| / ||g_t||
  diag/T/w_over_m        ||w_{t+1}|| / ||m_{t+1}||, only for tensors whose optimizer state holds a
                         parameter-shaped momentum: "momentum_buffer" (SGD, SCALE, SGD-LL, torch Muon),
                         "exp_avg" (Adam family), "momentum" (first found, in that order)
  diag/T/dist_init       ||w_{t+1} - w_0||
  diag/T/dist_init_rel   ||w_{t+1} - w_0|| / ||w_0||
  diag/global/grad_norm, update_norm, weight_norm, dist_init, dist_init_rel   the same over all tensors
  diag/global/loss_spike         logged losses since the last record that exceeded (1 + spike_threshold)
                                 x the median of the previous `spike_window` logged losses (non-finite
                                 losses count as spikes)
  diag/global/loss_spike_ratio   the largest loss / trailing-median ratio over the losses logged since
                                 the last record (absent until 5 losses were seen; median = upper middle)
  diag/head/token_grad_norm_{q50,q90,q99,max}   quantiles (linear interpolation) of the per-vocabulary-
                                 row norms of the lm_head gradient, the "Type II" irregularity
  diag/head/token_grad_norm_max_over_median
  diag/adam/eff_lr_{median,q10,q90}/L   over the elements of layer L that an Adam-type rule steps
                                 (state "exp_avg_sq" of the parameter's shape): lr / (sqrt(v_hat) + eps),
                                 v_hat = exp_avg_sq / (1 - beta2^step) (torch AdamW's bias correction,
                                 for every Adam-type rule here, whatever its own eps placement), with the
                                 group's lr, eps ("eps" or "adam_eps") and beta2 ("betas" or "adam_betas").
                                 L = block index, "embed", "head", "final_norm" or "other". Exact when
                                 the layer has <= eff_lr_samples such elements, else over a fixed random
                                 sample of that size, drawn with probability proportional to tensor size.
                                 (Embedding rows of tokens never seen have v = 0: their lr / eps shows.)
  diag/sgd_ll/rms_clip_fraction_layers   share of tensors whose RMS clip fired in the measured update
  diag/sgd_ll/rms_clip_fraction/<role>   the same per role (matrix, embedding, output, vector)
  diag/sgd_ll/row_clip_fraction          share of lm_head rows the per-token-class clip shrank
  diag/lookahead/beta            EMA-Nesterov's beta_t of the measured update
  diag/lookahead/momentum_norm   ||m|| of its lookahead momentum after the update
  (any key)                      an optimizer's own values: a method `diagnostics(self, record)` on it or
                                 any inner one, called right after its step (record.py: add_scalar,
                                 add_norm, add_per_tensor); SGD-LL's and EMA-Nesterov's keys above so

Keys per record: micro flavor (21 tensors) ~170, 130m (111 tensors) ~830, 7b (291 tensors) ~2,150.
Non-finite values (a zero gradient's w_over_g) are written as null by the loggers.

EMA-Nesterov: the trainer moves the parameters to the lookahead point y = x_t + beta_t m before the
forward pass; update_rms is measured from the rest point x_t (the wrapper's `prev`) to x_{t+1}, the
change of the weights that are evaluated and checkpointed, consistent with the distance from init.
The gradient is the one taken at y.

Memory
------
  * w_0: one copy of the trainable parameters in their dtype, on `init_device`: "cpu" (default; pinned
    when the parameters are on CUDA, so the copies back are asynchronous), "same" (each parameter's
    device: fastest, doubles weight memory) or None/"none" (no distance from init).
  * the update snapshot: one parameter-sized buffer in the parameters' dtype, allocated at the first
    measured update and reused, on `snapshot_device`: None (the parameters' device, default) or "cpu"
    (pinned host memory; no device memory, costs a device-to-host and a host-to-device copy of the
    weights per measured update). When it is on the device it also serves as the staging buffer for
    w_0, so a CPU-held w_0 costs no further device memory; otherwise w_0 and a CPU snapshot are brought
    back in buckets of `bucket_mb` MB.
  So at the 7B flavor in bf16 (13.5 GB of weights): +13.5 GB of host memory for w_0 and +13.5 GB of
  device memory for the snapshot (or +13.5 GB more host memory with snapshot_device="cpu"). Adam's
  effective-lr samples: 8 bytes x eff_lr_samples per layer of indices (~5 MB at 7B).

Distributed
-----------
  * DDP: after backward every replica holds the same parameters, (averaged) gradients and optimizer
    state, so nothing needs reducing: only rank 0 measures (and holds w_0 and the snapshot); the other
    ranks' calls return at once and their collect() returns {} (only rank 0 logs).
  * FSDP2 (DTensor parameters, AdamW only: the trainer refuses row-normalizing optimizers): every rank
    measures its shards; the sums of squares of every tensor and the lm_head's per-row gradient norms
    (each rank fills its own rows of a vocabulary-long vector) are reduced in ONE all_reduce in
    collect(), so the norms, ratios and token-norm quantiles are those of the full tensors. Adam's
    effective-lr quantiles are each rank's own shards' (rank 0's are logged). FSDP1 flat parameters
    are not supported.

Overhead
--------
Unmeasured updates cost two integer tests. A measured update adds a fixed amount of work (about ten
passes over the weights, the copy of w_0 back to the device, and one small sort per layer for Adam's
effective lr), no host sync inside before_step/after_step (checked with torch.cuda.set_sync_debug_mode;
only the one-time sample indices are copied synchronously) and one transfer in collect().
`python -m llmopt.metrics.diagnostics --flavor F --optimizer O` (benchmark() below) measures the overhead;
the measured figures are in benchmarks/RESULTS.md ("Diagnostics overhead").
"""

from __future__ import annotations

import math
from collections import deque

import torch

from llmopt.metrics.diagnostics import keys
from llmopt.metrics.diagnostics.record import Record
from llmopt.metrics.diagnostics.tensors import (
    _device_quantiles,
    _dist,
    _local,
    _nested_optimizers,
    _quantile,
    _ratio,
    _sanitize,
    _scatter,
    _sq_norms,
    _unwrap,
    layer_of,
    tensor_id,
)

BLOCK_KINDS = ("q", "k", "v", "o", "gate", "up", "down", "attn_norm", "mlp_norm")
MATRIX_KINDS = ("q", "k", "v", "o", "gate", "up", "down")
MOMENTUM_KEYS = ("momentum_buffer", "exp_avg", "momentum")


class Diagnostics:
    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, every: int = 100,
                 init_device: str | None = "cpu", snapshot_device: str | None = None,
                 eff_lr_samples: int = 16384, bucket_mb: float = 512.0, spike_window: int = 20,
                 spike_threshold: float = 0.1, seed: int = 0):
        if int(every) <= 0:
            raise ValueError(f"diagnostics every must be > 0 (updates between measurements), got {every}")
        if snapshot_device not in (None, "cpu"):
            raise ValueError(f"snapshot_device must be None (the parameters' device) or 'cpu', got {snapshot_device!r}")
        if eff_lr_samples < 1:
            raise ValueError(f"eff_lr_samples must be >= 1, got {eff_lr_samples}")
        self.every = int(every)
        self.optimizer = _unwrap(optimizer)
        self.snapshot_device = snapshot_device
        self.eff_lr_samples = int(eff_lr_samples)
        self.bucket_bytes = int(bucket_mb * 2**20)
        self.spike_window, self.spike_threshold = int(spike_window), float(spike_threshold)
        self.seed = seed

        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("the model has no trainable parameters")
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        ids = [tensor_id(n) for n in self.names]
        if len(set(ids)) != len(ids):  # unusual names: fall back to the full names
            ids = [f"other/{_sanitize(n)}" for n in self.names]
        self.ids = ids
        self.layers = [layer_of(t) for t in ids]
        self.numel = [p.numel() for p in self.params]          # global element counts (DTensor too)
        self.roles = self._roles(model)
        self.head = self.ids.index("head") if "head" in self.ids else None
        self.vocab = self.params[self.head].shape[0] if self.head is not None else 0

        dist = _dist()
        self.world = dist.get_world_size() if dist is not None else 1
        self.rank = dist.get_rank() if dist is not None else 0
        self.sharded = any(type(p).__name__ == "DTensor" for p in self.params)
        self.reduce = self.sharded and self.world > 1
        self.active = self.sharded or self.rank == 0   # DDP: replicas are identical, rank 0 measures

        self.lookahead = None
        for opt in _nested_optimizers(self.optimizer):
            if hasattr(opt, "pre_forward") and hasattr(opt, "prev") and hasattr(opt, "current_beta"):
                self.lookahead = opt
                break
        self._prev_of = {}
        if self.lookahead is not None:
            self._prev_of = {id(p): prev for p, prev in zip(self.lookahead.params, self.lookahead.prev)}

        self.w0 = None
        if self.active and init_device not in (None, "none", "off"):
            local = self._local_params()
            w0_sq = _sq_norms(local).to(local[0].device)     # ||w_0||^2 per tensor, on the device
            if self.reduce:
                dist.all_reduce(w0_sq)
            self.w0_sq = w0_sq.cpu().tolist()
            self.w0 = [self._copy_to(t, init_device) for t in local]

        self._snap = None
        self._pending = None
        self._result = None
        self._eff_plan: dict = {}
        self._losses: deque = deque(maxlen=self.spike_window)
        self._spikes = 0
        self._spike_ratio = None

    # -- set-up helpers ----------------------------------------------------------------------------
    def _roles(self, model) -> list[str]:
        from llmopt.optim.roles import classify_parameters

        try:
            role_of = classify_parameters(model).role_of()
        except ValueError:
            role_of = {}
        roles = []
        for tid, p in zip(self.ids, self.params):
            role = role_of.get(id(p))
            if role is None:
                role = "vector" if p.ndim < 2 else {"embed": "embedding", "head": "output"}.get(tid, "matrix")
            roles.append(role)
        return roles

    @staticmethod
    def _copy_to(t: torch.Tensor, where: str) -> torch.Tensor:
        if where in ("same", "device"):
            return t.clone()
        device = torch.device(where)
        if device.type == "cpu":
            out = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=t.is_cuda)
            out.copy_(t)
            return out
        return t.to(device, copy=True)

    def _local_params(self) -> list[torch.Tensor]:
        return [_local(p).detach() for p in self.params]

    # -- the trainer's calls -----------------------------------------------------------------------
    def due(self, step: int) -> bool:
        """Whether completed-update count `step` ends a measured update (then collect())."""
        return step > 0 and step % self.every == 0

    def measures(self, update: int) -> bool:
        return (update + 1) % self.every == 0

    @torch.no_grad()
    def before_step(self, update: int) -> None:
        """Right before optimizer.step() of update `update` (0-based), gradients present."""
        if not self.active or not self.measures(update):
            return
        params = self._local_params()
        device = params[0].device
        grads = [_local(p.grad) for p in self.params]
        g_sq = _scatter(len(params), [i for i, g in enumerate(grads) if g is not None],
                        [g.detach() for g in grads if g is not None], device)
        rows_sq = None
        if self.head is not None and grads[self.head] is not None:
            g = grads[self.head].detach()
            acc = torch.float64 if g.dtype == torch.float64 else torch.float32
            rows = torch.linalg.vector_norm(g, dim=1, dtype=acc).double().square()
            if self.reduce:
                rows_sq = torch.zeros(self.vocab, dtype=torch.float64, device=device)
                start = self._row_offset(self.params[self.head])
                rows_sq[start:start + rows.numel()] = rows
            else:
                rows_sq = rows
        # snapshot w_t (EMA-Nesterov: its rest point, the parameters being at the lookahead point)
        sources = [_local(self._prev_of.get(id(p), p)).detach() for p in self.params]
        if self._snap is None:
            self._snap = [self._copy_to(s, "same" if self.snapshot_device is None else "cpu") for s in sources]
        else:
            self._copy(self._snap, sources)
        self._pending = {"update": update, "g_sq": g_sq, "rows_sq": rows_sq}

    @torch.no_grad()
    def after_step(self, update: int) -> None:
        """Right after optimizer.step() of update `update`: measure it (results stay on the device)."""
        pending, self._pending = self._pending, None
        if pending is None or pending["update"] != update:
            return
        params = self._local_params()
        device = params[0].device
        w_sq = _sq_norms(params).to(device)
        on_device = self._snap[0].device == device
        if on_device:
            torch._foreach_sub_(self._snap, params)          # snapshot := w_t - w_{t+1}
            d_sq = _sq_norms(self._snap).to(device)
        else:
            d_sq = self._diff_sq(params, self._snap)
        dist_sq = None
        if self.w0 is not None:
            if on_device:   # reuse the snapshot buffer as staging: no extra device memory
                self._copy(self._snap, self.w0)
                torch._foreach_sub_(self._snap, params)
                dist_sq = _sq_norms(self._snap).to(device)
            else:
                dist_sq = self._diff_sq(params, self.w0)

        state, groups = self._state_and_groups()
        has_m = [False] * len(params)
        m_idx, m_tensors = [], []
        for i, p in enumerate(self.params):
            st = state.get(p)
            if not st:
                continue
            for key in MOMENTUM_KEYS:
                buf = st.get(key)
                if torch.is_tensor(buf) and tuple(buf.shape) == tuple(p.shape):
                    m_idx.append(i)
                    m_tensors.append(_local(buf).detach())
                    has_m[i] = True
                    break
        m_sq = _scatter(len(params), m_idx, m_tensors, device)

        record = Record(device, self.params, self.roles)
        record.add_sum("g_sq", pending["g_sq"])
        record.add_sum("w_sq", w_sq)
        record.add_sum("d_sq", d_sq)
        if dist_sq is not None:
            record.add_sum("dist_sq", dist_sq)
        record.add_sum("m_sq", m_sq)
        if pending["rows_sq"] is not None:
            record.add_sum("rows_sq", pending["rows_sq"])
        # the optimizers' own values (EMA-Nesterov's beta, SGD-LL's clip rates, ...), outermost first
        for opt in _nested_optimizers(self.optimizer):
            hook = getattr(opt, "diagnostics", None)
            if callable(hook):
                hook(record)
        eff_layers, eff = self._eff_lr(state, groups, device)
        for layer, q in zip(eff_layers, eff):
            for (name, _), value in zip(keys.EFF_LR_QUANTILES, q):
                record.add_scalar(keys.eff_lr(name, layer), value)
        self._result = {"update": update, "record": record, "has_m": has_m}

    def observe_loss(self, loss: float) -> None:
        """A logged training loss, for spike detection."""
        loss = float(loss)
        if not math.isfinite(loss):
            self._spikes += 1
            return
        if len(self._losses) >= min(self.spike_window, 5):
            ref = sorted(self._losses)[len(self._losses) // 2]
            if ref > 0:
                ratio = loss / ref
                if ratio > 1.0 + self.spike_threshold:
                    self._spikes += 1
                if self._spike_ratio is None or ratio > self._spike_ratio:
                    self._spike_ratio = ratio
        self._losses.append(loss)

    def collect(self) -> dict[str, float]:
        """The metrics of the last measured update, as Python floats (one device-to-host copy; under
        FSDP2 one all_reduce first). Empty if nothing was measured since the last call."""
        result, self._result = self._result, None
        if result is None or not self.active:
            return {}
        raw, logged = result["record"].finish(self.reduce)
        g_sq, w_sq, d_sq, m_sq = raw["g_sq"], raw["w_sq"], raw["d_sq"], raw["m_sq"]
        dist_sq, rows_sq = raw.get("dist_sq"), raw.get("rows_sq")

        out: dict[str, float] = {}
        for i, tid in enumerate(self.ids):
            n = self.numel[i]
            w, g = math.sqrt(w_sq[i]), math.sqrt(g_sq[i])
            out[keys.per_tensor(tid, "update_rms")] = math.sqrt(d_sq[i] / n)
            out[keys.per_tensor(tid, "weight_rms")] = math.sqrt(w_sq[i] / n)
            out[keys.per_tensor(tid, "grad_rms")] = math.sqrt(g_sq[i] / n)
            out[keys.per_tensor(tid, "w_over_g")] = _ratio(w, g)
            if result["has_m"][i]:
                out[keys.per_tensor(tid, "w_over_m")] = _ratio(w, math.sqrt(m_sq[i]))
            if dist_sq is not None:
                d = math.sqrt(dist_sq[i])
                out[keys.per_tensor(tid, "dist_init")] = d
                out[keys.per_tensor(tid, "dist_init_rel")] = _ratio(d, math.sqrt(self.w0_sq[i]))
        out[keys.GRAD_NORM] = math.sqrt(sum(g_sq))
        out[keys.UPDATE_NORM] = math.sqrt(sum(d_sq))
        out[keys.WEIGHT_NORM] = math.sqrt(sum(w_sq))
        if dist_sq is not None:
            out[keys.DIST_INIT] = math.sqrt(sum(dist_sq))
            out[keys.DIST_INIT_REL] = _ratio(math.sqrt(sum(dist_sq)), math.sqrt(sum(self.w0_sq)))
        out[keys.LOSS_SPIKE] = float(self._spikes)
        if self._spike_ratio is not None:
            out[keys.LOSS_SPIKE_RATIO] = self._spike_ratio
        self._spikes, self._spike_ratio = 0, None
        if rows_sq is not None:
            norms = sorted(math.sqrt(max(r, 0.0)) for r in rows_sq)
            for name, q in keys.TOKEN_QUANTILES:
                out[keys.token_grad_norm(name)] = _quantile(norms, q)
            out[keys.token_grad_norm("max")] = norms[-1]
            out[keys.TOKEN_GRAD_NORM_MAX_OVER_MEDIAN] = _ratio(norms[-1], _quantile(norms, 0.5))
        out.update(logged)
        return out

    # -- internals ----------------------------------------------------------------------------------
    @staticmethod
    def _copy(dst: list[torch.Tensor], src: list[torch.Tensor]) -> None:
        if dst and dst[0].device == src[0].device:
            torch._foreach_copy_(dst, src)
        else:
            for d, s in zip(dst, src):
                d.copy_(s, non_blocking=True)

    def _diff_sq(self, params: list[torch.Tensor], refs: list[torch.Tensor]) -> torch.Tensor:
        """||ref - p||^2 per tensor, refs on another device (or to be left intact): in buckets."""
        device = params[0].device
        out, bucket, size = [], [], 0

        def flush():
            tmp = [refs[i].to(device, non_blocking=True, copy=True) for i in bucket]
            torch._foreach_sub_(tmp, [params[i] for i in bucket])
            out.append(_sq_norms(tmp).to(device))

        for i, p in enumerate(params):
            bucket.append(i)
            size += p.numel() * p.element_size()
            if size >= self.bucket_bytes:
                flush()
                bucket, size = [], 0
        if bucket:
            flush()
        return torch.cat(out)

    def _state_and_groups(self) -> tuple[dict, dict]:
        """param -> its optimizer state, id(param) -> its param group, over nested optimizers."""
        state, groups = {}, {}
        for opt in reversed(_nested_optimizers(self.optimizer)):
            try:
                state.update(opt.state)
                for group in opt.param_groups:
                    for p in group["params"]:
                        groups[id(p)] = group
            except (AttributeError, TypeError):
                continue
        return state, groups

    def _row_offset(self, p) -> int:
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        _, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
        return int(offset[0])

    def _eff_lr(self, state: dict, groups: dict, device) -> tuple[list[str], list[torch.Tensor]]:
        """Per layer: [q10, median, q90] of lr / (sqrt(v_hat) + eps) over its Adam-stepped elements."""
        by_layer: dict[str, list] = {}
        for i, p in enumerate(self.params):
            st, group = state.get(p), groups.get(id(p))
            if not st or group is None:
                continue
            v = st.get("exp_avg_sq")
            if not torch.is_tensor(v) or tuple(v.shape) != tuple(p.shape):
                continue
            by_layer.setdefault(self.layers[i], []).append((i, _local(v).detach(), group, st.get("step")))
        layers, results = [], []
        for layer, items in by_layer.items():
            key = (layer, tuple(i for i, *_ in items))
            plan = self._eff_plan.get(key)
            if plan is None:
                plan = self._sample_plan([v.numel() for _, v, _, _ in items], device)
                self._eff_plan[key] = plan
            pool = []
            for (_, v, group, step), idx in zip(items, plan):
                flat = v.reshape(-1)
                if idx is not None:
                    flat = torch.index_select(flat, 0, idx)   # (advanced indexing syncs on CUDA)
                acc = torch.float64 if flat.dtype == torch.float64 else torch.float32
                flat = flat.to(acc)
                lr = float(group["lr"])
                eps = float(group.get("eps", group.get("adam_eps", 1e-8)))
                beta2 = float((group.get("betas") or group.get("adam_betas") or (0.9, 0.999))[1])
                denom = flat.sqrt()
                if step is not None and group.get("correct_bias", True):
                    if torch.is_tensor(step) and step.device.type != "cpu":   # fused/capturable: no sync
                        bc2 = 1 - torch.pow(torch.full((), beta2, dtype=torch.float64, device=step.device),
                                            step.double())
                        denom = denom / bc2.sqrt().to(device=denom.device, dtype=acc)
                    else:
                        denom = denom / math.sqrt(1 - beta2 ** float(step))
                pool.append(lr / (denom + eps))
            x = torch.cat(pool) if len({t.dtype for t in pool}) == 1 else torch.cat([t.double() for t in pool])
            layers.append(layer)
            results.append(_device_quantiles(x, [q for _, q in keys.EFF_LR_QUANTILES]).to(device))
        return layers, results

    def _sample_plan(self, sizes: list[int], device) -> list:
        """Element indices per tensor (None: all), <= eff_lr_samples in all, proportional to size."""
        total = sum(sizes)
        if total <= self.eff_lr_samples:
            return [None] * len(sizes)
        gen = torch.Generator().manual_seed(self.seed + len(self._eff_plan))
        plan = []
        for n in sizes:
            k = min(n, max(1, round(self.eff_lr_samples * n / total)))
            plan.append(torch.randint(n, (k,), generator=gen).to(device))
        return plan


# -- overhead benchmark: python -m llmopt.metrics.diagnostics --flavor tiny --optimizer adamw --------
def benchmark(flavor: str = "tiny", optimizer: str = "adamw", device: str = "cpu", dtype: str = "float32",
              micro_batch: int = 8, seq_len: int = 256, steps: int = 10, every: int = 100,
              init_device: str | None = "cpu", snapshot_device: str | None = None, **hparams) -> dict:
    """Time plain optimizer steps against steps measured by Diagnostics (every update measured), and
    derive the overhead at interval `every`: (t_measured - t_plain) / (every * t_plain)."""
    import time

    from llmopt.model import build_model, llama_config
    from llmopt.optim import build_optimizer

    dev = torch.device(device)
    model = build_model(llama_config(flavor), seed=0, device=dev, dtype=getattr(torch, dtype))
    opt = build_optimizer(model, optimizer, **hparams)
    diag = Diagnostics(model, opt, every=1, init_device=init_device, snapshot_device=snapshot_device)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, model.config.vocab_size, (micro_batch, seq_len), generator=gen).to(dev)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    last: dict = {}
    syncs: list = []

    def one(update: int, measured: bool) -> float:
        if hasattr(opt, "pre_forward"):
            opt.pre_forward()
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda" and dtype == "float32"):
            loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        sync()
        t0 = time.perf_counter()
        if measured:
            with _count_syncs(dev, syncs):
                diag.before_step(update)
        opt.step()
        if measured:
            with _count_syncs(dev, syncs):
                diag.after_step(update)
            last.update(diag.collect())
        sync()
        t = time.perf_counter() - t0
        opt.zero_grad(set_to_none=True)
        return t

    def timed(measured: bool) -> tuple[float, float]:
        sync()
        start = time.perf_counter()
        inner = sum(one(u, measured) for u in range(steps))
        sync()
        return (time.perf_counter() - start) / steps, inner / steps

    for u in range(3):                       # warm-up (both paths, allocating the snapshot and samples)
        one(u, measured=u > 0)
    syncs.clear()                            # the one-time set-up copies are not counted
    plain_step, plain_opt = timed(False)
    meas_step, meas_opt = timed(True)
    cost = meas_opt - plain_opt               # the diagnostics' own time (optimizer step excluded)
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    out = {"flavor": flavor, "optimizer": optimizer, "device": str(dev), "dtype": dtype,
           "tokens_per_step": micro_batch * seq_len, "params_M": sum(p.numel() for p in model.parameters()) / 1e6,
           "step_s": plain_step, "opt_step_s": plain_opt, "measured_step_s": meas_step,
           "diag_cost_s": cost, f"overhead_every_{every}_pct": 100 * cost / (every * plain_step),
           "overhead_measured_step_pct": 100 * cost / plain_step,
           "snapshot_bytes": param_bytes if snapshot_device is None else 0, "init_device": init_device,
           "keys": len(last), "host_syncs_in_before_after_step": len(syncs),
           "sync_sites": sorted({str(w.message)[:80] for w in syncs})[:3]}
    if dev.type == "cuda":
        out["device_name"] = torch.cuda.get_device_name(dev)
        out["peak_memory_gb"] = torch.cuda.max_memory_allocated(dev) / 1e9
    return out


class _count_syncs:
    """Collects CUDA sync warnings (torch.cuda.set_sync_debug_mode) raised inside the block."""

    def __init__(self, device, sink: list):
        self.device, self.sink = device, sink

    def __enter__(self):
        import warnings

        if self.device.type != "cuda":
            return self
        self._catch = warnings.catch_warnings(record=True)
        self._records = self._catch.__enter__()
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.set_sync_debug_mode("default")
            self._catch.__exit__(*exc)
            self.sink.extend(self._records)
        return False


def main() -> None:
    import argparse
    import json

    parser = argparse.ArgumentParser(description="overhead of the per-layer diagnostics")
    parser.add_argument("--flavor", default="tiny")
    parser.add_argument("--optimizer", default="adamw")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32",
                        help="parameter dtype: float32 (bf16 autocast on CUDA) or bfloat16")
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--every", type=int, default=100)
    parser.add_argument("--init-device", default="cpu")
    parser.add_argument("--snapshot-device", default=None)
    args = parser.parse_args()
    print(json.dumps(benchmark(args.flavor, args.optimizer, args.device, args.dtype, args.micro_batch, args.seq_len,
                               args.steps, args.every, None if args.init_device == "none" else args.init_device,
                               args.snapshot_device)))


if __name__ == "__main__":
    main()
