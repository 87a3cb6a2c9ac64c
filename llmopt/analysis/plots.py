"""Figures from runs' metrics (llmopt.analysis.runs.Run): the loss curves, the diagnostics figures like the
SGD-LL paper's (the diag/* keys of llmopt.metrics.diagnostics.keys), and the report's perplexity figures.

Every figure function returns None where no run has anything it draws: no empty figure is written.
"Per layer" lines: a block's value is the geometric mean over its matrices (q, k, v, o, gate, up, down), or one
kind; embedding, lm_head and final norm are lines of their own.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib import cm  # noqa: E402
from matplotlib.ticker import FormatStrFormatter, LogFormatterSciNotation  # noqa: E402

from llmopt.analysis.runs import Run  # noqa: E402
from llmopt.metrics.diagnostics import MATRIX_KINDS, keys  # noqa: E402

SPECIAL = {"embed": ("embedding", "black", "--"), "head": ("lm_head", "tab:red", "--"),
           "final_norm": ("final norm", "0.5", ":")}


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
        for r in run.metrics:
            if keys.per_tensor(ids[0], quantity) not in r:
                continue
            v = _geomean([r.get(keys.per_tensor(t, quantity)) for t in ids])
            if v is not None:
                xs.append(r["step"])
                ys.append(v)
        if xs:
            out[str(block)] = (xs, ys)
    for special in SPECIAL:
        if quantity in tensors.get(special, ()):
            xs, ys = run.series(keys.per_tensor(special, quantity))
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
    if not any(layer_series(r, quantity, kind) for r in runs):
        return None
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


def plot_loss(runs: list[Run]):
    """Training loss of every run on one plot, its evaluations as markers."""
    if not any(r.series("train/loss")[0] or r.series("eval/loss")[0] for r in runs):
        return None
    fig, ax = plt.subplots(figsize=(7.5, 4.5), layout="constrained")
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for k, run in enumerate(runs):
        color = colors[k % len(colors)]
        xs, ys = run.series("train/loss")
        if xs:
            ax.plot(xs, ys, color=color, lw=1.4, label=f"{run.label} train")
        ex, ey = run.series("eval/loss")
        if ex:
            ax.plot(ex, ey, "o--", color=color, ms=4, lw=0.8, label=f"{run.label} eval {ey[-1]:.3f}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("loss")
    return fig


def plot_update_rms(runs: list[Run], kind: str | None = None):
    return _layer_figure(runs, "update_rms", "update RMS  ||w_{t+1} - w_t|| / sqrt(n)", "update RMS", kind)


def plot_weight_grad_ratio(runs: list[Run], kind: str | None = None):
    if not any(layer_series(r, "w_over_g", kind) for r in runs):
        return None
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
    rec = next((r for r in reversed(run.metrics) if keys.DIST_INIT in r), None)
    if rec is None:
        return [], []
    num: dict[str, float] = {}
    den: dict[str, float] = {}
    for tid, qs in run.tensors().items():
        if "dist_init" not in qs:
            continue
        d, rel = rec.get(keys.per_tensor(tid, "dist_init")), rec.get(keys.per_tensor(tid, "dist_init_rel"))
        if d is None or rel is None or not rel > 0:
            continue
        layer = tid.split("/")[0]
        num[layer] = num.get(layer, 0.0) + d * d
        den[layer] = den.get(layer, 0.0) + (d / rel) ** 2
    order = (["embed"] if "embed" in num else []) + [str(b) for b in run.blocks() if str(b) in num] + \
        [s for s in ("final_norm", "head") if s in num]
    return order, [math.sqrt(num[k] / den[k]) for k in order]


def plot_distance(runs: list[Run]):
    if not any(r.series(keys.DIST_INIT)[0] for r in runs):
        return None
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.3), layout="constrained")
    for run in runs:
        xs, ys = run.series(keys.DIST_INIT)
        if xs:
            axes[0].plot(xs, ys, lw=1.4, label=run.label)
        xs, ys = run.series(keys.DIST_INIT_REL)
        if xs:
            axes[1].plot(xs, ys, lw=1.4, label=run.label)
        names, rel = _layer_distance(run)
        if names:
            axes[2].plot(range(len(names)), rel, "o-", ms=3, lw=1.2, label=run.label)
            axes[2].set_xticks(range(len(names)))
            step = max(1, len(names) // 16)
            axes[2].set_xticklabels([n if i % step == 0 or not n.isdigit() else "" for i, n in enumerate(names)],
                                    rotation=60, fontsize=7)
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


TOKEN_GRAD_LINES = (("q50", "median", "tab:blue"), ("q90", "q90", "tab:green"), ("q99", "q99", "tab:orange"),
                    ("max", "max", "tab:red"))


def plot_token_grad_norms(runs: list[Run]):
    if not any(run.series(keys.token_grad_norm(name))[0] for run in runs for name, _, _ in TOKEN_GRAD_LINES):
        return None
    n = len(runs) + 1
    ncols = min(n, 3)
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.0 * ncols, 3.6 * nrows), squeeze=False, layout="constrained")
    for k, run in enumerate(runs):
        ax = axes[k // ncols][k % ncols]
        drawn = False
        for key, label, color in TOKEN_GRAD_LINES:
            xs, ys = run.series(keys.token_grad_norm(key))
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
        xs, ys = run.series(keys.TOKEN_GRAD_NORM_MAX_OVER_MEDIAN)
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
    with_data = [r for r in runs if any(k.startswith(keys.eff_lr("median", "")) for k in r.keys())]
    if not with_data:
        return None
    fig, axes, ncols = _grid(len(with_data))
    cmap = cm.viridis
    for k, run in enumerate(with_data):
        ax = axes[k // ncols][k % ncols]
        layers = sorted({key.rsplit("/", 1)[1] for key in run.keys() if key.startswith(keys.eff_lr("median", ""))},
                        key=lambda s: (not s.isdigit(), int(s) if s.isdigit() else 0, s))
        n_blocks = sum(s.isdigit() for s in layers)
        for layer in layers:
            xs, med = run.series(keys.eff_lr("median", layer))
            _, lo = run.series(keys.eff_lr("q10", layer))
            _, hi = run.series(keys.eff_lr("q90", layer))
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
    with_data = [r for r in runs if any(k.startswith(keys.SGD_LL_PREFIX) for k in r.keys())]
    if not with_data:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(12, 4), layout="constrained")
    for run in with_data:
        xs, ys = run.series(keys.RMS_CLIP_FRACTION_LAYERS)
        if xs:
            line, = axes[0].plot(xs, ys, lw=1.6, label=f"{run.label}: all")
            styles = ("--", ":", "-.", (0, (5, 1, 1, 1, 1, 1)))
            for style, role in zip(styles, ("matrix", "embedding", "output", "vector")):
                rx, ry = run.series(keys.rms_clip_fraction(role))
                if rx:
                    axes[0].plot(rx, ry, linestyle=style, color=line.get_color(), lw=1.0, label=f"{run.label}: {role}")
        xs, ys = run.series(keys.ROW_CLIP_FRACTION)
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




def plot_eval_ppl(runs: list[Run], published: dict):
    """Validation perplexity against step (exact solid, paper-compatible dashed), published figures as stars;
    `published` maps each run's name to its published figure, where it is compared."""
    if not any(r.series("eval/ppl")[0] for r in runs):
        return None
    fig, ax = plt.subplots(figsize=(8, 5))
    for run in runs:
        steps, values = run.series("eval/ppl")
        if not steps:
            continue
        (line,) = ax.plot(steps, values, marker="o", markersize=3, label=f"{run.name} (exact)")
        paper_steps, paper_values = run.series("eval/paper_ppl")
        if paper_steps:
            ax.plot(paper_steps, paper_values, linestyle="--", color=line.get_color(), linewidth=0.8)
        pub = published.get(run.name)
        if pub is not None:
            ax.plot([pub.step or run.step or steps[-1]], [pub.ppl], marker="*", markersize=12,
                    color=line.get_color(), linestyle="none")
    ax.set(xlabel="step", ylabel="validation perplexity", title="Validation perplexity "
           "(solid: exact, dashed: paper-compatible, star: published)")
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax.yaxis.set_minor_formatter(FormatStrFormatter("%g"))
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_memory_ppl(points: list[tuple[str, float, float, float | None, float | None]]):
    """Perplexity against the paper-accounting memory: (name, memory GB, ppl, published GB, published ppl) per
    run, the published point as a star of the same colour."""
    if not points:
        return None
    fig, ax = plt.subplots(figsize=(6, 5))
    for name, memory_gb, ppl, published_gb, published_ppl in points:
        (dot,) = ax.plot([memory_gb], [ppl], marker="o", linestyle="none", label=name)
        if published_gb is not None and published_ppl is not None:
            ax.plot([published_gb], [published_ppl], marker="*", markersize=12, linestyle="none",
                    color=dot.get_color())
    ax.set(xlabel="weights + optimizer state, GB (paper accounting)", ylabel="perplexity",
           title="Perplexity vs memory (star: published)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


# name -> (the figure, what a run must have logged for it to be drawn)
FIGURES = {
    "loss.png": (lambda runs, kind: plot_loss(runs), "train/loss or eval/loss"),
    "update_rms.png": (plot_update_rms, keys.per_tensor("<tensor>", "update_rms")),
    "weight_grad_ratio.png": (plot_weight_grad_ratio, keys.per_tensor("<tensor>", "w_over_g")),
    "distance_from_init.png": (lambda runs, kind: plot_distance(runs), keys.DIST_INIT),
    "token_grad_norms.png": (lambda runs, kind: plot_token_grad_norms(runs), keys.token_grad_norm("*")),
    "eff_lr.png": (lambda runs, kind: plot_eff_lr(runs), keys.eff_lr("median", "<layer>")),
    "sgd_ll_clips.png": (lambda runs, kind: plot_sgd_ll_clips(runs), keys.SGD_LL_PREFIX + "*"),
}


def make_figures(runs: list[Run], kind: str | None = None) -> tuple[dict, dict[str, str]]:
    """The figures with something to draw, and for each one left out the reason."""
    figures, left_out = {}, {}
    for name, (draw, needs) in FIGURES.items():
        fig = draw(runs, kind)
        if fig is None:
            left_out[name] = f"no run has {needs}"
        else:
            figures[name] = fig
    return figures, left_out


def save(fig, path: str | Path, dpi: int = 120) -> Path:
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return Path(path)
