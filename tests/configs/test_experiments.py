"""Every configs/experiment/**.yaml composes and says what docs/protocol.md says; the documented sweeps compose.

The expected values below are written from docs/protocol.md (sections in the comments), not
read from the experiment files: a file that drifts from the protocol fails here. A new experiment file is
found by the glob and must get its row in `expected()`.
"""

import re
import shlex
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from llmopt.optim import build_optimizer
from llmopt.train.run import optimizer_kwargs, trainer_config
from llmopt.train.schedule import build_schedule
from tests.helpers.models import micro_model

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
# the paper tables: one subdirectory per table. Files directly in configs/experiment/ are other protocols, each
# tested by its own file (mini_protocol: tests/scripts/test_mini_protocol.py). Files starting with `_` are a
# table's bases
EXPERIMENTS = sorted(str(p.relative_to(CONFIGS / "experiment").with_suffix(""))
                     for p in (CONFIGS / "experiment").rglob("*.yaml")
                     if p.parent != CONFIGS / "experiment" and not p.name.startswith("_"))
TOP_LEVEL = sorted(p.stem for p in (CONFIGS / "experiment").glob("*.yaml") if not p.name.startswith("_"))

# -- docs/protocol.md, section 1: the GaLore protocol -----------------------------------------------------------
GALORE_PROTOCOL = {"trainer.global_batch_size": 512, "trainer.precision": "bf16_pure", "trainer.grad_clip": 0.0,
                   "trainer.eval_every": 1000, "schedule.name": "cosine", "schedule.warmup_ratio": 0.1,
                   "schedule.min_lr_ratio": 0.1, "schedule.reference_quirks": True}
# steps, warmup steps, tokens (billions) per size; SCALE's 60M script runs 11K / 1.1K / 1.4B, and the SCALE README
# gives 1.4B tokens for its whole 60M column, so every 60M row of scale_table runs 11K
GP_STEPS = {"60m": (10_000, 1_000, 1.3), "130m": (20_000, 2_000, 2.6), "350m": (60_000, 6_000, 7.8),
            "1b": (100_000, 10_000, 13.1), "7b": (150_000, 15_000, 19.7)}
SCALE_60M_STEPS = (11_000, 1_100, 1.4)
C4 = {"data.name": "c4", "data.mode": "truncate_pad", "data.seq_len": 256, "data.tokenizer": "t5-base",
      "data.shuffle_seed": 42, "data.eval_tokens": 10_000_000}

# -- section 2: SCALE -----------------------------------------------------------------------------------------
# the reference's evaluation batch over all GPUs (SCALE's scripts: --batch_size x --nproc_per_node)
SCALE_EVAL_BATCH = {"60m": 2 * 256, "130m": 2 * 256, "350m": 4 * 128, "1b": 8 * 64, "7b": 8 * 32}
SCALE_LR = {"60m": 1e-3, "130m": 1e-3, "350m": 1e-3, "1b": 2e-4, "7b": 1e-4}
SCALE_ADAM_LR = {"60m": 0.02, "130m": 0.02, "350m": 0.02, "1b": 1e-3, "7b": 1e-3}   # the scripts' values
SCALE_SEED = 42   # SCALE's scripts pass --seed 42 (also its argument default); the Adam and Muon rows keep it

