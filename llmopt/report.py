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
* table / row / size come from the run's resolved config (config.yaml): the table from its W&B group, the
  row from its optimizer settings (the published row they make, else optimizer+lookahead), the size from
  model.flavor. A run is put beside a published figure only where its config follows that row's protocol
  (model flavor, steps, batch, data, optimizer settings: llmopt.analysis.published); where it claims a
  published cell (its W&B tags table:/row:/size:, or its config's cell) but departs from the protocol, the
  published column says which keys differ instead, and the run stays out of the paper's layout.

Plots (`--plots DIR`, matplotlib Agg): loss.png (training loss of every run, evaluations as markers),
eval_ppl.png (validation perplexity against step, published final figures as stars), memory_ppl.png
(perplexity against the paper-accounting memory, ours and published); a figure with nothing to draw is not
written, and said so.

The published numbers are in llmopt.analysis.published, copied from docs/protocol.md (the papers' tables).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from llmopt.analysis.published import TABLES, Published, lookup_published, protocol_mismatches, published_numbers
from llmopt.analysis.runs import Run, disambiguate, load_runs, load_wandb_group

# ---------------------------------------------------------------------------------------------------
# Which published figure a run is put beside


def follows_protocol(run: Run) -> bool:
    """The run's config follows the protocol of its own cell (a table without a protocol: always)."""
    return not protocol_mismatches(run.table, run.row, run.size, run.config)


def comparison(run: Run, published: dict) -> tuple[Published | None, str | None]:
    """(the published figure the run is compared with, None), or (None, why it is not) where the run claims a
    published cell (its config's, else its tags') whose protocol its config departs from; (None, None) where
    there is no published cell to compare with."""
    own = (run.table, run.row, run.size)
    claimed = (run.tags.get("table", run.table), run.tags.get("row", run.row), run.tags.get("size", run.size))
    cell = next((c for c in (own, claimed) if c in published), None)
    if cell is None:
        return None, None
    mismatches = protocol_mismatches(*cell, run.config)
    if mismatches:
        return None, f"not compared with {'/'.join(cell)}: " + "; ".join(mismatches)
    return lookup_published(published, *cell, run.step), None


# ---------------------------------------------------------------------------------------------------
# The Markdown report


def _fmt(value, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    return f"{value:,.{digits}f}"


def run_row(run: Run, published: dict) -> dict:
    """The numbers of one run's line in the report (None where unknown)."""
    measure = TABLES.get(run.table, {}).get("measure", "paper")
    pub, not_compared = comparison(run, published)
    ours = run.summary.get("eval/paper_ppl" if measure == "paper" else "eval/ppl")
    state = run.summary.get("optimizer_state_bytes")
    return {
        "run": run.name, "table_row": f"{run.table}/{run.row}", "size": run.size, "steps": run.step,
        "exact_ppl": run.summary.get("eval/ppl"), "paper_ppl": run.summary.get("eval/paper_ppl"),
        "published_ppl": pub.ppl if pub else not_compared,
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
    if isinstance(value, str):                  # a published ppl not compared: the reason
        return value
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
    in_layout = [r for r in runs if follows_protocol(r)]
    tables = sorted({r.table for r in in_layout}, key=lambda t: (list(TABLES).index(t) if t in TABLES else 99, t))
    parts = ["# llmopt report", "",
             f"{len(runs)} run(s). Exact ppl = exp(token-weighted validation loss); paper-compatible ppl = the "
             "reference code's (sum of batch means) / (batches + 1). Published numbers: protocol.md "
             f"({published_version} version). Memory: weights + optimizer state in bf16, 1 GB = 1e9 B."]
    for table in tables:
        parts += ["", paper_layout(table, [r for r in in_layout if r.table == table], published)]
    rows = [[_cell(key, run_row(r, published)[key]) for _, key in RUN_COLUMNS] for r in runs]
    parts += ["", "## Runs", "", markdown_table([title for title, _ in RUN_COLUMNS], rows)]
    return "\n".join(parts) + "\n"


# ---------------------------------------------------------------------------------------------------
# Plots


def write_plots(runs: list[Run], directory: str | Path, published_version: str = "arxiv") -> list[str]:
    """loss.png, eval_ppl.png, memory_ppl.png in `directory`; a figure with nothing to draw is not written.
    Returns one line per figure: the path written, or why it was not."""
    from llmopt.analysis import plots  # matplotlib (and torch, through the diagnostics keys) only for plots

    disambiguate(runs)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    published = published_numbers(published_version)
    rows = {r.name: run_row(r, published) for r in runs}
    compared = {r.name: comparison(r, published)[0] for r in runs}
    points = []
    for run in runs:
        row = rows[run.name]
        ours = row["paper_ppl"] if TABLES.get(run.table, {}).get("measure", "paper") == "paper" else row["exact_ppl"]
        if row["memory_paper_gb"] is not None and ours is not None:
            pub = compared[run.name]
            points.append((run.name, row["memory_paper_gb"], ours, pub.memory_gb if pub else None,
                           pub.ppl if pub else None))
    figures = {"loss.png": (plots.plot_loss(runs), "no run has train/loss or eval/loss"),
               "eval_ppl.png": (plots.plot_eval_ppl(runs, compared), "no run has eval/ppl"),
               "memory_ppl.png": (plots.plot_memory_ppl(points), "no run has memory/paper_gb and a perplexity")}
    lines = []
    for name, (fig, why_not) in figures.items():
        lines.append(f"wrote {plots.save(fig, directory / name)}" if fig is not None else
                     f"{directory / name} not written: {why_not}")
    return lines


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
            runs = load_runs(args.run_dirs)
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
        for line in write_plots(runs, args.plots, args.published):
            print(line, file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
