"""Sweeps (-m) go on after a failed job and end with "N of M jobs failed" and a non-zero exit
(llmopt.train.sweep), through Hydra's basic launcher (jobs in one process) and the submitit local launcher (each
job in a process of its own, as on SLURM)."""

import json

import pytest
from omegaconf import OmegaConf

from llmopt.train.sweep import SweepReport, failure_report, read_outcomes, record_outcome
from tests.helpers.train import run_cli

SMALL = ["trainer.steps=2", "data.eval_tokens=2000", "checkpoint.export_hf=false"]


def failed_lines(stderr: str) -> list[str]:
    lines = stderr.splitlines()
    start = next(i for i, line in enumerate(lines) if "jobs failed:" in line)
    return lines[start:start + 1 + int(lines[start].split()[1])]


def test_a_sweep_where_every_job_failed_says_so_and_exits_non_zero(tmp_path):
    out = run_cli(["-m", "optimizer.lr=-1,-2", *SMALL, f"output_root={tmp_path}"], cwd=tmp_path)
    assert out.returncode == 1, out.stderr[-3000:]
    report = failed_lines(out.stderr)
    assert report[0] == "llmopt: 2 of 2 jobs failed:"
    assert [line.split(":")[0] for line in report[1:]] == ["  job 0 (0_adamw_tiny_none_lr-1_seed0)",
                                                           "  job 1 (1_adamw_tiny_none_lr-2_seed0)"]
    assert all("lr must be >= 0" in line for line in report[1:])
    assert not list(tmp_path.rglob("metrics.jsonl"))


def test_a_sweep_of_job_processes_goes_on_after_a_failed_job_and_counts_it(tmp_path):
    launcher = ["hydra/launcher=local", "hydra.launcher.cpus_per_task=1", "hydra.launcher.gpus_per_node=0"]
    out = run_cli(["-m", "optimizer.lr=-1,1e-3", *SMALL, *launcher, f"output_root={tmp_path}"], cwd=tmp_path)
    assert out.returncode == 1, out.stderr[-3000:]
    report = failed_lines(out.stderr)
    assert report[0] == "llmopt: 1 of 2 jobs failed:" and len(report) == 2
    assert report[1].startswith("  job 0 (") and "lr must be >= 0" in report[1]
    summaries = list(tmp_path.rglob("summary.json"))
    assert len(summaries) == 1 and json.loads(summaries[0].read_text())["step"] == 2


def test_the_report_counts_the_latest_outcome_of_each_job(tmp_path, capsys):
    sweep = OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}})
    SweepReport().on_multirun_end(sweep)  # no job recorded: nothing to report
    record_outcome(tmp_path, 0, tmp_path / "0_a", None)
    record_outcome(tmp_path, 1, tmp_path / "1_b", "error: lr must be >= 0")
    record_outcome(tmp_path, 2, tmp_path / "2_c", "stopped: non-finite loss")
    assert [o["job"] for o in read_outcomes(tmp_path)] == [0, 1, 2]
    assert failure_report(read_outcomes(tmp_path)) == ("llmopt: 2 of 3 jobs failed:\n"
                                                       "  job 1 (1_b): error: lr must be >= 0\n"
                                                       "  job 2 (2_c): stopped: non-finite loss")
    with pytest.raises(SystemExit) as exited:
        SweepReport().on_multirun_end(sweep)
    assert exited.value.code == 1 and "2 of 3 jobs failed" in capsys.readouterr().err
    record_outcome(tmp_path, 1, tmp_path / "1_b", None)  # requeued, then finished
    record_outcome(tmp_path, 2, tmp_path / "2_c", None)
    assert failure_report(read_outcomes(tmp_path)) is None
    SweepReport().on_multirun_end(sweep)