# -- section 5: baselines -------------------------------------------------------------------------------------
GALORE_RANK = {"60m": 128, "130m": 256, "350m": 256, "1b": 512}
APOLLO_RANK = {"60m": 128, "130m": 192, "350m": 256, "1b": 256, "7b": 256}   # 7B: not in docs/protocol.md
FIRA_ALPHA = {"60m": 0.25, "130m": 0.25, "350m": 0.25, "1b": 0.0625}
# the methods' own released scripts (GaLore scripts/benchmark_c4, Fira pre_training_c4/scripts, APOLLO
# scripts/pretrain_c4): evaluation batch over all GPUs = --batch_size x --nproc_per_node (x nodes), and the seed:
# none passed, so their torchrun mains' default 0
LOWRANK_EVAL_BATCH = {
    "galore": {"60m": 1 * 256, "130m": 1 * 256, "350m": 4 * 128, "1b": 8 * 16},
    "fira": {"60m": 1 * 256, "130m": 1 * 256, "350m": 8 * 64, "1b": 8 * 64},
    "apollo": {"60m": 1 * 256, "130m": 4 * 128, "350m": 4 * 128, "1b": 8 * 64, "7b": 8 * 16},
}
LOWRANK_EVAL_BATCH["apollo_mini"] = LOWRANK_EVAL_BATCH["apollo"]
LOWRANK_SEED = 0
# APOLLO-Mini: scale 128, except 192 (= 768 / 4) in the 130M script; the 60M and 130M scripts pass --scale_front
APOLLO_MINI_SCALE = {"60m": 128.0, "130m": 192.0, "350m": 128.0, "1b": 128.0, "7b": 128.0}
APOLLO_MINI_SCALE_FRONT = {"60m": True, "130m": True, "350m": False, "1b": False, "7b": False}

# -- section 3: SGD-LL ----------------------------------------------------------------------------------------
SGD_LL = {  # size: steps, warmup, batch, tokens (B), Adam lr, SGD-LL lr, tau
    "130m": (5_000, 500, 2048, 2.6, 3e-3, 100.0, 5e-4),
    "350m": (15_000, 1_500, 2048, 7.8, 2e-3, 200.0, 5e-4),
    "1b": (19_125, 1_912, 4096, 20.0, 2e-3, 300.0, 2e-4),
}

# -- section 4: EMA-Nesterov, as the released scripts run it (llama/train_2500iters.sh, llama/train_1b.sh) --------
EMA_SWEEP = {  # size: the batch sweep's (total batch in sequences of 256, Muon lr) pairs, in order
    "60m": [(2048, 0.03), (4096, 0.0357), (8192, 0.0424), (16384, 0.0505)],
    "130m": [(4096, 0.0424), (8192, 0.0505), (16384, 0.06), (32768, 0.0714)],
    "350m": [(12288, 0.03), (24576, 0.0357), (49152, 0.0424), (98304, 0.0505)],
    "1b": [(16384, 0.05)],
}
EMA = {  # size: steps, warmup (= decay) steps, lookahead warmup and rest, beta, gamma, eval_every
    "60m": (2500, 250, 750, 500, 0.7, 0.99, 100), "130m": (2500, 250, 750, 500, 0.7, 0.99, 100),
    "350m": (2500, 250, 750, 500, 0.5, 0.99, 100), "1b": (5000, 500, 1500, 1000, 0.5, 0.999, 250),
}


def _tags(table: str, row: str, size: str) -> dict:
    return {"logger.wandb.group": table, "tags": [f"table:{table}", f"row:{row}", f"size:{size}"]}


