"""Where metrics go: a JSON-lines file in the run directory (always) and W&B (when enabled)."""

from __future__ import annotations

import gzip
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
            with open(tmp, "w") as f:
                f.write("".join(json.dumps(record) + "\n" for record in history))
                f.flush()
                os.fsync(f.fileno())
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

        def start(run_id):
            return wandb.init(project=project, entity=entity, group=group, name=name, tags=list(tags or []),
                              config=config, dir=os.environ.get("WANDB_DIR", str(run_dir)), mode=mode,
                              reinit="finish_previous", id=run_id, resume="allow" if run_id else None)
        try:
            self.run = start(run_id)
        except wandb.errors.UsageError as err:
            if "API key" not in str(err):
                raise
            raise ValueError(f"logger=wandb logs online but W&B has no login ({err}): run `wandb login` or set "
                             "WANDB_API_KEY, or log offline with logger.wandb.mode=offline (or WANDB_MODE=offline) "
                             "and `wandb sync` the run directory later") from None
        except Exception as err:  # e.g. the run was deleted in W&B (it refuses the id): a resume must still train
            if run_id is None:
                raise
            log.warning("W&B did not continue run %s (%s: %s); logging to a new run", run_id, type(err).__name__,
                        err)
            self.run = start(None)

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

    def lineage(self, run_dir: Path, previous: dict | None = None) -> dict:
        """What a run resumed from this one's checkpoints needs to continue its records (Checkpointer.lineage).
        Without W&B here, the W&B run of the `previous` lineage is passed on for a later link of the chain."""
        wandb_ids = [logger.run.id for logger in self.loggers if isinstance(logger, WandbLogger)]
        wandb_id = wandb_ids[0] if wandb_ids else (previous or {}).get("wandb_id")
        return {"run_dir": str(Path(run_dir).resolve()), "wandb_id": wandb_id}


def metrics_history(lineage: dict, step: int, run_dir: Path) -> list[dict] | None:
    """The records a run resumed at `step` continues: those of the run that wrote the checkpoint (its run
    directory in `lineage`; where that is gone, e.g. a moved tree, this run's own file), up to `step`. Steps
    logged after the checkpoint (a run that crashed) are dropped: they are trained again. None where neither
    file exists: the run's file is then appended to, never emptied."""
    sources = [Path(lineage["run_dir"])] if lineage.get("run_dir") else []
    path = next((d / "metrics.jsonl" for d in [*sources, Path(run_dir)] if (d / "metrics.jsonl").is_file()), None)
    if path is None:
        if sources:
            log.warning("the metrics of steps 1-%d are not in this run's metrics.jsonl: %s is gone", step,
                        sources[0] / "metrics.jsonl")
        return None
    return [r for r in read_metrics(path) if r.get("step", 0) <= step]


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a metrics.jsonl (or an archived metrics.jsonl.gz), in file order. Blank lines and a line cut
    short by a killed process are skipped."""
    path = Path(path)
    text = gzip.decompress(path.read_bytes()).decode() if path.suffix == ".gz" else path.read_text()
    records = []
    for line in text.splitlines():
        try:
            record = json.loads(line) if line.strip() else None
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def build_loggers(run_dir: Path, config: dict, is_main: bool, wandb: dict | None = None,
                  resumed: dict | None = None, continue_wandb: bool = True) -> Loggers:
    """JSON lines on the main process; W&B too when `wandb.enabled`. `resumed` (the checkpoint's trainer.pt
    when resuming, else empty): metrics.jsonl starts with the earlier records, and W&B continues the same run if
    `continue_wandb` (a requeue; a run branched from a chosen checkpoint gets its own)."""
    if not is_main:
        return Loggers([])
    lineage = (resumed or {}).get("lineage") or {}
    # a checkpoint without a lineage (written before llmopt kept one): append, as before
    history = metrics_history(lineage, resumed["step"], run_dir) if lineage else None
    loggers: list = [JsonlLogger(run_dir / "metrics.jsonl", history)]
    if wandb and wandb.get("enabled"):
        opts = {k: v for k, v in wandb.items() if k != "enabled"}
        run_id = lineage.get("wandb_id") if continue_wandb else None
        loggers.append(WandbLogger(run_dir, config, run_id=run_id, **opts))
    return Loggers(loggers)
