"""Every experiment (and the default job) resolves to the config saved in tests/configs/resolved_configs/.

The guard for config refactors: moving a value between files must not change what a run gets. Each config is
composed as `python -m llmopt.train experiment=NAME` composes it (configs/train.yaml, the experiment as an
override), interpolations resolved, and compared key by key with its snapshot.

Left out or kept unresolved, since they depend on the machine or the Hydra runtime, not on the config files:
- the `hydra` node (not composed: compose() without return_hydra_config);
- leaves written with `${hydra:...}` (checkpoint.dir: the run directory) or `${oc.env:...}` (data_dir,
  logger.wandb.mode: environment variables) are stored as written, unresolved.

Regenerate snapshots (after a change meant to alter configs; list it in INTENDED below):
    python -m tests.configs.test_configs_resolved --write [NAME ...]
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, ListConfig

import llmopt  # noqa: F401  (registers the config schema and resolvers, as every entry point does)

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
SNAPSHOTS = Path(__file__).resolve().parent / "resolved_configs"
DEFAULT = "default"   # the job with no overrides; experiments have a folder or another name
# jobs beside the experiments: the default, and the one data config no experiment uses
JOBS = {DEFAULT: [], "default_data_c4_local": ["data=c4_local"]}
UNRESOLVED = ("${hydra:", "${oc.env:")

# Intended differences from the snapshots: {experiment name or "*": {dotted key: why}}. Empty: every
# experiment resolves exactly as before.
INTENDED: dict[str, dict[str, str]] = {}


def experiments() -> list[str]:
    """The names users type after experiment=; files starting with `_` are bases, not experiments."""
    root = CONFIGS / "experiment"
    return sorted(str(p.relative_to(root).with_suffix("")) for p in root.rglob("*.yaml")
                  if not any(part.startswith("_") for part in p.relative_to(root).parts))


def plain(node):
    """The config as plain data: interpolations resolved, except the machine-dependent ones (kept as written)."""
    if isinstance(node, DictConfig):
        keys = list(node.keys())
        return {k: _leaf(node, k) for k in keys}
    return [_leaf(node, i) for i in range(len(node))]


def _leaf(parent, key):
    child = parent._get_node(key)
    if isinstance(child, (DictConfig, ListConfig)):
        return None if child._is_none() else plain(child)
    raw = child._value()
    if isinstance(raw, str) and any(tag in raw for tag in UNRESOLVED):
        return raw
    return parent[key]


def resolved(name: str) -> dict:
    # ~local: this machine's configs/local/default.yaml (git-ignored) is no part of what the files define
    overrides = [*JOBS.get(name, [f"experiment={name}"]), "~local"]
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return plain(compose("train", overrides=overrides))


def flatten(tree, prefix: str = "") -> dict:
    if isinstance(tree, dict):
        items = tree.items()
    elif isinstance(tree, list):
        items = enumerate(tree)
    else:
        return {prefix: tree}
    out = {}
    for k, v in items:
        out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    if not out:
        out[prefix] = tree   # an empty dict or list is a value
    return out


def snapshot_path(name: str) -> Path:
    return SNAPSHOTS / f"{name}.yaml"


def differences(name: str) -> list[str]:
    old = flatten(yaml.safe_load(snapshot_path(name).read_text()))
    new = flatten(resolved(name))
    intended = {**INTENDED.get("*", {}), **INTENDED.get(name, {})}
    missing = object()
    return [f"{key}: {old.get(key, '<absent>')!r} -> {new.get(key, '<absent>')!r}"
            for key in sorted(set(old) | set(new))
            if old.get(key, missing) != new.get(key, missing) and key not in intended]


def test_every_experiment_has_a_snapshot_and_every_snapshot_an_experiment():
    saved = sorted(str(p.relative_to(SNAPSHOTS).with_suffix("")) for p in SNAPSHOTS.rglob("*.yaml"))
    assert saved == sorted([*JOBS, *experiments()])
    assert len(saved) == 94   # 91 table rows, mini_protocol and the two JOBS


@pytest.mark.parametrize("name", [*JOBS, *experiments()])
def test_config_resolves_as_saved(name):
    diff = differences(name)
    assert not diff, f"{name} resolves differently from its snapshot:\n  " + "\n  ".join(diff)


def test_a_changed_value_is_reported_by_key(tmp_path, monkeypatch):
    """The comparison itself can fail: an altered snapshot shows up as that key, old and new."""
    name = "scale_table/scale_60m"
    tree = yaml.safe_load(snapshot_path(name).read_text())
    tree["optimizer"]["lr"] = 0.5
    altered = tmp_path / f"{name}.yaml"
    altered.parent.mkdir(parents=True)
    altered.write_text(yaml.safe_dump(tree))
    monkeypatch.setattr(sys.modules[__name__], "SNAPSHOTS", tmp_path)
    assert differences(name) == ["optimizer.lr: 0.5 -> 0.001"]


def write(names: list[str]) -> None:
    for name in names or [*JOBS, *experiments()]:
        path = snapshot_path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(resolved(name), sort_keys=False))
        print(f"wrote {path.relative_to(SNAPSHOTS.parents[1])}")


if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] != "--write":
        sys.exit("usage: python -m tests.configs.test_configs_resolved --write [NAME ...]")
    write(sys.argv[2:])