def scale_table(row: str, size: str) -> dict:
    steps, warmup, tokens = SCALE_60M_STEPS if size == "60m" else GP_STEPS[size]
    lowrank = row in LOWRANK_EVAL_BATCH
    exp = {**GALORE_PROTOCOL, **C4, **_tags("scale_table", row, size), "model.flavor": size,
           "optimizer.name": row, "trainer.steps": steps, "warmup": warmup, "tokens_b": tokens,
           "trainer.eval_global_batch_size": LOWRANK_EVAL_BATCH[row][size] if lowrank else SCALE_EVAL_BATCH[size],
           "seed": LOWRANK_SEED if lowrank else SCALE_SEED}
    if row == "adam":
        exp.update({"optimizer.lr": 1e-3, "optimizer.eps": 1e-8, "optimizer.weight_decay": 0.0})
    elif row == "muon":
        exp.update({"optimizer.lr": 0.02, "optimizer.momentum": 0.95, "optimizer.nesterov": True,
                    "optimizer.ns_steps": 5, "optimizer.weight_decay": 0.0, "optimizer.adam_weight_decay": 0.0})
    elif row == "galore":
        exp.update({"optimizer.lr": 0.01, "optimizer.rank": GALORE_RANK[size], "optimizer.update_proj_gap": 200,
                    "optimizer.scale": 0.25})
    elif row == "fira":
        exp.update({"optimizer.lr": 0.01, "optimizer.rank": GALORE_RANK[size], "optimizer.update_proj_gap": 200,
                    "optimizer.alpha": FIRA_ALPHA[size]})
    elif row == "apollo":
        exp.update({"optimizer.lr": 0.01, "optimizer.rank": APOLLO_RANK[size], "optimizer.update_proj_gap": 200,
                    "optimizer.scale": 1.0, "optimizer.proj": "random", "optimizer.scale_type": "channel",
                    "optimizer.scale_front": False})
    elif row == "apollo_mini":
        exp.update({"optimizer.lr": 0.01, "optimizer.rank": 1, "optimizer.update_proj_gap": 200,
                    "optimizer.scale": APOLLO_MINI_SCALE[size], "optimizer.scale_type": "tensor",
                    "optimizer.scale_front": APOLLO_MINI_SCALE_FRONT[size]})
    elif row == "scale":
        exp.update(scale_optimizer(size, "column", "output"))
    if lowrank:  # the packages' Adam defaults (the scripts pass none)
        exp.update({"optimizer.eps": 1e-6, "optimizer.betas": [0.9, 0.999], "optimizer.weight_decay": 0.0})
    return exp


def scale_optimizer(size: str, normalization: str, momentum_on: str) -> dict:
    return {"optimizer.name": "scale", "optimizer.lr": SCALE_LR[size], "optimizer.momentum": 0.9,
            "optimizer.adam_lr": SCALE_ADAM_LR[size], "optimizer.adam_betas": [0.9, 0.999],
            "optimizer.adam_eps": 1e-8, "optimizer.weight_decay": 0.0,
            "optimizer.normalization": normalization, "optimizer.momentum_on": momentum_on}


def scale_ablation(row: str, size: str) -> dict:
    normalization, _, momentum = row.partition("_")
    steps, warmup, tokens = SCALE_60M_STEPS if size == "60m" else GP_STEPS[size]
    return {**GALORE_PROTOCOL, **C4, **_tags("scale_ablation", row, size), "model.flavor": size,
            **scale_optimizer(size, normalization, "output" if momentum else "none"),
            "trainer.steps": steps, "warmup": warmup, "tokens_b": tokens,
            "trainer.eval_global_batch_size": SCALE_EVAL_BATCH[size], "seed": SCALE_SEED}


def sgd_ll_table(row: str, size: str) -> dict:
    steps, warmup, batch, tokens, adam_lr, lr, tau = SGD_LL[size]
    exp = {**C4, **_tags("sgd_ll_table", row, size), "model.flavor": size, "optimizer.name": row, "seed": 42,
           "trainer.steps": steps, "warmup": warmup, "tokens_b": tokens, "trainer.global_batch_size": batch,
           "trainer.precision": "amp_bf16", "trainer.grad_clip": 0.0, "schedule.name": "cosine",
           "schedule.warmup_ratio": 0.1, "schedule.min_lr_ratio": 0.1, "schedule.reference_quirks": False,
           "schedule.start_at_zero": True, "lookahead.name": "none",  # the SGD-LL loop: first update at lr 0
           # the authors' scripts and train_llama.py (OptimAI-Lab/large_lr_sgd): --eval_in_fp32, a 100,000-document
           # shuffle buffer for the training stream
           "trainer.eval_precision": "fp32", "data.train.shuffle_buffer": 100_000}
    exp.update({"adam": {"optimizer.lr": adam_lr, "optimizer.weight_decay": 0.0},
                "sgd": {"optimizer.lr": 0.5, "optimizer.momentum": 0.9, "optimizer.nesterov": False},
                "sgd_ll": {"optimizer.lr": lr, "optimizer.momentum": 0.9, "optimizer.tau": tau,
                           "optimizer.delta": 1e-3}}[row])
    return exp


