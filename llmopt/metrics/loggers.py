"""Where metrics go: a JSON-lines file in the run directory (always) and W&B (when enabled)."""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

log = logging.getLogger(__name__)


def _plain(value):
    """JSON-safe scalars: tensors -> floats, NaN/Inf -> null."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class JsonlLogger:
    """Appends one JSON record per log call. `history` (a resumed run's earlier records) starts the file anew."""

    def __init__(self, path: str | Path, history: list[dict] | None = None):
        self.path = Path(path)
        if history is not None:  # written whole, then swapped in: the earlier file stays until this one is complete
            tmp = self.path.with_name(f".{self.path.name}.tmp")
            tmp.write_text("".join(json.dumps(record) + "\n" for record in history))
            os.replace(tmp, self.path)
        self.file = open(self.path, "a", buffering=1)

    def log(self, metrics: dict, step: int) -> None:
        record = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        self.file.write(json.dumps(record) + "\n")

    def close(self) -> None:
        self.file.close()


class WandbLogger:
    """W&B run; mode online | offline (offline writes under $WANDB_DIR, else the run directory; sync later).
    `run_id`: continue that W&B run (a resumed training run), so its curves stay one run in W&B."""

    def __init__(self, run_dir: Path, config: dict, project: str, mode: str = "offline",
                 group: str | None = None, name: str | None = None, tags: list[str] | None = None,
                 entity: str | None = None, run_id: str | None = None):
        import wandb

        self.run = wandb.init(project=project, entity=entity, group=group, name=name, tags=list(tags or []),
                              config=config, dir=os.environ.get("WANDB_DIR", str(run_dir)), mode=mode,
                              reinit="finish_previous", id=run_id, resume="allow" if run_id else None)

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

    def lineage(self, run_dir: Path) -> dict:
        """What a run resumed from this one's checkpoints needs to continue its records (Checkpointer.lineage)."""
        wandb_ids = [logger.run.id for logger in self.loggers if isinstance(logger, WandbLogger)]
        return {"run_dir": str(Path(run_dir).resolve()), "wandb_id": wandb_ids[0] if wandb_ids else None}


def metrics_history(lineage: dict, step: int | None) -> list[dict]:
    """The records a run resumed at `step` continues: those of the run that wrote the checkpoint (its run
    directory in `lineage`), up to `step`. Steps logged after the checkpoint (a run that crashed) are dropped:
    they are trained again."""
    if not lineage.get("run_dir") or step is None:
        return []
    path = Path(lineage["run_dir"]) / "metrics.jsonl"
    if not path.is_file():
        log.warning("the metrics of steps 1-%d are not in this run's metrics.jsonl: %s is gone", step, path)
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut short by a killed process
            continue
    return [r for r in records if isinstance(r, dict) and r.get("step", 0) <= step]


def build_loggers(run_dir: Path, config: dict, is_main: bool, wandb: dict | None = None,
                  resumed: dict | None = None) -> Loggers:
    """JSON lines on the main process; W&B too when `wandb.enabled`. `resumed` (the checkpoint's trainer.pt
    when resuming): metrics.jsonl starts with the earlier records and W&B continues the same run."""
    if not is_main:
        return Loggers([])
    lineage = (resumed or {}).get("lineage") or {}
    # a checkpoint without a lineage (written before llmopt kept one): append, as before
    history = metrics_history(lineage, resumed.get("step")) if lineage else None
    loggers: list = [JsonlLogger(run_dir / "metrics.jsonl", history)]
    if wandb and wandb.get("enabled"):
        opts = {k: v for k, v in wandb.items() if k != "enabled"}
        loggers.append(WandbLogger(run_dir, config, run_id=lineage.get("wandb_id"), **opts))
    return Loggers(loggers)
