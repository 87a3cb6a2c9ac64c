"""Running the real trainer in tests: configs composed by Hydra from configs/, as the CLI does."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

ROOT = Path(__file__).resolve().parents[2]
CONFIG_DIR = str(ROOT / "configs")

# a small, fast setup on the real C4 sample: micro model with the shared 32k vocabulary, short sequences
C4_SMALL = ["data=c4_local", "data.seq_len=64", "data.num_workers=0", "data.eval_tokens=4000",
            "data.window_shuffle_buffer=64",  # packed runs: a small buffer, quick to fill
            "model=micro", "model.vocab_size=32000", "trainer.global_batch_size=8", "trainer.micro_batch_size=4",
            "trainer.log_every=1", "trainer.eval_every=1000", "checkpoint.export_hf=false"]


def compose_config(overrides: list[str]):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("train", overrides=overrides)


def run_in_process(tmp_path: Path, overrides: list[str], name: str = "run") -> tuple[dict, Path]:
    """The trainer's run() on a composed config; returns the summary and the run directory."""
    from llmopt.train.run import run

    run_dir = tmp_path / name
    cfg = compose_config([f"checkpoint.dir={run_dir / 'checkpoints'}", *overrides])
    return run(cfg, run_dir), run_dir


def run_cli(args: list[str], cwd: Path, timeout: int = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """`python -m llmopt.train ARGS` in a fresh process (the real CLI)."""
    full_env = {**os.environ, "WANDB_MODE": "offline", "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([sys.executable, "-m", "llmopt.train", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=full_env)


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
