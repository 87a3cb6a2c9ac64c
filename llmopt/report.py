"""Compare finished runs with the papers: `python -m llmopt.report RUN_DIR... [--out report.md] [--plots DIR]`.

Input: run directories (each with config.yaml, summary.json, metrics.jsonl, as llmopt.train writes them; a
directory that holds run directories, such as a multirun sweep directory, is searched), or a W&B group
(`--wandb-group GROUP --wandb-project ENTITY/PROJECT`, through the W&B API).

Output: Markdown with, for every table that has runs, the papers' layout (method x model size; our
perplexity and the published one, with memory in GB), then one line per run:

  run | table/row | steps | exact ppl | paper-compatible ppl | published ppl | delta | memory paper GB |
  memory llmopt GB | published GB | measured state MB | token slots/s

* exact ppl: exp of the token-weighted validation loss; paper-compatible ppl: the reference code's
  figure, (sum of per-batch mean losses) / (batches + 1) (protocol.md section 1). The published
  GaLore-protocol tables (SCALE headline, SCALE ablation) were measured the paper-compatible way, the
  SGD-LL table token-weighted; "delta" is ours minus published, in the table's own measure.
* memory paper GB: weights + optimizer state, bf16, 1 GB = 1e9 B (llmopt.accounting); memory llmopt GB:
  the same units for the states llmopt's optimizer holds (Muon: AdamW's two moments on the embedding,
  lm_head and norms, where the paper counts one state per parameter); measured state
  MB: the bytes of optimizer state the run actually held; token slots/s: the median of
  perf/token_slots_per_s over the logged steps (slots count padding).
* table / row / size come from the run's W&B tags (table:..., row:..., size:..., as the experiment
  configs set them), else from its W&B group, optimizer and model flavor.

Plots (`--plots DIR`, matplotlib Agg): loss.png (training loss of every run), eval_ppl.png (validation
perplexity against step, published final figures as stars), memory_ppl.png (perplexity against the
paper-accounting memory, ours and published).

The published numbers below are copied from /work/shared/docs/protocol.md (the papers' tables).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from llmopt.metrics.loggers import read_metrics

# ---------------------------------------------------------------------------------------------------
# Published numbers (protocol.md). measure: which of our two perplexities the paper's figure matches.


@dataclass(frozen=True)
class Published:
    ppl: float
    memory_gb: float | None = None
    loss: float | None = None
    step: int | None = None          # the step of the figure, where a paper gives several


TABLES = {
    "scale_table": {"title": "SCALE headline table (arXiv 2506.16659), C4 perplexity",
                    "measure": "paper", "sizes": ["60m", "130m", "350m", "1b", "7b"],
                    "rows": ["adam", "stable_spam", "muon", "galore", "fira", "swan", "apollo", "apollo_mini",
                             "scale"]},
    "scale_ablation": {"title": "SCALE normalization ablation (arXiv 2506.16659), C4 perplexity",
                       "measure": "paper", "sizes": ["60m", "130m", "350m"],
                       "rows": ["sign", "row", "spectral", "column", "column_momentum", "spectral_momentum",
                                "sign_momentum", "row_momentum"]},
    "sgd_ll_table": {"title": "SGD-LL table (arXiv 2605.17787), C4 perplexity (token-weighted)",
                     "measure": "exact", "sizes": ["130m", "350m", "1b"], "rows": ["adam", "sgd", "sgd_ll"]},
    "ema_nesterov": {"title": "EMA-Nesterov runs (arXiv 2605.25395), C4 perplexity (token-weighted)",
                     "measure": "exact", "sizes": ["60m", "130m", "350m", "1b"], "rows": []},
}


def _headline() -> dict[tuple[str, str, str], Published]:
    sizes = ["60m", "130m", "350m", "1b"]
    ppl = {"adam": [30.05, 23.13, 18.77, 16.52], "stable_spam": [28.77, 22.20, 16.80, 13.97],
           "muon": [28.86, 22.20, 16.70, 14.18], "galore": [34.58, 25.31, 19.37, 15.57],
           "fira": [30.34, 22.96, 16.82, 15.10], "swan": [30.00, 22.83, 17.14, 14.42],
           "apollo": [30.94, 22.93, 16.75, 14.20], "apollo_mini": [31.85, 23.63, 17.11, 14.13],
           "scale": [30.81, 22.57, 16.32, 14.25]}
    memory = {"adam": [0.35, 0.81, 2.21, 8.04], "muon": [0.23, 0.54, 1.47, 5.36], "scale": [0.15, 0.32, 0.80, 2.81]}
    out = {}
    for row, values in ppl.items():
        for i, size in enumerate(sizes):
            out[("scale_table", row, size)] = Published(values[i], memory[row][i] if row in memory else None)
    return out


# 7B: perplexity at 40K / 80K / 120K / 150K steps, and memory
PUBLISHED_7B = {"scale": ([17.99, 14.57, 12.86, 12.59], 13.74), "apollo": ([17.55, 14.39, 13.23, 13.02], 16.14),
                "apollo_mini": ([18.03, 14.60, 13.32, 13.09], 14.53), "muon": ([16.43, 13.95, 12.85, 12.72], 26.95)}
STEPS_7B = [40000, 80000, 120000, 150000]

# the ICML version's 1B figures, where they differ (--published icml)
PUBLISHED_ICML_1B = {"adam": 15.79, "muon": 13.67, "scale": 13.49}

ABLATION = {"sign": [54.36, 40.42, 27.95], "row": [79.27, 37.67, 21.63], "spectral": [34.15, 25.25, 18.73],
            "column": [39.89, 28.85, 20.38], "column_momentum": [30.81, 22.57, 16.32],
            "spectral_momentum": [31.20, 22.33, 16.67]}

SGD_LL = {"adam": [(3.11, 22.46), (2.78, 16.09), (2.51, 12.32)], "sgd": [(5.07, 158.90), (4.14, 63.22), (3.95, 51.87)],
          "sgd_ll": [(3.24, 25.70), (2.87, 17.35), (2.60, 13.47)]}


def published_numbers(version: str = "arxiv") -> dict[tuple[str, str, str], Published | dict[int, Published]]:
    """(table, row, size) -> Published; the 7B entries map step -> Published."""
    if version not in ("arxiv", "icml"):
        raise ValueError(f"published version must be arxiv or icml, got {version!r}")
    out: dict = _headline()
    if version == "icml":
        for row, value in PUBLISHED_ICML_1B.items():
            old = out[("scale_table", row, "1b")]
            out[("scale_table", row, "1b")] = Published(value, old.memory_gb)
    for row, (curve, memory) in PUBLISHED_7B.items():
        out[("scale_table", row, "7b")] = {s: Published(p, memory, step=s) for s, p in zip(STEPS_7B, curve)}
    for row, values in ABLATION.items():
        for size, value in zip(["60m", "130m", "350m"], values):
            out[("scale_ablation", row, size)] = Published(value)
    for row, values in SGD_LL.items():
        for size, (loss, ppl) in zip(["130m", "350m", "1b"], values):
            out[("sgd_ll_table", row, size)] = Published(ppl, loss=loss)
    return out


def lookup_published(published: dict, table: str, row: str, size: str, step: int | None) -> Published | None:
    """The published figure of a table cell; for a curve (7B), the last published step <= `step`."""
    entry = published.get((table, row, size))
    if not isinstance(entry, dict):
        return entry
    if step is None:
        return entry[max(entry)]
    reached = [s for s in entry if s <= step]
    return entry[max(reached)] if reached else None


# ---------------------------------------------------------------------------------------------------
# Runs


@dataclass
class Run:
    source: str                      # run directory or W&B run path
    config: dict
    summary: dict
    metrics: list[dict] = field(default_factory=list)
    label: str | None = None         # set where two runs share a run_name: the directory (or W&B) name

    @property
    def tags(self) -> dict[str, str]:
        tags = ((self.config.get("logger") or {}).get("wandb") or {}).get("tags") or []
        return dict(t.split(":", 1) for t in tags if isinstance(t, str) and ":" in t)

    @property
    def name(self) -> str:
        return self.label or str(self.config.get("run_name") or Path(self.source).name)

    @property
    def table(self) -> str:
        group = ((self.config.get("logger") or {}).get("wandb") or {}).get("group")
        return self.tags.get("table") or group or "-"

    @property
    def row(self) -> str:
        if "row" in self.tags:
            return self.tags["row"]
        optimizer = (self.config.get("optimizer") or {}).get("name") or self.summary.get("optimizer") or "?"
        lookahead = (self.config.get("lookahead") or {}).get("name", "none")
        return optimizer if lookahead in (None, "none") else f"{optimizer}+{lookahead}"

    @property
    def size(self) -> str:
        return self.tags.get("size") or (self.config.get("model") or {}).get("flavor") or \
            self.summary.get("flavor") or "?"

    @property
    def step(self) -> int | None:
        return self.summary.get("step")

    def series(self, key: str) -> tuple[list[int], list[float]]:
        points = [(m["step"], m[key]) for m in self.metrics if m.get(key) is not None and "step" in m]
        return [p[0] for p in points], [float(p[1]) for p in points]

    @property
    def token_slots_per_s(self) -> float | None:
        _, values = self.series("perf/token_slots_per_s")
        return statistics.median(values) if values else None


def disambiguate(runs: list[Run]) -> list[Run]:
    """Runs that share a run_name are shown under their directory names (with the parent's, if need be)."""
    names = [r.name for r in runs]
    clashing = [r for r in runs if names.count(r.name) > 1 and r.label is None]
    dirs = [Path(r.source).name for r in clashing]
    for run, directory in zip(clashing, dirs):
        path = Path(run.source)
        run.label = directory if dirs.count(directory) == 1 else f"{path.parent.name}/{directory}"
    return runs


def _summary_from_metrics(metrics: list[dict]) -> dict:
    """What summary.json would hold, from the logged steps (a run still going, or stopped early)."""
    summary: dict = {}
    for record in metrics:
        summary.update({k: v for k, v in record.items() if k.startswith(("eval/", "memory/", "model/"))})
        summary["step"] = record.get("step", summary.get("step"))
    return summary


def is_run_dir(path: Path) -> bool:
    return (path / "config.yaml").is_file() and ((path / "summary.json").is_file() or
                                                  (path / "metrics.jsonl").is_file())


def find_run_dirs(paths: list[str | Path]) -> list[Path]:
    """The run directories among `paths`, searching directories that hold run directories."""
    found: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if not path.is_dir():
            raise FileNotFoundError(f"{path} is not a directory")
        if is_run_dir(path):
            found.append(path)
            continue
        inside = sorted(p.parent for p in path.rglob("config.yaml") if is_run_dir(p.parent))
        if not inside:
            raise FileNotFoundError(f"{path} holds no run directory (config.yaml with summary.json or "
                                    "metrics.jsonl)")
        found.extend(inside)
    return found


def load_run_dir(path: str | Path) -> Run:
    path = Path(path)
    config = yaml.safe_load((path / "config.yaml").read_text()) or {}
    metrics = read_metrics(path / "metrics.jsonl") if (path / "metrics.jsonl").is_file() else []
    if (path / "summary.json").is_file():
        summary = json.loads((path / "summary.json").read_text())
    else:
        summary = _summary_from_metrics(metrics)
    return Run(str(path), config, summary, metrics)


def load_wandb_group(group: str, project: str) -> list[Run]:
    """Every run of a W&B group (`project` = "entity/project"), through the W&B API (needs network)."""
    import wandb

    runs = []
    for remote in wandb.Api().runs(project, filters={"group": group}):
        summary = {k: v for k, v in dict(remote.summary).items() if not k.startswith("_")}
        summary["step"] = remote.summary.get("_step")
        metrics = []
        for row in remote.scan_history():
            record = {k: v for k, v in row.items() if not k.startswith("_")}
            record["step"] = row.get("_step")
            metrics.append(record)
        runs.append(Run("/".join(remote.path), dict(remote.config), summary, metrics))
    if not runs:
        raise LookupError(f"no W&B run in group {group!r} of {project!r}")
    return runs


# ---------------------------------------------------------------------------------------------------
# The Markdown report


def _fmt(value, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    return f"{value:,.{digits}f}"


def run_row(run: Run, published: dict) -> dict:
    """The numbers of one run's line in the report (None where unknown)."""
    measure = TABLES.get(run.table, {}).get("measure", "paper")
    pub = lookup_published(published, run.table, run.row, run.size, run.step)
    ours = run.summary.get("eval/paper_ppl" if measure == "paper" else "eval/ppl")
    state = run.summary.get("optimizer_state_bytes")
    return {
        "run": run.name, "table_row": f"{run.table}/{run.row}", "size": run.size, "steps": run.step,
        "exact_ppl": run.summary.get("eval/ppl"), "paper_ppl": run.summary.get("eval/paper_ppl"),
        "published_ppl": pub.ppl if pub else None,
        "delta": ours - pub.ppl if (pub and ours is not None) else None,
        "memory_paper_gb": run.summary.get("memory/paper_gb"),
        "memory_llmopt_gb": run.summary.get("memory/llmopt_gb"),
        "published_gb": pub.memory_gb if pub else None,
        "state_mb": state / 1e6 if state is not None else None,
        "token_slots_per_s": run.token_slots_per_s,
    }


RUN_COLUMNS = [("run", "run"), ("table/row", "table_row"), ("size", "size"), ("steps", "steps"),
               ("exact ppl", "exact_ppl"), ("paper-compatible ppl", "paper_ppl"),
               ("published ppl", "published_ppl"), ("delta", "delta"), ("memory paper GB", "memory_paper_gb"),
               ("memory llmopt GB", "memory_llmopt_gb"), ("published GB", "published_gb"),
               ("measured state MB", "state_mb"), ("token slots/s", "token_slots_per_s")]
DIGITS = {"exact_ppl": 2, "paper_ppl": 2, "published_ppl": 2, "delta": 2, "memory_paper_gb": 2,
          "memory_llmopt_gb": 2, "published_gb": 2, "state_mb": 1, "token_slots_per_s": 0}


def _cell(key: str, value) -> str:
    if key in DIGITS:
        text = _fmt(value, DIGITS[key])
        return f"+{text}" if key == "delta" and value is not None and value > 0 else text
    return "—" if value is None else str(value)


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _sort_ppl(value) -> float:
    """Perplexities in order, a missing or non-finite one last."""
    return value if isinstance(value, (int, float)) and math.isfinite(value) else math.inf


def _memory_text(summary: dict) -> str:
    """`0.23 GB`, with llmopt's own states beside it where they differ at two decimals (Muon's AdamW)."""
    paper = f"{summary['memory/paper_gb']:.2f} GB"
    ours = summary.get("memory/llmopt_gb")
    return paper if ours is None or f"{ours:.2f} GB" == paper else f"{paper}; llmopt {ours:.2f} GB"


def paper_layout(table: str, runs: list[Run], published: dict) -> str:
    """Method x size, as the paper prints it: `ours (published)`, memory in GB where known."""
    meta = TABLES.get(table, {"title": table, "measure": "paper", "sizes": [], "rows": []})
    measure = meta["measure"]
    key = "eval/paper_ppl" if measure == "paper" else "eval/ppl"
    sizes = [s for s in meta["sizes"] if any(r.size == s for r in runs) or
             any(k[0] == table and k[2] == s for k in published)]
    sizes += sorted({r.size for r in runs} - set(sizes))
    rows = list(meta["rows"]) + sorted({r.row for r in runs} - set(meta["rows"]))
    body = []
    for row in rows:
        cells, seen = [], False
        for size in sizes:
            mine = [r for r in runs if r.row == row and r.size == size]
            longest = [r for r in mine if (r.step or 0) == max(r.step or 0 for r in mine)]
            # a sweep (lr, seeds) fills a cell with several runs: the best of the longest, as a paper reports
            run = min(longest, key=lambda r: _sort_ppl(r.summary.get(key))) if mine else None
            pub = lookup_published(published, table, row, size, run.step if run else None)
            seen |= bool(mine or pub)
            ours = run.summary.get(key) if run else None
            text = _fmt(ours) + (f" (best of {len(longest)})" if len(longest) > 1 else "")
            if run is not None and run.summary.get("memory/paper_gb") is not None:
                text += f" [{_memory_text(run.summary)}]"
            if pub is not None:
                text += f" ({pub.ppl:.2f}" + (f", {pub.memory_gb:.2f} GB" if pub.memory_gb else "") + ")"
            cells.append(text)
        if seen:
            body.append([row] + cells)
    which = "paper-compatible" if measure == "paper" else "exact (token-weighted)"
    note = (f"Each cell: our {which} perplexity [our memory, paper accounting; llmopt's states where they "
            "differ] (published perplexity, published memory). Where several runs fill a cell (a sweep), the best "
            "of the longest is shown; every run is in the table below.")
    return f"## {meta['title']}\n\n{note}\n\n" + markdown_table(["method"] + sizes, body)


def build_report(runs: list[Run], published_version: str = "arxiv") -> str:
    disambiguate(runs)
    published = published_numbers(published_version)
    tables = sorted({r.table for r in runs}, key=lambda t: (list(TABLES).index(t) if t in TABLES else 99, t))
    parts = ["# llmopt report", "",
             f"{len(runs)} run(s). Exact ppl = exp(token-weighted validation loss); paper-compatible ppl = the "
             "reference code's (sum of batch means) / (batches + 1). Published numbers: protocol.md "
             f"({published_version} version). Memory: weights + optimizer state in bf16, 1 GB = 1e9 B."]
    for table in tables:
        parts += ["", paper_layout(table, [r for r in runs if r.table == table], published)]
    rows = [[_cell(key, run_row(r, published)[key]) for _, key in RUN_COLUMNS] for r in runs]
    parts += ["", "## Runs", "", markdown_table([title for title, _ in RUN_COLUMNS], rows)]
    return "\n".join(parts) + "\n"


# ---------------------------------------------------------------------------------------------------
# Plots


def write_plots(runs: list[Run], directory: str | Path, published_version: str = "arxiv") -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FormatStrFormatter

    disambiguate(runs)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    published = published_numbers(published_version)
    written = []

    fig, ax = plt.subplots(figsize=(8, 5))
    for run in runs:
        steps, values = run.series("train/loss")
        if steps:
            ax.plot(steps, values, label=run.name, linewidth=1)
    ax.set(xlabel="step", ylabel="training loss", title="Training loss")
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=7)
    written.append(_save(fig, directory / "loss.png"))

    fig, ax = plt.subplots(figsize=(8, 5))
    for run in runs:
        steps, values = run.series("eval/ppl")
        if not steps:
            continue
        (line,) = ax.plot(steps, values, marker="o", markersize=3, label=f"{run.name} (exact)")
        paper_steps, paper_values = run.series("eval/paper_ppl")
        if paper_steps:
            ax.plot(paper_steps, paper_values, linestyle="--", color=line.get_color(), linewidth=0.8)
        pub = lookup_published(published, run.table, run.row, run.size, run.step)
        if pub is not None:
            ax.plot([pub.step or run.step or steps[-1]], [pub.ppl], marker="*", markersize=12,
                    color=line.get_color(), linestyle="none")
    ax.set(xlabel="step", ylabel="validation perplexity", title="Validation perplexity "
           "(solid: exact, dashed: paper-compatible, star: published)")
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax.yaxis.set_minor_formatter(FormatStrFormatter("%g"))
    ax.grid(alpha=0.3, which="both")
    if ax.lines:
        ax.legend(fontsize=7)
    written.append(_save(fig, directory / "eval_ppl.png"))

    points = [(r, run_row(r, published)) for r in runs]
    points = [(r, row) for r, row in points if row["memory_paper_gb"] is not None]
    if points:
        fig, ax = plt.subplots(figsize=(6, 5))
        for run, row in points:
            measure = TABLES.get(run.table, {}).get("measure", "paper")
            ours = row["paper_ppl"] if measure == "paper" else row["exact_ppl"]
            if ours is not None:
                (dot,) = ax.plot([row["memory_paper_gb"]], [ours], marker="o", linestyle="none", label=run.name)
                if row["published_ppl"] is not None and row["published_gb"] is not None:
                    ax.plot([row["published_gb"]], [row["published_ppl"]], marker="*", markersize=12,
                            linestyle="none", color=dot.get_color())
        ax.set(xlabel="weights + optimizer state, GB (paper accounting)", ylabel="perplexity",
               title="Perplexity vs memory (star: published)")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
        written.append(_save(fig, directory / "memory_ppl.png"))
    return written


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llmopt.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dirs", nargs="*", help="run directories, or directories that hold them")
    parser.add_argument("--wandb-group", help="read the runs of this W&B group instead (needs network)")
    parser.add_argument("--wandb-project", default="llmopt", help="ENTITY/PROJECT of --wandb-group")
    parser.add_argument("--out", help="write the Markdown here (default: standard output)")
    parser.add_argument("--plots", help="write loss.png, eval_ppl.png and memory_ppl.png into this directory")
    parser.add_argument("--published", choices=["arxiv", "icml"], default="arxiv",
                        help="which version's 1B figures of the SCALE table to compare with (default arxiv)")
    args = parser.parse_args(argv)
    if bool(args.run_dirs) == bool(args.wandb_group):
        parser.error("give run directories or --wandb-group (one of the two)")
    try:
        if args.wandb_group:
            runs = load_wandb_group(args.wandb_group, args.wandb_project)
        else:
            runs = [load_run_dir(p) for p in find_run_dirs(args.run_dirs)]
    except (FileNotFoundError, LookupError) as err:
        print(f"llmopt.report: error: {err}", file=sys.stderr)
        return 2
    text = build_report(runs, args.published)
    if args.out:
        Path(args.out).write_text(text)
        print(f"wrote {args.out} ({len(runs)} runs)", file=sys.stderr)
    else:
        print(text, end="")
    if args.plots:
        for path in write_plots(runs, args.plots, args.published):
            print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