def ema_nesterov(row: str, size: str, batch: int, lr: float) -> dict:
    steps, warmup, look_warmup, look_rest, beta, gamma, eval_every = EMA[size]
    exp = {**C4, "model.flavor": size, "optimizer.name": row, "optimizer.lr": lr, "lookahead.name": "ema_nesterov",
           "seed": 42,
           "logger.wandb.group": "ema_nesterov",
           "tags": ["table:ema_nesterov", f"row:{row}+ema_nesterov", f"size:{size}", f"batch:{batch}"],
           # on step t (0-based) when t + 1 > warmup and t < steps - rest: llmopt's [start_step, end_step)
           "lookahead.beta": beta, "lookahead.gamma": gamma, "lookahead.start_step": look_warmup,
           "lookahead.end_step": steps - look_rest, "lookahead.init": "zero", "trainer.steps": steps,
           "warmup": warmup, "decay": warmup, "tokens_b": steps * batch * 256 / 1e9,
           "trainer.global_batch_size": batch, "trainer.precision": "amp_bf16", "trainer.compile": True,
           "trainer.eval_precision": "fp32", "trainer.eval_every": eval_every, "trainer.grad_clip": 0.0,
           "schedule.name": "wsd", "schedule.decay_type": "exponential", "schedule.min_lr_ratio": 0.1,
           "schedule.reference_quirks": False, "schedule.start_at_zero": True,
           "data.train.shuffle_buffer": 100_000}
    if row == "muon":   # adam_lr = the Muon lr; AdamW betas (0.9, 0.95), eps 1e-10; weight decay 0
        exp.update({"optimizer.adam_lr": lr, "optimizer.momentum": 0.95, "optimizer.nesterov": True,
                    "optimizer.ns_steps": 5, "optimizer.adjust_lr": "original", "optimizer.weight_decay": 0.0,
                    "optimizer.adam_betas": [0.9, 0.95], "optimizer.adam_eps": 1e-10,
                    "optimizer.adam_weight_decay": 0.0})
    else:               # not in the scripts (Muon only): the Muon recipe, AdamW everywhere at the Muon lr
        exp.update({"optimizer.betas": [0.9, 0.95], "optimizer.eps": 1e-10, "optimizer.weight_decay": 0.0})
    return exp


def expected() -> dict[str, dict]:
    table = {}
    for row in ["adam", "muon", "galore", "fira", "apollo", "apollo_mini", "scale"]:
        with_7b = row in ("scale", "apollo", "apollo_mini", "muon")  # the 7B rows of section 2
        for size in ["60m", "130m", "350m", "1b"] + (["7b"] if with_7b else []):
            table[f"scale_table/{row}_{size}"] = scale_table(row, size)
    for normalization in ["sign", "row", "column", "spectral"]:
        for row in [normalization, f"{normalization}_momentum"]:
            for size in ["60m", "130m", "350m"]:
                table[f"scale_ablation/{row}_{size}"] = scale_ablation(row, size)
    for row in ["adam", "sgd", "sgd_ll"]:
        for size in SGD_LL:
            table[f"sgd_ll_table/{row}_{size}"] = sgd_ll_table(row, size)
    for row in ["muon", "adamw"]:
        for size, sweep in EMA_SWEEP.items():
            for batch, lr in sweep:
                table[f"ema_nesterov/{row}_{size}_b{batch}"] = ema_nesterov(row, size, batch, lr)
    return table


EXPECTED = expected()


@pytest.fixture(scope="module")
def hydra_configs():
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        yield


