"""The config schema (llmopt/config.py): Hydra refuses unknown keys and wrong types at compose time, the CLI
reports them in one line, --help shows every field's doc, and a machine's configs/local/default.yaml is composed."""

from __future__ import annotations

import shutil
from dataclasses import fields, is_dataclass

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigKeyError, ValidationError

from llmopt.config import CONFIG_DIR, RunConfig, check_schema, field_docs, help_text
from tests.helpers.train import run_cli


def compose_in(config_dir, overrides: list[str]):
    with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
        return compose("train", overrides=overrides)


def test_an_unknown_key_is_refused_at_compose():
    with pytest.raises(ConfigCompositionException) as err:
        compose_in(CONFIG_DIR, ["trainer.stepz=3"])
    assert str(err.value.__cause__).startswith("Key 'stepz' not in 'TrainerConfig'")


def test_a_value_of_the_wrong_type_is_refused_at_compose():
    with pytest.raises(ConfigCompositionException) as err:
        compose_in(CONFIG_DIR, ["trainer.steps=ten"])
    assert isinstance(err.value.__cause__, ValidationError) and err.value.__cause__.full_key == "trainer.steps"


def test_an_appended_key_is_refused_by_the_schema_check():
    """`+key=value` adds its key even to a typed node; run() refuses it before anything is built."""
    cfg = compose_in(CONFIG_DIR, ["+trainer.stepz=3"])
    with pytest.raises(ConfigKeyError, match="stepz"):
        check_schema(cfg)
    check_schema(compose_in(CONFIG_DIR, []))   # the default job is what the schema describes


@pytest.mark.parametrize("override, line", [
    ("trainer.steps=ten", "llmopt: error: trainer.steps: Value 'ten' of type 'str' could not be converted to Integer"),
    ("optimizer.lr=abc", "llmopt: error: optimizer.lr='abc' must be a number (its default is 0.001)"),
    ("+foo=1", "llmopt: error: foo: Key 'foo' not in 'RunConfig'"),
    ("data.seq_len=4096", "llmopt: error: data.seq_len=4096 is above the model's 2048 positions"),
])
def test_the_cli_reports_a_bad_value_in_one_line(tmp_path, override, line):
    result = run_cli([override, f"output_root={tmp_path}"], cwd=tmp_path, timeout=300)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert result.stderr.startswith(line), result.stderr
    assert not any(tmp_path.iterdir()), "a refused run leaves no run directory"


def test_every_field_has_a_doc():
    def classes(cls):
        yield cls
        for f in fields(cls):
            if is_dataclass(f.default_factory):
                yield from classes(f.default_factory)
    for cls in classes(RunConfig):
        docs = field_docs(cls)
        assert {f.name for f in fields(cls)} == set(docs), cls
        assert all(docs.values()), [name for name, doc in docs.items() if not doc]


def test_help_shows_the_fields_with_their_docs_and_only_selectable_groups(tmp_path):
    result = run_cli(["--help"], cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == help_text().replace("$$", "$").strip()
    assert "  trainer.loss_head = auto\n      auto (one_pass on CUDA, else plain)" in result.stdout
    assert "  checkpoint.dir = ${hydra:runtime.output_dir}/checkpoints\n" in result.stdout
    listing = result.stdout.split("== Groups (group=option) ==")[1].split("== Settings")[0]
    groups = {line.split(":")[0].strip() for line in listing.splitlines() if line.startswith("  ")
              and not line.startswith("      ")}
    assert groups == {"model", "data", "optimizer", "lookahead", "schedule", "trainer", "logger", "experiment",
                      "local"}   # configs/accelerate holds launch configs, not a group
    assert "_base" not in result.stdout


def test_a_local_default_is_composed_last(tmp_path):
    """configs/local/default.yaml (git-ignored) sets this machine's paths, over the data config's and the
    experiment's; written in a copy of configs/, never in the checkout."""
    configs = tmp_path / "configs"
    # without this checkout's own local/default.yaml, if it has one
    shutil.copytree(CONFIG_DIR, configs, ignore=lambda folder, names: ["default.yaml"] if folder.endswith("local")
                    else [])
    assert not (configs / "local" / "default.yaml").exists()
    assert compose_in(configs, ["data=c4_local"]).data._get_node("data_dir")._value() == \
        "${oc.env:LLMOPT_DATA_DIR,../shared/data}"   # the data config's own, unresolved
    example = (CONFIG_DIR / "local" / "example.yaml").read_text()
    (configs / "local" / "default.yaml").write_text(example.replace("/data/llmopt", str(tmp_path / "data")))
    for overrides in (["data=c4_local"], ["experiment=mini_protocol"]):
        cfg = compose_in(configs, overrides)
        assert cfg.data.data_dir == str(tmp_path / "data") and cfg.output_root == "/scratch/llmopt/outputs"
    assert compose_in(configs, ["~local"]).output_root == "outputs"
