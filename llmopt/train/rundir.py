"""What a run leaves behind for the command line: its summary as text, and no directory if it never started."""

from __future__ import annotations

import shutil
from pathlib import Path


def remove_if_empty(run_dir: Path) -> None:
    """Hydra creates the run directory before the job starts; a refused run leaves nothing behind."""
    if run_dir.is_dir() and not any(run_dir.iterdir()):
        _remove_run_dir(run_dir)


def remove_if_unstarted(run_dir: Path) -> None:
    """A run that failed before logging its first step (bad data files, a logger that cannot start, a refused
    checkpoint) leaves nothing behind: no summary, no metrics, no checkpoint in its directory."""
    metrics = run_dir / "metrics.jsonl"
    if not run_dir.is_dir() or (run_dir / "summary.json").exists() or any(run_dir.rglob("step_*")):
        return
    if not metrics.exists() or metrics.stat().st_size == 0:
        _remove_run_dir(run_dir)


def _remove_run_dir(run_dir: Path) -> None:
    shutil.rmtree(run_dir, ignore_errors=True)
    if not any(run_dir.parent.iterdir()):  # the date directory Hydra made for it
        run_dir.parent.rmdir()


def format_summary(summary: dict) -> str:
    rows = [("run", summary.get("run_dir")), ("optimizer", summary.get("optimizer")
                                               + (" + ema_nesterov" if summary.get("lookahead") else "")),
            ("model", f"{summary.get('flavor')} ({summary.get('params', 0) / 1e6:.2f}M params)"),
            ("steps", f"{summary.get('step')} / {summary.get('updates_planned')}"),
            ("tokens seen (non-pad)", f"{summary.get('tokens_seen', 0):,}")]
    if "eval/loss" in summary:
        rows += [("eval loss (token-weighted)", f"{summary['eval/loss']:.4f}  ppl {summary['eval/ppl']:.2f}"),
                 ("eval loss (paper-compatible)",
                  f"{summary['eval/paper_loss']:.4f}  ppl {summary['eval/paper_ppl']:.2f}")]
    rows += [(f"eval loss, {key.split('/')[1]} set", f"{value:.4f}  ppl {summary[key[:-4] + 'ppl']:.2f}")
             for key, value in summary.items() if key.count("/") == 2 and key.endswith("/loss")]
    rows.append(("optimizer state (measured)", f"{summary.get('optimizer_state_bytes', 0) / 1e6:.2f} MB"))
    if summary.get("memory/paper_gb") is not None:
        rows.append(("weights+state (paper accounting)", f"{summary['memory/paper_gb']:.2f} GB"))
    if summary.get("memory/llmopt_gb") is not None:
        rows.append(("weights+state (llmopt's states, paper units)", f"{summary['memory/llmopt_gb']:.2f} GB"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
