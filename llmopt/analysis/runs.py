"""One reader of run directories, for the report and the figures.

A run directory holds config.yaml (the resolved config), metrics.jsonl (or an archived metrics.jsonl.gz) and,
once the run has ended, summary.json, as llmopt.train writes them. `load_runs` takes run directories and
directories that hold them (a Hydra multirun sweep `outputs/multirun/<date>/<time>/` with its numbered job
directories, or any directory of run directories)."""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from llmopt.analysis.published import row_of
from llmopt.metrics.loggers import read_metrics

METRICS_FILES = ("metrics.jsonl", "metrics.jsonl.gz")   # the second as archived runs keep it


@dataclass
class Run:
    source: str                      # run directory or W&B run path
    config: dict                     # the resolved config
    summary: dict
    metrics: list[dict] = field(default_factory=list)   # the logged records, in step order
    name: str = ""                   # the report's: run_name, or the directory where two runs share one
    label: str = ""                  # the figures' legend: "optimizer+lookahead (flavor)"

    def __post_init__(self):
        self.metrics = sorted((m for m in self.metrics if m.get("step") is not None), key=lambda m: m["step"])
        self.name = self.name or str(self.config.get("run_name") or Path(self.source).name)
        if not self.label:
            flavor = self.flavor
            self.label = self.method + (f" ({flavor})" if flavor else "") if self.optimizer else \
                Path(self.source).name

    @property
    def tags(self) -> dict[str, str]:
        tags = ((self.config.get("logger") or {}).get("wandb") or {}).get("tags") or []
        return dict(t.split(":", 1) for t in tags if isinstance(t, str) and ":" in t)

    @property
    def optimizer(self) -> str | None:
        return (self.config.get("optimizer") or {}).get("name") or self.summary.get("optimizer")

    @property
    def method(self) -> str:
        """optimizer+lookahead, as the resolved config names them."""
        lookahead = (self.config.get("lookahead") or {}).get("name", "none")
        optimizer = self.optimizer or "?"
        return optimizer if lookahead in (None, "none") else f"{optimizer}+{lookahead}"

    @property
    def flavor(self) -> str | None:
        return (self.config.get("model") or {}).get("flavor") or self.summary.get("flavor")

    @property
    def table(self) -> str:
        """The paper table the run belongs to: its experiment's W&B group (or table tag)."""
        group = ((self.config.get("logger") or {}).get("wandb") or {}).get("group")
        return group or self.tags.get("table") or "-"

    @property
    def row(self) -> str:
        """The table's published row whose optimizer settings the run has, else optimizer+lookahead."""
        return row_of(self.table, self.config) or self.method

    @property
    def size(self) -> str:
        return self.flavor or "?"

    @property
    def step(self) -> int | None:
        return self.summary.get("step")

    def series(self, key: str) -> tuple[list[int], list[float]]:
        """(steps, values) of a logged key, finite values only."""
        points = [(m["step"], float(m[key])) for m in self.metrics
                  if isinstance(m.get(key), (int, float)) and math.isfinite(m[key])]
        return [p[0] for p in points], [p[1] for p in points]

    @property
    def token_slots_per_s(self) -> float | None:
        _, values = self.series("perf/token_slots_per_s")
        return statistics.median(values) if values else None

    def keys(self) -> set[str]:
        return {k for m in self.metrics for k in m}

    def tensors(self) -> dict[str, set[str]]:
        """tensor id ("3/q", "embed", ...) -> the per-tensor diagnostics quantities logged for it."""
        # imported here: the diagnostics package loads torch, which the report does not need
        from llmopt.metrics.diagnostics import keys

        out: dict[str, set[str]] = {}
        for key in self.keys():
            parts = key.split("/")
            if len(parts) >= 3 and key.startswith(keys.PREFIX) and parts[-1] in keys.QUANTITIES and \
                    parts[1] != "global":
                out.setdefault("/".join(parts[1:-1]), set()).add(parts[-1])
        return out

    def blocks(self) -> list[int]:
        return sorted({int(t.split("/")[0]) for t in self.tensors() if t.split("/")[0].isdigit()})


def disambiguate(runs: list[Run]) -> list[Run]:
    """Runs that share a name are told apart by their directory (with its parent's where the directory name
    repeats too): the report shows the directory as the name, the figures add it to the label."""
    _tell_apart(runs, "name", lambda name, directory: directory)
    _tell_apart(runs, "label", lambda label, directory: f"{label} [{directory}]")
    return runs


def _tell_apart(runs: list[Run], attribute: str, rename) -> None:
    values = [getattr(r, attribute) for r in runs]
    clashing = [r for r, value in zip(runs, values) if values.count(value) > 1]
    directories = [Path(r.source).name for r in clashing]
    for run, directory in zip(clashing, directories):
        where = directory if directories.count(directory) == 1 else f"{Path(run.source).parent.name}/{directory}"
        setattr(run, attribute, rename(getattr(run, attribute), where))


def summary_from_metrics(metrics: list[dict]) -> dict:
    """What summary.json would hold, from the logged steps (a run still going, or stopped early)."""
    summary: dict = {}
    for record in metrics:
        summary.update({k: v for k, v in record.items() if k.startswith(("eval/", "memory/", "model/"))})
        summary["step"] = record.get("step", summary.get("step"))
    return summary


def metrics_file(path: Path) -> Path | None:
    return next((path / name for name in METRICS_FILES if (path / name).is_file()), None)


def is_run_dir(path: Path) -> bool:
    return (path / "config.yaml").is_file() and ((path / "summary.json").is_file() or
                                                  metrics_file(path) is not None)


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
    metrics_path = metrics_file(path)
    metrics = read_metrics(metrics_path) if metrics_path else []
    if (path / "summary.json").is_file():
        summary = json.loads((path / "summary.json").read_text())
    else:
        summary = summary_from_metrics(metrics)
    return Run(str(path), config, summary, metrics)


def load_runs(paths: list[str | Path]) -> list[Run]:
    """Every run under `paths` (run directories or directories holding them), told apart where names clash.
    FileNotFoundError names a path that is not a directory or holds no run."""
    return disambiguate([load_run_dir(p) for p in find_run_dirs(paths)])


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
    return disambiguate(runs)
