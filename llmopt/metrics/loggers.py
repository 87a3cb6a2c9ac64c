"""Where metrics go: a JSON-lines file in the run directory (always) and W&B (when enabled)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path


def _plain(value):
    """JSON-safe scalars: tensors -> floats, NaN/Inf -> null."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class JsonlLogger:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.file = open(self.path, "a", buffering=1)

    def log(self, metrics: dict, step: int) -> None:
        record = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        self.file.write(json.dumps(record) + "\n")

    def close(self) -> None:
        self.file.close()


class WandbLogger:
    """W&B run; mode online | offline (offline writes under $WANDB_DIR, else the run directory; sync later)."""

    def __init__(self, run_dir: Path, config: dict, project: str, mode: str = "offline",
                 group: str | None = None, name: str | None = None, tags: list[str] | None = None,
                 entity: str | None = None):
        import wandb

        self.run = wandb.init(project=project, entity=entity, group=group, name=name, tags=list(tags or []),
                              config=config, dir=os.environ.get("WANDB_DIR", str(run_dir)), mode=mode,
                              reinit="finish_previous")

    def log(self, metrics: dict, step: int) -> None:
        self.run.log({k: _plain(v) for k, v in metrics.items()}, step=step)

    def close(self) -> None:
        self.run.finish()


class Loggers:
    def __init__(self, loggers: list):
        self.loggers = loggers

    def log(self, metrics: dict, step: int) -> None:
        for logger in self.loggers:
            logger.log(metrics, step)

    def close(self) -> None:
        for logger in self.loggers:
            logger.close()


def build_loggers(run_dir: Path, config: dict, is_main: bool, wandb: dict | None = None) -> Loggers:
    """JSON lines on the main process; W&B too when `wandb.enabled`."""
    if not is_main:
        return Loggers([])
    loggers: list = [JsonlLogger(run_dir / "metrics.jsonl")]
    if wandb and wandb.get("enabled"):
        opts = {k: v for k, v in wandb.items() if k != "enabled"}
        loggers.append(WandbLogger(run_dir, config, **opts))
    return Loggers(loggers)
