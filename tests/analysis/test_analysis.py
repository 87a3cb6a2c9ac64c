"""llmopt.analysis: the one run reader (runs.py) and the published tables' protocols (published.py)."""

import gzip
import json
from pathlib import Path

import pytest
import yaml

from llmopt.analysis.published import PROTOCOLS, TABLES, protocol_mismatches, row_of
from llmopt.analysis.runs import find_run_dirs, load_run_dir, load_runs

SNAPSHOTS = Path(__file__).parents[1] / "configs" / "resolved_configs"


def write_run(run_dir: Path, config: dict, records: list[dict], *, gzipped: bool = False) -> Path:
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    text = "".join(json.dumps(r) + "\n" for r in records)
    if gzipped:
        (run_dir / "metrics.jsonl.gz").write_bytes(gzip.compress(text.encode()))
    else:
        (run_dir / "metrics.jsonl").write_text(text)
    return run_dir


def adamw_config(run_name: str, flavor: str = "micro", lookahead: str = "none") -> dict:
    return {"run_name": run_name, "optimizer": {"name": "adamw"}, "lookahead": {"name": lookahead},
            "model": {"flavor": flavor}}


def test_one_reader_for_the_report_and_the_figures(tmp_path):
    """A directory of run directories: each run once, in path order, with the report's name and the figures'
    label from its config; records in step order, non-finite values left out of a series; an archived
    metrics.jsonl.gz read like metrics.jsonl; the summary from the last records of a run without summary.json."""
    records = [{"step": 20, "train/loss": 4.0, "eval/ppl": 60.0}, {"step": 10, "train/loss": float("nan")},
               {"step": 30, "train/loss": 3.0, "perf/token_slots_per_s": 5.0}]
    write_run(tmp_path / "b_run", adamw_config("ema", lookahead="ema_nesterov"), records)
    write_run(tmp_path / "a_run", adamw_config("plain", flavor="60m"), records, gzipped=True)
    (tmp_path / "not_a_run").mkdir()
    runs = load_runs([tmp_path])
    assert [Path(r.source).name for r in runs] == ["a_run", "b_run"]
    assert [r.name for r in runs] == ["plain", "ema"]
    assert [r.label for r in runs] == ["adamw (60m)", "adamw+ema_nesterov (micro)"]
    assert [r.row for r in runs] == ["adamw", "adamw+ema_nesterov"] and runs[0].size == "60m"
    assert [m["step"] for m in runs[1].metrics] == [10, 20, 30]
    assert runs[1].series("train/loss") == ([20, 30], [4.0, 3.0])
    assert runs[0].summary == {"step": 30, "eval/ppl": 60.0} and runs[0].token_slots_per_s == 5.0


def test_runs_that_share_a_name_or_label_are_told_apart_by_directory(tmp_path):
    for parent, directory in (("x", "0_adamw"), ("x", "1_adamw"), ("y", "1_adamw")):
        write_run(tmp_path / parent / directory, adamw_config("same"), [{"step": 1, "train/loss": 1.0}])
    runs = load_runs([tmp_path / "x", tmp_path / "y"])
    assert [r.name for r in runs] == ["0_adamw", "x/1_adamw", "y/1_adamw"]
    assert [r.label for r in runs] == ["adamw (micro) [0_adamw]", "adamw (micro) [x/1_adamw]",
                                       "adamw (micro) [y/1_adamw]"]
    assert load_runs([runs[0].source])[0].name == "same"          # alone, a run keeps its run_name


def test_bad_paths_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'missing'} is not a directory"):
        find_run_dirs([tmp_path / "missing"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'empty'} holds no run directory"):
        load_runs([tmp_path / "empty"])


def experiment_snapshots():
    return sorted(p for table in PROTOCOLS for p in (SNAPSHOTS / table).glob("*.yaml"))


@pytest.mark.parametrize("snapshot", experiment_snapshots(), ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_every_experiment_config_follows_its_published_rows_protocol(snapshot):
    """The protocols as llmopt.analysis.published writes them agree with the experiment configs (the resolved
    snapshots): each experiment lands on the row its tags name, with no mismatch."""
    config = yaml.safe_load(snapshot.read_text())
    tags = dict(t.split(":", 1) for t in config["logger"]["wandb"]["tags"] if ":" in t)
    assert row_of(tags["table"], config) == tags["row"]
    assert protocol_mismatches(tags["table"], tags["row"], tags["size"], config) == []


def test_protocols_hold_the_papers_settings():
    """protocol.md sections 1-3: SCALE's 60M runs 11K steps, the GaLore protocol 512 x 256 on C4; SGD-LL's 1B
    19,125 steps of 4096 sequences."""
    assert len(experiment_snapshots()) > 50
    scale, sgd_ll = PROTOCOLS["scale_table"], PROTOCOLS["sgd_ll_table"]
    assert scale["sizes"]["60m"] == {"trainer.steps": 11000, "trainer.global_batch_size": 512}
    assert scale["sizes"]["7b"]["trainer.steps"] == 150000
    assert scale["common"] == {"data.name": "c4", "data.mode": "truncate_pad", "data.seq_len": 256}
    assert sgd_ll["sizes"]["1b"] == {"trainer.steps": 19125, "trainer.global_batch_size": 4096}
    assert PROTOCOLS["scale_ablation"]["rows"]["sign_momentum"] == {
        "optimizer.name": "scale", "optimizer.normalization": "sign", "optimizer.momentum_on": "output",
        "lookahead.name": "none"}
    assert set(PROTOCOLS["scale_table"]["rows"]) == set(TABLES["scale_table"]["rows"])
    tiny = {"model": {"flavor": "tiny"}}
    assert protocol_mismatches("scale_table", "scale", "tiny", tiny) == [
        "model.flavor is tiny, the table's are 60m, 130m, 350m, 1b, 7b"]
    assert protocol_mismatches("ema_nesterov", "muon+ema_nesterov", "tiny", tiny) == []   # no published rows


def test_a_run_directory_needs_its_config(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text('{"step": 1, "train/loss": 1.0}\n')
    with pytest.raises(FileNotFoundError, match="holds no run directory"):
        find_run_dirs([run_dir])
    (run_dir / "config.yaml").write_text(yaml.safe_dump(adamw_config("r")))
    assert find_run_dirs([run_dir]) == [run_dir] and load_run_dir(run_dir).label == "adamw (micro)"
