"""A sweep (`-m`) that reports its failures: each job goes on after a failed one, records its outcome in the
sweep directory, and when the sweep ends the command prints "N of M jobs failed" with each failed job's error
line and exits non-zero.

The outcomes are files (`<sweep dir>/.llmopt_jobs/<job number>.json`) because a launcher may run each job in a
process of its own (hydra-submitit-launcher: locally or as SLURM array tasks); the report runs in the process
that launched the sweep, after every job has returned.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from hydra.experimental.callback import Callback

OUTCOMES_DIR = ".llmopt_jobs"
SWEEP_FAILED_EXIT_CODE = 1


def record_outcome(sweep_dir: Path, job_number: int, run_dir: Path, error: str | None) -> None:
    """One job's outcome: `error` is its one-line error, None when it finished (preempted counts as finished:
    it is requeued)."""
    outcomes = Path(sweep_dir) / OUTCOMES_DIR
    outcomes.mkdir(parents=True, exist_ok=True)
    record = {"job": job_number, "run_dir": str(run_dir), "error": error}
    (outcomes / f"{job_number}.json").write_text(json.dumps(record))


def read_outcomes(sweep_dir: Path) -> list[dict]:
    """The recorded outcomes of a sweep's jobs, by job number (a requeued job's latest attempt)."""
    outcomes = Path(sweep_dir) / OUTCOMES_DIR
    records = [json.loads(path.read_text()) for path in outcomes.glob("*.json")] if outcomes.is_dir() else []
    return sorted(records, key=lambda record: record["job"])


def failure_report(outcomes: list[dict]) -> str | None:
    """"N of M jobs failed" and each failed job's error line; None when none failed."""
    failed = [o for o in outcomes if o["error"] is not None]
    if not failed:
        return None
    lines = [f"llmopt: {len(failed)} of {len(outcomes)} jobs failed:"]
    lines += [f"  job {o['job']} ({Path(o['run_dir']).name}): {o['error']}" for o in failed]
    return "\n".join(lines)


class SweepReport(Callback):
    """Prints the failure report when a sweep ends and exits with SWEEP_FAILED_EXIT_CODE if any job failed."""

    def on_multirun_end(self, config, **kwargs) -> None:
        report = failure_report(read_outcomes(Path(config.hydra.sweep.dir)))
        if report is not None:
            print(report, file=sys.stderr)
            sys.exit(SWEEP_FAILED_EXIT_CODE)
