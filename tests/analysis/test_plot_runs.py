"""scripts/plot_runs.py and llmopt.analysis.plots on real short runs: the micro model trained by several
optimizers with the diagnostics on, metrics.jsonl and config.yaml written as the trainer writes them."""

import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from llmopt.analysis import plots
from llmopt.analysis.runs import load_runs
from llmopt.metrics.diagnostics import MATRIX_KINDS, Diagnostics
from llmopt.metrics.loggers import JsonlLogger
from llmopt.model import build_model, llama_config
from llmopt.optim import build_optimizer

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "plot_runs.py"
STEPS, EVERY, EVAL_EVERY = 40, 4, 20
RUNS = {  # dir name: (optimizer, hyper-parameters, lookahead)
    "adamw": ("adamw", {"lr": 3e-3}, None),
    "sgd_ll": ("sgd_ll", {"lr": 10.0, "tau": 5e-3, "delta": 2.5e-3}, None),
    "muon": ("muon", {"lr": 0.02, "adam_lr": 3e-3}, None),
    "scale_ema": ("scale", {"lr": 3e-3, "adam_lr": 3e-3}, {"beta": 0.5, "gamma": 0.9}),
}


def batches(n, batch=8, seq=32, vocab=128, seed=0):
    """A learnable stream: x_{t+1} = 5 x_t + 3 mod vocab from a random start."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, vocab, (n, batch, 1), generator=g)
    out = [start]
    for _ in range(seq - 1):
        out.append((out[-1] * 5 + 3) % vocab)
    return torch.cat(out, dim=-1)


def make_run(run_dir: Path, name: str, hparams: dict, lookahead) -> None:
    run_dir.mkdir(parents=True)
    model = build_model(llama_config("micro"), seed=0)
    opt = build_optimizer(model, name, lookahead=lookahead, **hparams)
    diag = Diagnostics(model, opt, every=EVERY)
    cfg = {"optimizer": {"name": name, **hparams}, "model": {"flavor": "micro"},
           "lookahead": {"name": "ema_nesterov" if lookahead else "none"}}
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg))
    logger = JsonlLogger(run_dir / "metrics.jsonl")
    train, held_out = batches(STEPS), batches(2, seed=1)
    for update in range(STEPS):
        tokens = train[update]
        if hasattr(opt, "pre_forward"):
            opt.pre_forward()
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        diag.before_step(update)
        opt.step()
        diag.after_step(update)
        opt.zero_grad()
        step = update + 1
        metrics = {}
        if step % EVERY == 0:
            metrics["train/loss"] = loss.item()
            diag.observe_loss(metrics["train/loss"])
        if diag.due(step):
            metrics.update(diag.collect())
        if step % EVAL_EVERY == 0:
            with torch.no_grad():
                metrics["eval/loss"] = sum(model(input_ids=t, labels=t).loss.item() for t in held_out) / 2
        if metrics:
            logger.log(metrics, step=step)
    logger.close()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    for dirname, (name, hparams, lookahead) in RUNS.items():
        make_run(root / dirname, name, hparams, lookahead)
    return root


def plot_runs(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True, cwd=ROOT,
                          timeout=120)


def test_script_writes_readable_figures(runs, tmp_path):
    out = tmp_path / "figs"
    proc = plot_runs(*(runs / d for d in RUNS), "--out", out)
    assert proc.returncode == 0, proc.stderr
    import matplotlib.image as mpimg

    expected = {"loss.png", "update_rms.png", "weight_grad_ratio.png", "distance_from_init.png",
                "token_grad_norms.png", "eff_lr.png", "sgd_ll_clips.png"}
    assert {p.name for p in out.iterdir()} == expected
    for name in expected:
        img = mpimg.imread(out / name)[..., :3]
        assert img.shape[0] > 300 and img.shape[1] > 500, name
        ink = (img.mean(axis=-1) < 0.9).mean()         # share of non-white pixels: axes, lines, text
        colors = len({tuple(c) for c in (img[::4, ::4].reshape(-1, 3) * 255).astype(int).tolist()})
        assert 0.01 < ink < 0.6 and colors > 20, (name, ink, colors)


def test_figures_hold_every_run_and_layer(runs):
    loaded = load_runs([runs / d for d in RUNS])
    assert [r.label for r in loaded] == ["adamw (micro)", "sgd_ll (micro)", "muon (micro)",
                                         "scale+ema_nesterov (micro)"]
    for run in loaded:
        xs, ys = run.series("train/loss")
        assert xs == list(range(EVERY, STEPS + 1, EVERY)) and ys[-1] < ys[0]   # a real run: it learns
        assert run.blocks() == [0, 1]
        series = plots.layer_series(run, "update_rms")
        assert set(series) == {"0", "1", "embed", "head", "final_norm"}
        assert series["0"][0] == list(range(EVERY, STEPS + 1, EVERY))
    # the per-block line is the geometric mean of the block's matrices
    run = loaded[0]
    rec = run.metrics[-1]
    expected = math.exp(sum(math.log(rec[f"diag/1/{k}/update_rms"]) for k in MATRIX_KINDS) / 7)
    assert plots.layer_series(run, "update_rms")["1"][1][-1] == pytest.approx(expected)
    assert plots.layer_series(run, "update_rms", kind="v")["1"][1][-1] == pytest.approx(rec["diag/1/v/update_rms"])

    figs, left_out = plots.make_figures(loaded)
    assert left_out == {}
    loss_ax = figs["loss.png"].axes[0]
    labels = [line.get_label() for line in loss_ax.get_lines()]
    assert sum(label.endswith(" train") for label in labels) == 4 and sum(" eval " in label for label in labels) == 4
    panels = [ax for ax in figs["update_rms.png"].axes if ax.get_visible() and ax.get_lines()]
    assert len(panels) == 4 and all(len(ax.get_lines()) == 5 for ax in panels)
    # SCALE's matrices carry no momentum: their ||w||/||m|| panel shows only the head and norms
    ratio_titles = [ax.get_title() for ax in figs["weight_grad_ratio.png"].axes if ax.get_lines()]
    assert sum("||w|| / ||g||" in t for t in ratio_titles) == 4
    scale_m = plots.layer_series(loaded[3], "w_over_m")
    assert set(scale_m) == {"head", "final_norm"}
    names, rel = plots._layer_distance(loaded[0])
    assert names == ["embed", "0", "1", "final_norm", "head"] and all(r > 0 for r in rel)
    eff_panels = [ax for ax in figs["eff_lr.png"].axes if ax.get_visible() and ax.get_lines()]
    assert len(eff_panels) == 3                   # AdamW, Muon's AdamW part, SCALE's 1-D AdamW
    import matplotlib.pyplot as plt

    for fig in figs.values():
        plt.close(fig)


def test_a_bad_path_is_one_line_naming_it(tmp_path):
    missing = tmp_path / "no_such_run"
    proc = plot_runs(missing, "--out", tmp_path / "figs")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [f"plot_runs: error: {missing} is not a directory"]
    (tmp_path / "empty").mkdir()
    proc = plot_runs(tmp_path / "empty", "--out", tmp_path / "figs")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and f"{tmp_path / 'empty'} holds no run directory" in proc.stderr
    assert not (tmp_path / "figs").exists()


def test_figures_with_nothing_to_draw_are_not_written(tmp_path):
    """A run without diagnostics (only its loss logged): loss.png, and one line for each figure left out."""
    run_dir = tmp_path / "adamw_no_diag"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(yaml.safe_dump({"optimizer": {"name": "adamw"}, "model": {"flavor": "micro"}}))
    logger = JsonlLogger(run_dir / "metrics.jsonl")
    for step in range(1, 11):
        logger.log({"train/loss": 5.0 - 0.1 * step}, step=step)
    logger.close()
    out = tmp_path / "figs"
    proc = plot_runs(run_dir, "--out", out)
    assert proc.returncode == 0, proc.stderr
    assert [p.name for p in out.iterdir()] == ["loss.png"]
    left_out = {line.split(" not written: ")[0] for line in proc.stdout.splitlines() if " not written: " in line}
    assert left_out == {str(out / name) for name in plots.FIGURES if name != "loss.png"}
    assert f"{out / 'update_rms.png'} not written: no run has diag/<tensor>/update_rms" in proc.stdout


def test_a_multirun_directory_is_read(runs, tmp_path):
    """Hydra's outputs/multirun/<date>/<time>/ with its numbered job directories: every job is a run."""
    sweep = tmp_path / "multirun" / "2026-12-07" / "12-00-00"
    for number, dirname in enumerate(("adamw", "muon")):
        shutil.copytree(runs / dirname, sweep / f"{number}_{dirname}_micro")
    (sweep / "multirun.yaml").write_text("hydra: {}\n")
    out = tmp_path / "figs"
    proc = plot_runs(sweep, "--out", out)
    assert proc.returncode == 0, proc.stderr
    assert (out / "loss.png").is_file() and (out / "update_rms.png").is_file()
    loaded = load_runs([tmp_path / "multirun"])
    assert [r.label for r in loaded] == ["adamw (micro)", "muon (micro)"]
    assert [Path(r.source).name for r in loaded] == ["0_adamw_micro", "1_muon_micro"]
