#!/usr/bin/env python
"""Figures like the SGD-LL paper's from one or several runs' metrics.

    python scripts/plot_runs.py RUN_DIR [RUN_DIR ...] --out DIR [--kind q] [--dpi 120]

Each RUN_DIR holds `metrics.jsonl` or `metrics.jsonl.gz` (one JSON object per logged step: "step",
"train/loss", "eval/loss", the diag/* keys of llmopt.metrics.diagnostics) and `config.yaml` (labels:
optimizer.name, lookahead.name, model.flavor). Writes into DIR:

  loss.png                training loss of every run on one plot (eval loss as markers)
  update_rms.png          per-layer update RMS over time, one panel per run
  weight_grad_ratio.png   ||w|| / ||g|| per layer over time (and ||w|| / ||m|| where a momentum exists)
  distance_from_init.png  ||w_t - w_0|| and its relative value over time, and per layer at the end
  token_grad_norms.png    quantiles of the lm_head's per-token-class gradient norms, and max / median
  eff_lr.png              Adam's per-layer effective lr (median, q10-q90 band), when a run has it
  sgd_ll_clips.png        SGD-LL's clip fractions, when a run has them

"Per layer" lines: a block's value is the geometric mean over its matrices (q, k, v, o, gate, up, down),
or one kind with --kind; embedding, lm_head and final norm are lines of their own.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import LogFormatterSciNotation  # noqa: E402


def log_y(ax) -> None:
    """Log y axis whose minor ticks are labelled too: curves spanning less than a decade keep readable values."""
    ax.set_yscale("log")
    ax.yaxis.set_minor_formatter(LogFormatterSciNotation(labelOnlyBase=False, minor_thresholds=(2, 0.4)))


def log_panel(ax, title: str, ylabel: str | None = None, legend_cols: int = 1) -> None:
    """The finish every per-step log panel shares: log y, title, step axis, grid, legend."""
    log_y(ax)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("step")
    if ylabel:
        ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, ncol=legend_cols)
from matplotlib import cm  # noqa: E402

from llmopt.metrics.loggers import read_metrics  # noqa: E402

QUANTITIES = ("update_rms", "weight_rms", "grad_rms", "w_over_g", "w_over_m", "dist_init", "dist_init_rel")
MATRIX_KINDS = ("q", "k", "v", "o", "gate", "up", "down")
SPECIAL = {"embed": ("embedding", "black", "--"), "head": ("lm_head", "tab:red", "--"),
           "final_norm": ("final norm", "0.5", ":")}
FIGURES = ("loss.png", "update_rms.png", "weight_grad_ratio.png", "distance_from_init.png", "token_grad_norms.png")


@dataclass
class Run:
    path: Path
    label: str
    records: list[dict] = field(default_factory=list)

    def series(self, key: str) -> tuple[list[int], list[float]]:
        xs, ys = [], []
        for r in self.records:
            v = r.get(key)
            if isinstance(v, (int, float)) and math.isfinite(v):
                xs.append(r["step"])
                ys.append(float(v))
        return xs, ys

    def keys(self) -> set[str]:
        return {k for r in self.records for k in r}

    def tensors(self) -> dict[str, set[str]]:
        """tensor id ("3/q", "embed", ...) -> the per-tensor quantities logged for it."""
        out: dict[str, set[str]] = {}
        for key in self.keys():
            parts = key.split("/")
            if len(parts) >= 3 and parts[0] == "diag" and parts[-1] in QUANTITIES and parts[1] != "global":
                out.setdefault("/".join(parts[1:-1]), set()).add(parts[-1])
        return out

    def blocks(self) -> list[int]:
        return sorted({int(t.split("/")[0]) for t in self.tensors() if t.split("/")[0].isdigit()})


def _read_yaml(path: Path) -> dict:
    try:
        import yaml

        return yaml.safe_load(path.read_text()) or {}
    except Exception:  # a missing or unreadable config only costs the label
        return {}


def load_run(path: str | Path) -> Run:
    path = Path(path)
    metrics = path / "metrics.jsonl"
    if not metrics.is_file() and (path / "metrics.jsonl.gz").is_file():   # as archived runs keep it
        metrics = path / "metrics.jsonl.gz"
    if not metrics.is_file():
        raise FileNotFoundError(f"{metrics} not found: give run directories (holding metrics.jsonl)")
    records = sorted((r for r in read_metrics(metrics) if "step" in r), key=lambda r: r["step"])
    cfg = _read_yaml(path / "config.yaml")
    opt = (cfg.get("optimizer") or {}).get("name")
    lookahead = (cfg.get("lookahead") or {}).get("name")
    flavor = (cfg.get("model") or {}).get("flavor")
    if opt:
        label = opt + (f"+{lookahead}" if lookahead and lookahead != "none" else "")
        label += f" ({flavor})" if flavor else ""
    else:
        label = path.name
    return Run(path, label, records)


def load_runs(paths) -> list[Run]:
    runs = [load_run(p) for p in paths]
    counts: dict[str, int] = {}
    for r in runs:
        counts[r.label] = counts.get(r.label, 0) + 1
    for r in runs:   # same optimizer twice: tell them apart by directory
        if counts[r.label] > 1:
            r.label = f"{r.label} [{r.path.name}]"
    return runs


# -- helpers ----------------------------------------------------------------------------------------
def _geomean(values: list[float]) -> float | None:
    vals = [v for v in values if v is not None and math.isfinite(v) and v > 0]
    if not vals or len(vals) < len(values):
        return None
    return math.exp(sum(math.log(v) for v in vals) / len(vals))


def layer_series(run: Run, quantity: str, kind: str | None = None) -> dict[str, tuple[list, list]]:
    """layer ("0".., "embed", "head", "final_norm") -> (steps, values) of a per-tensor quantity."""
    tensors = run.tensors()
    out = {}
    for block in run.blocks():
        kinds = [kind] if kind else MATRIX_KINDS
        ids = [f"{block}/{k}" for k in kinds if quantity in tensors.get(f"{block}/{k}", ())]
        if not ids:
            continue
        xs, ys = [], []
        for r in run.records:
            if f"diag/{ids[0]}/{quantity}" not in r:
                continue
            v = _geomean([r.get(f"diag/{t}/{quantity}") for t in ids])
            if v is not None:
                xs.append(r["step"])
                ys.append(v)
        if xs:
            out[str(block)] = (xs, ys)
    for special in SPECIAL:
        if quantity in tensors.get(special, ()):
            xs, ys = run.series(f"diag/{special}/{quantity}")
            if xs:
                out[special] = (xs, ys)
    return out


def _grid(n: int, width: float = 5.0, height: float = 3.6, rows_per_run: int = 1, sharey=True):
    ncols = min(n, 3)
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows * rows_per_run, ncols, figsize=(width * ncols, height * nrows * rows_per_run),
                             squeeze=False, sharey=sharey, layout="constrained")
    return fig, axes, ncols


def _hide_unused(axes, used: int) -> None:
    """A grid has room for a multiple of its columns; the panels after the first `used` stay blank."""
    for k in range(used, axes.size):
        axes.flat[k].set_visible(False)


def _no_data(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, fontsize=9, color="0.4")
    ax.set_xticks([])
    ax.set_yticks([])


def _plot_layers(ax, series: dict, n_blocks: int, cmap) -> None:
    for layer, (xs, ys) in series.items():
        if layer in SPECIAL:
            name, color, style = SPECIAL[layer]
            ax.plot(xs, ys, style, color=color, lw=1.6, label=name)
        else:
            i = int(layer)
            ax.plot(xs, ys, color=cmap(i / max(n_blocks - 1, 1)), lw=1.3,
                    label=f"block {i}" if n_blocks <= 8 else None)


def _layer_figure(runs: list[Run], quantity: str, title: str, ylabel: str, kind: str | None):
    fig, axes, ncols = _grid(len(runs))
    cmap = cm.viridis
    max_blocks = max((len(r.blocks()) for r in runs), default=0)
    for k, run in enumerate(runs):
        ax = axes[k // ncols][k % ncols]
        series = layer_series(run, quantity, kind)
        if not series:
            _no_data(ax, f"{run.label}\nno diag/*/{quantity}")
            continue
        _plot_layers(ax, series, len(run.blocks()), cmap)
        log_panel(ax, run.label, ylabel if k % ncols == 0 else None, legend_cols=2)
    _hide_unused(axes, len(runs))
    if max_blocks > 8:
        sm = cm.ScalarMappable(cmap=cmap, norm=matplotlib.colors.Normalize(0, max_blocks - 1))
        fig.colorbar(sm, ax=axes.ravel().tolist(), label="block index", shrink=0.8)
    what = f"kind {kind}" if kind else "blocks: geometric mean over q,k,v,o,gate,up,down"
    fig.suptitle(f"{title}  ({what})", fontsize=11)
    return fig


# -- the figures -----------------------------------------------------------------------------------
def plot_loss(runs: list[Run]):
    fig, ax = plt.subplots(figsize=(7.5, 4.5), layout="constrained")
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    lows = []
    for k, run in enumerate(runs):
        color = colors[k % len(colors)]
        xs, ys = run.series("train/loss")
        if xs:
            ax.plot(xs, ys, color=color, lw=1.4, label=f"{run.label} train")
            lows.append(min(ys))
        ex, ey = run.series("eval/loss")
        if ex:
            ax.plot(ex, ey, "o--", color=color, ms=4, lw=0.8, label=f"{run.label} eval {ey[-1]:.3f}")
            lows.append(min(ey))
    if not lows:
        _no_data(ax, "no train/loss or eval/loss in these runs")
    else:
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    ax.set_title("loss")
    return fig


def plot_update_rms(runs: list[Run], kind: str | None = None):
    return _layer_figure(runs, "update_rms", "update RMS  ||w_{t+1} - w_t|| / sqrt(n)", "update RMS", kind)


def plot_weight_grad_ratio(runs: list[Run], kind: str | None = None):
    has_m = any(layer_series(r, "w_over_m", kind) for r in runs)
    rows = 2 if has_m else 1
    ncols = min(len(runs), 3)
    nrun_rows = math.ceil(len(runs) / ncols)
    fig, axes = plt.subplots(rows * nrun_rows, ncols, figsize=(5.0 * ncols, 3.6 * rows * nrun_rows),
                             squeeze=False, sharey="row", layout="constrained")
    cmap = cm.viridis
    for k, run in enumerate(runs):
        r0, c = (k // ncols) * rows, k % ncols
        for j, (quantity, ylabel) in enumerate((("w_over_g", "||w|| / ||g||"), ("w_over_m", "||w|| / ||m||"))[:rows]):
            ax = axes[r0 + j][c]
            series = layer_series(run, quantity, kind)
            if not series:
                _no_data(ax, f"{run.label}\nno momentum" if quantity == "w_over_m" else f"{run.label}\nno data")
                continue
            _plot_layers(ax, series, len(run.blocks()), cmap)
            log_panel(ax, f"{run.label}: {ylabel}", ylabel, legend_cols=2)
    for k in range(len(runs), nrun_rows * ncols):
        for j in range(rows):
            axes[(k // ncols) * rows + j][k % ncols].set_visible(False)
    what = f"kind {kind}" if kind else "blocks: geometric mean over matrices"
    fig.suptitle(f"weight-to-gradient (and -momentum) norm ratios per layer  ({what})", fontsize=11)
    return fig


def _layer_distance(run: Run) -> tuple[list[str], list[float]]:
    """At the last record with distances: ||w - w0|| / ||w0|| per layer (exact, from the per-tensor
    absolute and relative distances)."""
    rec = next((r for r in reversed(run.records) if "diag/global/dist_init" in r), None)
    if rec is None:
        return [], []
    num: dict[str, float] = {}
    den: dict[str, float] = {}
    for tid, qs in run.tensors().items():
        if "dist_init" not in qs:
            continue
        d, rel = rec.get(f"diag/{tid}/dist_init"), rec.get(f"diag/{tid}/dist_init_rel")
        if d is None or rel is None or not rel > 0:
            continue
        layer = tid.split("/")[0]
        num[layer] = num.get(layer, 0.0) + d * d
        den[layer] = den.get(layer, 0.0) + (d / rel) ** 2
    order = (["embed"] if "embed" in num else []) + [str(b) for b in run.blocks() if str(b) in num] + \
        [s for s in ("final_norm", "head") if s in num]
    return order, [math.sqrt(num[k] / den[k]) for k in order]


def plot_distance(runs: list[Run]):
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.3), layout="constrained")
    any_data = False
    for run in runs:
        xs, ys = run.series("diag/global/dist_init")
        if xs:
            any_data = True
            axes[0].plot(xs, ys, lw=1.4, label=run.label)
        xs, ys = run.series("diag/global/dist_init_rel")
        if xs:
            axes[1].plot(xs, ys, lw=1.4, label=run.label)
        names, rel = _layer_distance(run)
        if names:
            axes[2].plot(range(len(names)), rel, "o-", ms=3, lw=1.2, label=run.label)
            axes[2].set_xticks(range(len(names)))
            step = max(1, len(names) // 16)
            axes[2].set_xticklabels([n if i % step == 0 or not n.isdigit() else "" for i, n in enumerate(names)],
                                    rotation=60, fontsize=7)
    if not any_data:
        for ax in axes:
            _no_data(ax, "no diag/global/dist_init (diagnostics off, or init_device none)")
    else:
        for ax, title, ylabel in ((axes[0], "||w_t - w_0||  (all parameters)", "distance"),
                                  (axes[1], "||w_t - w_0|| / ||w_0||", "relative distance"),
                                  (axes[2], "per layer, last record: ||w - w_0|| / ||w_0||", "relative distance")):
            ax.set_title(title, fontsize=10)
            ax.set_ylabel(ylabel)
            log_y(ax)
            ax.grid(alpha=0.3, which="both")
            ax.legend(fontsize=8)
        axes[0].set_xlabel("step")
        axes[1].set_xlabel("step")
        axes[2].set_xlabel("layer")
    fig.suptitle("distance from initialization", fontsize=11)
    return fig


def plot_token_grad_norms(runs: list[Run]):
    n = len(runs) + 1
    ncols = min(n, 3)
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.0 * ncols, 3.6 * nrows), squeeze=False, layout="constrained")
    lines = (("q50", "median", "tab:blue"), ("q90", "q90", "tab:green"), ("q99", "q99", "tab:orange"),
             ("max", "max", "tab:red"))
    for k, run in enumerate(runs):
        ax = axes[k // ncols][k % ncols]
        drawn = False
        for key, label, color in lines:
            xs, ys = run.series(f"diag/head/token_grad_norm_{key}")
            if xs:
                ax.plot(xs, ys, color=color, lw=1.3, label=label)
                drawn = True
        if not drawn:
            _no_data(ax, f"{run.label}\nno diag/head/token_grad_norm_*")
            continue
        log_panel(ax, run.label, "||grad of lm_head row||")
    ax = axes[len(runs) // ncols][len(runs) % ncols]
    drawn = False
    for run in runs:
        xs, ys = run.series("diag/head/token_grad_norm_max_over_median")
        if xs:
            ax.plot(xs, ys, lw=1.3, label=run.label)
            drawn = True
    if drawn:
        log_panel(ax, "max / median over token classes")
    else:
        _no_data(ax, "no max/median data")
    _hide_unused(axes, n)
    fig.suptitle("per-token-class gradient norms of the output layer (Type II irregularity)", fontsize=11)
    return fig


def plot_eff_lr(runs: list[Run]):
    with_data = [r for r in runs if any(k.startswith("diag/adam/eff_lr_median/") for k in r.keys())]
    if not with_data:
        return None
    fig, axes, ncols = _grid(len(with_data))
    cmap = cm.viridis
    for k, run in enumerate(with_data):
        ax = axes[k // ncols][k % ncols]
        layers = sorted({key.rsplit("/", 1)[1] for key in run.keys() if key.startswith("diag/adam/eff_lr_median/")},
                        key=lambda s: (not s.isdigit(), int(s) if s.isdigit() else 0, s))
        n_blocks = sum(s.isdigit() for s in layers)
        for layer in layers:
            xs, med = run.series(f"diag/adam/eff_lr_median/{layer}")
            _, lo = run.series(f"diag/adam/eff_lr_q10/{layer}")
            _, hi = run.series(f"diag/adam/eff_lr_q90/{layer}")
            if layer in SPECIAL:
                name, color, style = SPECIAL[layer]
            else:
                name, color, style = (f"block {layer}" if layer.isdigit() else layer,
                                      cmap(int(layer) / max(n_blocks - 1, 1)) if layer.isdigit() else "tab:purple", "-")
            ax.plot(xs, med, style, color=color, lw=1.3, label=name if (n_blocks <= 8 or layer in SPECIAL) else None)
            if len(lo) == len(xs) == len(hi):
                ax.fill_between(xs, lo, hi, color=color, alpha=0.12)
        log_panel(ax, run.label, "lr / (sqrt(v_hat) + eps)", legend_cols=2)
    _hide_unused(axes, len(with_data))
    fig.suptitle("Adam effective learning rate per layer (median; band q10-q90)", fontsize=11)
    return fig


def plot_sgd_ll_clips(runs: list[Run]):
    with_data = [r for r in runs if any(k.startswith("diag/sgd_ll/") for k in r.keys())]
    if not with_data:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(12, 4), layout="constrained")
    for run in with_data:
        xs, ys = run.series("diag/sgd_ll/rms_clip_fraction_layers")
        if xs:
            line, = axes[0].plot(xs, ys, lw=1.6, label=f"{run.label}: all")
            styles = ("--", ":", "-.", (0, (5, 1, 1, 1, 1, 1)))
            for style, role in zip(styles, ("matrix", "embedding", "output", "vector")):
                rx, ry = run.series(f"diag/sgd_ll/rms_clip_fraction/{role}")
                if rx:
                    axes[0].plot(rx, ry, linestyle=style, color=line.get_color(), lw=1.0, label=f"{run.label}: {role}")
        xs, ys = run.series("diag/sgd_ll/row_clip_fraction")
        if xs:
            axes[1].plot(xs, ys, lw=1.4, label=run.label)
    axes[0].set_title("share of tensors whose update-RMS clip fired", fontsize=10)
    axes[1].set_title("share of lm_head rows (token classes) clipped", fontsize=10)
    for ax in axes:
        ax.set_xlabel("step")
        ax.set_ylim(-0.03, 1.03)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("SGD-LL clips", fontsize=11)
    return fig


def make_figures(runs: list[Run], kind: str | None = None) -> dict:
    figs = {"loss.png": plot_loss(runs), "update_rms.png": plot_update_rms(runs, kind),
            "weight_grad_ratio.png": plot_weight_grad_ratio(runs, kind), "distance_from_init.png": plot_distance(runs),
            "token_grad_norms.png": plot_token_grad_norms(runs)}
    for name, fig in (("eff_lr.png", plot_eff_lr(runs)), ("sgd_ll_clips.png", plot_sgd_ll_clips(runs))):
        if fig is not None:
            figs[name] = fig
    return figs


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="run directories (each with metrics.jsonl and config.yaml)")
    parser.add_argument("--out", required=True, help="directory for the PNG files")
    parser.add_argument("--kind", choices=MATRIX_KINDS + ("attn_norm", "mlp_norm"), default=None,
                        help="per-layer lines of one tensor kind instead of the geometric mean over matrices")
    parser.add_argument("--dpi", type=int, default=120)
    args = parser.parse_args(argv)
    runs = load_runs(args.runs)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, fig in make_figures(runs, args.kind).items():
        fig.savefig(out / name, dpi=args.dpi, bbox_inches="tight")
        plt.close(fig)
        print(out / name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
