#!/usr/bin/env python
"""Figures like the SGD-LL paper's from one or several runs' metrics (llmopt.analysis.plots).

    python scripts/plot_runs.py RUN_DIR [RUN_DIR ...] --out DIR [--kind q] [--dpi 120]

A RUN_DIR is a run directory (config.yaml and metrics.jsonl or metrics.jsonl.gz, as llmopt.train writes them)
or a directory that holds some, such as a Hydra multirun directory (outputs/multirun/<date>/<time>/). Writes
into DIR loss.png, update_rms.png, weight_grad_ratio.png, distance_from_init.png, token_grad_norms.png,
eff_lr.png and sgd_ll_clips.png; a figure none of the runs has data for is not written, and says so.
"""

import argparse
import sys
from pathlib import Path

from llmopt.analysis import plots
from llmopt.analysis.runs import load_runs
from llmopt.metrics.diagnostics import BLOCK_KINDS


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="run directories, or directories that hold them")
    parser.add_argument("--out", required=True, help="directory for the PNG files")
    parser.add_argument("--kind", choices=BLOCK_KINDS, default=None,
                        help="per-layer lines of one tensor kind instead of the geometric mean over matrices")
    parser.add_argument("--dpi", type=int, default=120)
    args = parser.parse_args(argv)
    try:
        runs = load_runs(args.runs)
    except FileNotFoundError as err:
        print(f"plot_runs: error: {err}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    figures, left_out = plots.make_figures(runs, args.kind)
    for name, fig in figures.items():
        print(plots.save(fig, out / name, args.dpi))
    for name, reason in left_out.items():
        print(f"{out / name} not written: {reason}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