def resolved(cfg, key: str):
    """A dotted key, interpolations resolved (only that node: checkpoint.dir needs a Hydra runtime)."""
    node = OmegaConf.select(cfg, key, throw_on_missing=True)
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


def test_every_experiment_has_an_expectation_and_every_expectation_a_file():
    assert len(EXPERIMENTS) == 91
    assert TOP_LEVEL == ["mini_protocol"], "a new top-level experiment needs its own tests"
    assert set(EXPERIMENTS) == set(EXPECTED), (
        f"files without expectations: {sorted(set(EXPERIMENTS) - set(EXPECTED))}; "
        f"expectations without files: {sorted(set(EXPECTED) - set(EXPERIMENTS))}")


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_composes_with_protocol_values(hydra_configs, name):
    cfg = compose("train", overrides=[f"experiment={name}"])
    exp = EXPECTED[name]
    for key, value in exp.items():
        if key in ("tags", "warmup", "decay", "tokens_b"):
            continue
        got = resolved(cfg, key)
        assert got == pytest.approx(value) if isinstance(value, float) else got == value, f"{name}: {key}={got}"

    # W&B: the group is the table; the tags name table, row and size, then the run's own lr and seed
    tags = resolved(cfg, "logger.wandb.tags")
    assert tags[:len(exp["tags"])] == exp["tags"]
    assert tags[len(exp["tags"]):] == [f"lr:{resolved(cfg, 'optimizer.lr')}", f"seed:{exp['seed']}"]
    run_name = resolved(cfg, "run_name")
    assert run_name.startswith(name.split("/")[1].rsplit("_", 1)[0]) and "/" not in run_name

    # tokens per run and warmup steps, as the trainer's schedule computes them
    tcfg = trainer_config(cfg)
    tokens = tcfg.steps * tcfg.global_batch_size * cfg.data.seq_len
    assert abs(tokens / 1e9 - exp["tokens_b"]) < 0.07     # the papers print 7.86B as 7.8B, 19.66B as 19.7B
    param = torch.nn.Parameter(torch.zeros(1))
    schedule, _ = build_schedule(torch.optim.SGD([param], lr=1.0), steps=tcfg.steps,
                                 **OmegaConf.to_container(cfg.schedule, resolve=True))
    assert schedule.warmup == exp["warmup"] and schedule.decay == exp.get("decay", 0)
    assert schedule.num_updates == tcfg.steps + (1 if exp["schedule.reference_quirks"] else 0)
    assert (schedule.factor(0) == 0.0) == (exp["schedule.reference_quirks"] or exp.get("schedule.start_at_zero", False))

    # the micro-batch fits 1, 2, 4 and 8 GPUs; the optimizer (and lookahead) accept every hyper-parameter
    for world_size in (1, 2, 4, 8):
        assert tcfg.accumulation(world_size) >= 1
    opt_name, hparams, lookahead = optimizer_kwargs(cfg)
    assert build_optimizer(micro_model(), opt_name, lookahead=lookahead, **hparams) is not None


def test_choices_are_one_override_away(hydra_configs):
    """Where the sources disagree, the alternative is a plain override (docs/reproducing.md)."""
    cfg = compose("train", overrides=["experiment=scale_table/galore_1b", "optimizer.rank=1024"])
    assert cfg.optimizer.rank == 1024 and cfg.optimizer.name == "galore"
    cfg = compose("train", overrides=["experiment=scale_table/scale_60m", "trainer.steps=10000",
                                      "optimizer.adam_lr=${optimizer.lr}", "schedule.reference_quirks=false"])
    assert cfg.trainer.steps == 10000 and cfg.optimizer.adam_lr == pytest.approx(1e-3)
    assert cfg.schedule.reference_quirks is False
    cfg = compose("train", overrides=["experiment=scale_table/apollo_mini_130m", "optimizer.scale=128",
                                      "optimizer.scale_front=false", "trainer.eval_global_batch_size=512", "seed=42"])
    hparams = optimizer_kwargs(cfg)[1]
    assert (hparams["scale"], hparams["scale_front"], cfg.seed) == (128, False, 42)
    cfg = compose("train", overrides=["experiment=ema_nesterov/muon_60m_b2048", "lookahead=none"])
    assert optimizer_kwargs(cfg)[2] is None          # the base run: no lookahead wrapper
    assert resolved(cfg, "logger.wandb.tags")[1] == "row:muon+none"
    assert resolved(cfg, "run_name") == "muon_60m_b2048_none_lr0.03_seed42"
    cfg = compose("train", overrides=["experiment=ema_nesterov/muon_60m_b2048", "optimizer.lr=0.02",
                                      "trainer.loss_weighting=micro_batch_mean", "trainer.eval_precision=train"])
    assert cfg.optimizer.adam_lr == pytest.approx(0.02)   # follows the Muon lr, as the scripts' --adam_lr
    assert trainer_config(cfg).loss_weighting == "micro_batch_mean" and cfg.trainer.eval_precision == "train"


def sweep_commands() -> list[list[str]]:
    """The `python -m llmopt.train -m ...` commands of docs/reproducing.md, as override lists."""
    prefix = ["python", "-m", "llmopt.train", "-m"]
    commands = []
    for line in (CONFIGS.parent / "docs" / "reproducing.md").read_text().splitlines():
        words = shlex.split(line) if line.startswith("python -m llmopt.train -m ") else []
        if words[:4] == prefix:
            commands.append(words[4:])
    return commands


def test_readme_documents_local_and_slurm_sweeps():
    commands = sweep_commands()
    assert len(commands) == 10
    assert sum(any(o.startswith("hydra/launcher=slurm") for o in c) for c in commands) == 3
    assert any(any(o.startswith("optimizer.lr=") for o in c) for c in commands)
    assert any(any(o.startswith("seed=") for o in c) for c in commands)


def covering(jobs: list[list[str]]) -> list[list[str]]:
    """Jobs of a sweep such that every value of every swept key appears in at least one of them."""
    chosen, seen = [], set()
    for job in jobs:
        if not set(job) <= seen:
            chosen.append(job)
            seen |= set(job)
    return chosen


@pytest.mark.parametrize("overrides", sweep_commands(), ids=lambda c: " ".join(c)[:60])
def test_documented_sweep_composes_every_value(hydra_configs, overrides):
    """Expand a documented sweep as Hydra's basic sweeper does; compose jobs that cover every value."""
    jobs = BasicSweeper.split_arguments(OverridesParser.create().parse_overrides(overrides), None)[0]
    swept = {o.split("=", 1)[0]: o.split("=", 1)[1].split(",") for o in overrides if "," in o.split("=", 1)[1]}
    expected_jobs = 1
    for values in swept.values():
        expected_jobs *= len(values)
    assert len(jobs) == expected_jobs > 1
    names = set()
    for job in covering(jobs):
        cfg = compose("train", overrides=list(job), return_hydra_config=True)
        values = dict(o.split("=", 1) for o in job)
        table, name = values["experiment"].split("/")
        row = re.sub(r"_b\d+$", "", name).rsplit("_", 1)[0]   # <row>_<size>[_b<batch>]
        tags = resolved(cfg, "logger.wandb.tags")
        assert tags[0] == f"table:{table}" and resolved(cfg, "logger.wandb.group") == table
        if "lookahead" in values:
            assert tags[1] == f"row:{row}+{values['lookahead']}"
        else:
            assert tags[1] == f"row:{row}"
        if "optimizer.lr" in values:
            assert cfg.optimizer.lr == pytest.approx(float(values["optimizer.lr"]))
            assert f"lr:{cfg.optimizer.lr}" in tags
        if "seed" in values:
            assert cfg.seed == int(values["seed"]) and f"seed:{cfg.seed}" in tags
        if "hydra/launcher" in values:
            assert cfg.hydra.launcher._target_.endswith("SlurmLauncher")
            assert cfg.hydra.launcher.tasks_per_node == cfg.hydra.launcher.gpus_per_node
        # one run directory per job: <sweep dir>/<job number>_<run_name>
        assert OmegaConf.to_container(cfg.hydra.sweep)["subdir"] == "${hydra.job.num}_${run_name}"
        names.add(resolved(cfg, "run_name"))
    assert len(names) > 1


def test_default_lookahead_window_is_the_papers_share_of_the_run(hydra_configs):
    """lookahead=ema_nesterov without a window: the paper's 30%-80% of trainer.steps (750-2000 of 2500), so the
    lookahead is off during warmup and the final decay; m in fp32 (EMANesterov's momentum_dtype)."""
    import llmopt.train  # noqa: F401  (registers the fraction_of_steps resolver, as the entry points do)

    for steps, window in ((2500, [750, 2000]), (1000, [300, 800]), (7, [2, 6])):
        cfg = compose("train", overrides=["lookahead=ema_nesterov", f"trainer.steps={steps}"])
        look = OmegaConf.to_container(cfg.lookahead, resolve=True)
        assert [look["start_step"], look["end_step"]] == window and look["momentum_dtype"] == "float32"
    cfg = compose("train", overrides=["lookahead=ema_nesterov", "lookahead.start_step=5", "lookahead.end_step=null"])
    assert resolved(cfg, "lookahead.start_step") == 5 and resolved(cfg, "lookahead.end_step") is None


def test_every_experiment_passes_the_trainers_key_checks(hydra_configs):
    """The schema (at compose) and the builders refuse unknown keys and values of the wrong kind: no experiment
    file may hold one."""
    from llmopt.config import check_schema
    from llmopt.train.run import optimizer_kwargs, schedule_from_config, trainer_config

    for name in EXPERIMENTS:
        cfg = compose("train", overrides=[f"experiment={name}"])
        check_schema(cfg)
        schedule_from_config(cfg, trainer_config(cfg).steps)
        optimizer_kwargs(cfg)


SIZE_IN_NAME = re.compile(r"_(60m|130m|350m|1b|7b)(_|$)")


def test_no_experiment_writes_its_size_into_the_run_name_or_tags():
    """The run name and the size tag interpolate ${model.flavor}: a literal size would survive `model=`."""
    for path in (CONFIGS / "experiment").rglob("*.yaml"):
        for line in path.read_text().splitlines():
            line = line.split("#")[0]
            if line.startswith("run_name:") or "size:" in line and "batch_size" not in line:
                assert not SIZE_IN_NAME.search(line.replace("size:", "_")), f"{path.name}: {line.strip()}"


@pytest.mark.parametrize("name", ["scale_table/scale_350m", "scale_ablation/sign_350m", "sgd_ll_table/sgd_ll_1b",
                                  "ema_nesterov/muon_130m_b4096", "mini_protocol"])
def test_a_model_override_renames_the_run_and_its_size_tag(hydra_configs, name):
    """`experiment=<row> model=micro` is a micro model: its run name and size tag must say so, or llmopt.report
    and W&B put it beside the row's published number."""
    size = SIZE_IN_NAME.search(name)
    size = size.group(1) if size else "60m"  # mini_protocol
    cfg = compose("train", overrides=[f"experiment={name}", "model=micro"])
    run_name, tags = resolved(cfg, "run_name"), resolved(cfg, "logger.wandb.tags")
    assert f"_{size}_" not in f"_{run_name}_", run_name
    if name not in TOP_LEVEL:  # the mini-protocol's run names hold no size (one model, named by its RUNS key)
        assert "_micro_" in f"_{run_name}_", run_name
    assert "size:micro" in tags and f"size:{size}" not in tags, tags
