"""`python -m llmopt.report` on run directories written here as llmopt.train writes them."""

import json
import math

import pytest
import yaml

from llmopt.analysis.published import lookup_published, protocol_settings, published_numbers
from llmopt.analysis.runs import find_run_dirs, load_run_dir
from llmopt.report import build_report, main

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def write_run(root, name, *, table, row, size, optimizer, lookahead="none", steps, evals, slots_per_s,
              memory_gb, state_bytes, params, summary=True, run_name=None, llmopt_gb=None, config_changes=None):
    """A run directory: config.yaml (resolved), metrics.jsonl (log every 50 steps, eval every 1000), summary.json.

    The config follows the protocol of the published cell (table, row, size) where there is one (trainer.steps
    is the planned length: the run logs `steps` of them), then `config_changes` ({dotted key: value}) apply.
    evals: {step: (token-weighted loss, paper-compatible loss)}; memory_gb, llmopt_gb: memory/paper_gb and
    memory/llmopt_gb (llmopt_gb None: not logged).
    """
    memory = {"memory/paper_gb": memory_gb, **({"memory/llmopt_gb": llmopt_gb} if llmopt_gb is not None else {})}
    run_dir = root / name
    run_dir.mkdir(parents=True)
    config = {"run_name": run_name or name, "seed": 42, "model": {"flavor": size, "vocab_size": None},
              "optimizer": {"name": optimizer, "lr": 1e-3}, "lookahead": {"name": lookahead},
              "trainer": {"steps": steps, "global_batch_size": 512, "precision": "bf16_pure"},
              "data": {"name": "c4", "seq_len": 256},
              "logger": {"wandb": {"enabled": False, "group": table, "name": name,
                                   "tags": [f"table:{table}", f"row:{row}", f"size:{size}", "lr:0.001", "seed:42"]}}}
    for key, value in {**(protocol_settings(table, row, size) or {}), **(config_changes or {})}.items():
        *parents, last = key.split(".")
        section = config
        for part in parents:
            section = section.setdefault(part, {})
        section[last] = value
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    records = []
    for i, step in enumerate(range(50, steps + 1, 50)):
        record = {"step": step, "train/loss": 10.0 / (1 + step / 500), "train/lr": 1e-3, "train/tokens": step * 98_000,
                  "perf/token_slots_per_s": slots_per_s[i % len(slots_per_s)], "perf/step_time_s": 0.25,
                  "perf/peak_memory_gb": 21.5, "train/grad_norm": 0.8}
        if step == 50:
            record.update({"model/params": params, **memory})
        if step in evals:
            loss, paper = evals[step]
            record.update({"eval/loss": loss, "eval/ppl": math.exp(loss), "eval/tokens": 10_000_128,
                           "eval/paper_loss": paper, "eval/paper_ppl": math.exp(paper)})
        records.append(record)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if summary:
        loss, paper = evals[max(evals)]
        (run_dir / "summary.json").write_text(json.dumps({
            "step": steps, "updates_planned": steps, "tokens_seen": steps * 98_000, "skipped_steps": 0,
            "preempted": False, "eval/loss": loss, "eval/ppl": math.exp(loss), "eval/tokens": 10_000_128,
            "eval/paper_loss": paper, "eval/paper_ppl": math.exp(paper), "run_dir": str(run_dir),
            "optimizer": optimizer, "lookahead": lookahead != "none", "flavor": size, "precision": "bf16_pure",
            "params": params, "optimizer_state_bytes": state_bytes, "model/params": params, **memory}, indent=2))
    return run_dir


@pytest.fixture
def runs(tmp_path):
    root = tmp_path / "multirun"
    scale = write_run(root, "scale_60m_lr0.001_seed42", table="scale_table", row="scale", size="60m",
                      optimizer="scale", steps=2000,
                      evals={1000: (3.60, 3.58), 2000: (math.log(31.40), math.log(31.02))},
                      slots_per_s=[100_000, 300_000, 200_000, 250_000], memory_gb=0.147_5, state_bytes=32_800_000,
                      params=58_072_128, llmopt_gb=0.147_6)
    adam = write_run(root, "adam_60m_lr0.001_seed42", table="scale_table", row="adam", size="60m",
                     optimizer="adam", steps=2000,
                     evals={1000: (3.55, 3.52), 2000: (math.log(30.70), math.log(30.40))},
                     slots_per_s=[410_000, 400_000, 390_000], memory_gb=0.348_4, state_bytes=464_577_024,
                     params=58_072_128)
    sgd_ll = write_run(root, "sgd_ll_130m_lr100.0_seed42", table="sgd_ll_table", row="sgd_ll", size="130m",
                       optimizer="sgd_ll", steps=1000, evals={1000: (math.log(26.10), math.log(25.95))},
                       slots_per_s=[500_000], memory_gb=0.536_4, state_bytes=536_440_000, params=134_105_856)
    partial = write_run(root, "muon_60m_ema_nesterov_lr0.02_seed42", table="ema_nesterov",
                        row="muon+ema_nesterov", size="60m", optimizer="muon", lookahead="ema_nesterov", steps=1500,
                        evals={1000: (3.50, 3.47)}, slots_per_s=[150_000, 170_000], memory_gb=None,
                        state_bytes=None, params=58_072_128, summary=False)
    return {"root": root, "scale": scale, "adam": adam, "sgd_ll": sgd_ll, "partial": partial}


def table_rows(markdown: str, heading: str) -> list[dict]:
    """The rows of the Markdown table under `heading`, as dicts keyed by the header."""
    lines = markdown.split(heading, 1)[1].splitlines()
    end = next((i for i, line in enumerate(lines) if i > 0 and line.startswith("## ")), len(lines))
    table = [line for line in lines[:end] if line.startswith("|")]
    header = [c.strip() for c in table[0].strip("|").split("|")]
    return [dict(zip(header, (c.strip() for c in line.strip("|").split("|")))) for line in table[2:]]


def test_runs_table_numbers(runs):
    text = build_report([load_run_dir(p) for p in find_run_dirs([runs["root"]])])
    rows = {r["run"]: r for r in table_rows(text, "## Runs")}
    assert len(rows) == 4
    scale = rows["scale_60m_lr0.001_seed42"]
    assert scale == {"run": "scale_60m_lr0.001_seed42", "table/row": "scale_table/scale", "size": "60m",
                     "steps": "2000", "exact ppl": "31.40", "paper-compatible ppl": "31.02",
                     "published ppl": "30.81", "delta": "+0.21", "memory paper GB": "0.15",
                     "memory llmopt GB": "0.15", "published GB": "0.15",
                     "measured state MB": "32.8", "token slots/s": "225,000"}
    adam = rows["adam_60m_lr0.001_seed42"]
    assert (adam["paper-compatible ppl"], adam["published ppl"], adam["delta"]) == ("30.40", "30.05", "+0.35")
    assert (adam["memory paper GB"], adam["published GB"], adam["measured state MB"]) == ("0.35", "0.35", "464.6")
    assert adam["memory llmopt GB"] == "—"          # a run that did not log it
    assert adam["token slots/s"] == "400,000"
    # the SGD-LL table was published token-weighted: the delta is on the exact perplexity
    sgd_ll = rows["sgd_ll_130m_lr100.0_seed42"]
    assert (sgd_ll["exact ppl"], sgd_ll["published ppl"], sgd_ll["delta"]) == ("26.10", "25.70", "+0.40")
    assert sgd_ll["published GB"] == "—"
    # a run still going (no summary.json): its last evaluation, no published number, no measured state
    partial = rows["muon_60m_ema_nesterov_lr0.02_seed42"]
    assert (partial["table/row"], partial["steps"]) == ("ema_nesterov/muon+ema_nesterov", "1500")
    assert partial["exact ppl"] == f"{math.exp(3.50):.2f}" and partial["published ppl"] == "—"
    assert partial["measured state MB"] == "—" and partial["token slots/s"] == "160,000"


def test_runs_sharing_a_run_name_are_told_apart(tmp_path):
    common = dict(table="scale_table", row="scale", size="60m", optimizer="scale", steps=100,
                  evals={100: (3.5, 3.4)}, slots_per_s=[1.0], memory_gb=0.15, state_bytes=1, params=1,
                  run_name="scale_60m_lr0.001_seed42")
    first = write_run(tmp_path / "a", "12-00-00_scale_60m", **common)
    second = write_run(tmp_path / "a", "13-00-00_scale_60m", **common)
    third = write_run(tmp_path / "b", "13-00-00_scale_60m", **common)
    text = build_report([load_run_dir(p) for p in (first, second, third)])
    assert [r["run"] for r in table_rows(text, "## Runs")] == ["12-00-00_scale_60m", "a/13-00-00_scale_60m",
                                                                "b/13-00-00_scale_60m"]


def test_paper_layout_beside_the_published_table(runs):
    text = build_report([load_run_dir(runs[k]) for k in ("scale", "adam", "sgd_ll")])
    headline = {r["method"]: r for r in table_rows(text, "## SCALE headline table")}
    assert headline["scale"]["60m"] == "31.02 [0.15 GB] (30.81, 0.15 GB)"
    assert headline["adam"]["60m"] == "30.40 [0.35 GB] (30.05, 0.35 GB)"
    assert headline["galore"]["60m"] == "— (34.58)"                   # published rows without a run stay
    assert headline["scale"]["7b"] == "— (12.59, 13.74 GB)" and headline["stable_spam"]["1b"] == "— (13.97)"
    sgd = {r["method"]: r for r in table_rows(text, "## SGD-LL table")}
    assert sgd["sgd_ll"]["130m"] == "26.10 [0.54 GB] (25.70)" and sgd["sgd"]["1b"] == "— (51.87)"


def test_muon_memory_shows_llmopts_states_beside_the_papers(tmp_path):
    """Muon's AdamW keeps two states on the embedding, lm_head and norms: llmopt's figure beside the paper's."""
    muon = write_run(tmp_path, "muon_1b_lr0.02_seed42", table="scale_table", row="muon", size="1b",
                     optimizer="muon", steps=1000, evals={1000: (math.log(14.5), math.log(14.3))},
                     slots_per_s=[1.0], memory_gb=5.356, llmopt_gb=5.619, state_bytes=1, params=1_339_082_752)
    text = build_report([load_run_dir(muon)])
    headline = {r["method"]: r for r in table_rows(text, "## SCALE headline table")}
    assert headline["muon"]["1b"] == "14.30 [5.36 GB; llmopt 5.62 GB] (14.18, 5.36 GB)"
    run = table_rows(text, "## Runs")[0]
    assert (run["memory paper GB"], run["memory llmopt GB"], run["published GB"]) == ("5.36", "5.62", "5.36")


def test_published_numbers_from_protocol():
    arxiv, icml = published_numbers("arxiv"), published_numbers("icml")
    assert arxiv[("scale_table", "scale", "1b")].ppl == 14.25 and icml[("scale_table", "scale", "1b")].ppl == 13.49
    assert icml[("scale_table", "scale", "1b")].memory_gb == 2.81
    assert arxiv[("scale_ablation", "column_momentum", "350m")].ppl == 16.32
    assert arxiv[("sgd_ll_table", "sgd", "350m")].loss == 4.14
    # the 7B curve: the figure of the last published step the run has reached
    assert lookup_published(arxiv, "scale_table", "apollo", "7b", 80_000).ppl == 14.39
    assert lookup_published(arxiv, "scale_table", "scale", "7b", 150_001).ppl == 12.59
    assert lookup_published(arxiv, "scale_table", "scale", "7b", 39_999) is None
    assert lookup_published(arxiv, "scale_ablation", "sign_momentum", "60m", 11_001) is None
    with pytest.raises(ValueError):
        published_numbers("neurips")


def test_cli_writes_markdown_and_valid_pngs(runs, tmp_path, capsys):
    out, plots = tmp_path / "report.md", tmp_path / "plots"
    assert main([str(runs["root"]), "--out", str(out), "--plots", str(plots), "--published", "icml"]) == 0
    text = out.read_text()
    assert text.startswith("# llmopt report") and "4 run(s)" in text and "(icml version)" in text
    assert {r["run"] for r in table_rows(text, "## Runs")} == {p.name for p in runs.values() if p != runs["root"]}
    import matplotlib.image

    for name in ("loss.png", "eval_ppl.png", "memory_ppl.png"):
        data = (plots / name).read_bytes()
        assert data[:8] == PNG_SIGNATURE
        image = matplotlib.image.imread(plots / name)
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    assert "wrote" in capsys.readouterr().err


def test_cli_errors(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty")]) == 2
    assert "holds no run directory" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([])                                           # neither run directories nor a W&B group


def test_a_swept_cell_shows_the_best_of_the_longest_runs(runs):
    """An lr sweep fills one cell with several runs: the paper table shows the best (a paper reports its best lr)
    and says how many there were, whatever the directories' order."""
    for name, ppl in (("scale_60m_lr0.002_seed42", 28.50), ("scale_60m_lr0.004_seed42", 33.00)):
        write_run(runs["root"], name, table="scale_table", row="scale", size="60m", optimizer="scale", steps=2000,
                  evals={2000: (math.log(ppl + 0.3), math.log(ppl))}, slots_per_s=[1], memory_gb=0.1475,
                  state_bytes=1, params=58_072_128)
    report = build_report([load_run_dir(p) for p in find_run_dirs([runs["root"]])])
    row = next(r for r in table_rows(report, "## SCALE") if r["method"] == "scale")
    assert row["60m"].startswith("28.50 (best of 3)"), row


def test_a_run_off_the_protocol_is_not_put_beside_the_published_row(runs):
    """A tiny model run under scale_60m's name and tags (experiment=scale_table/scale_60m model=tiny ...): its
    size comes from its resolved config, and the report says why it is not compared with the published 60M row
    instead of printing a delta; a 60M run with another length or data is refused the same way."""
    tiny = write_run(runs["root"], "scale_60m_tiny", table="scale_table", row="scale", size="60m", optimizer="scale",
                     steps=100, evals={100: (math.log(40.0), math.log(39.5))}, slots_per_s=[1.0], memory_gb=0.001,
                     state_bytes=1, params=1_000, run_name="scale_60m_lr0.001_seed7",
                     config_changes={"model.flavor": "tiny", "trainer.steps": 100, "data.name": "offline"})
    short = write_run(runs["root"], "adam_60m_short", table="scale_table", row="adam", size="60m", optimizer="adam",
                      steps=100, evals={100: (math.log(50.0), math.log(49.0))}, slots_per_s=[1.0], memory_gb=0.35,
                      state_bytes=1, params=58_072_128, config_changes={"trainer.steps": 100})
    text = build_report([load_run_dir(p) for p in (runs["scale"], tiny, short)])
    rows = {r["run"]: r for r in table_rows(text, "## Runs")}
    assert rows["scale_60m_lr0.001_seed7"]["size"] == "tiny"
    assert rows["scale_60m_lr0.001_seed7"]["published ppl"] == (
        "not compared with scale_table/scale/60m: model.flavor is tiny, the paper's 60m; trainer.steps is 100, "
        "the paper's 11000; data.name is offline, the paper's c4")
    assert rows["adam_60m_short"]["published ppl"] == (
        "not compared with scale_table/adam/60m: trainer.steps is 100, the paper's 11000")
    assert rows["scale_60m_lr0.001_seed7"]["delta"] == "—"
    assert rows["adam_60m_short"]["delta"] == "—" and rows["adam_60m_short"]["published GB"] == "—"
    assert rows["scale_60m_lr0.001_seed42"]["published ppl"] == "30.81"      # the run on the protocol still is
    headline = {r["method"]: r for r in table_rows(text, "## SCALE headline table")}
    assert "tiny" not in headline["scale"]                                   # no column for the tiny run
    assert headline["scale"]["60m"] == "31.02 [0.15 GB] (30.81, 0.15 GB)"
    assert headline["adam"]["60m"] == "— (30.05, 0.35 GB)"                   # the short run stays out


def test_rows_come_from_the_resolved_config_not_the_tags(tmp_path):
    """Tags say row:scale, but the config is Adam's (optimizer=adam overridden on a SCALE experiment): the run is
    Adam's row, compared with Adam's figure."""
    run = write_run(tmp_path, "scale_60m_but_adam", table="scale_table", row="scale", size="60m", optimizer="adam",
                    steps=100, evals={100: (math.log(31.0), math.log(30.5))}, slots_per_s=[1.0], memory_gb=0.35,
                    state_bytes=1, params=58_072_128,
                    config_changes={"optimizer.name": "adam", "optimizer.normalization": None,
                                    "optimizer.momentum_on": None})
    row = table_rows(build_report([load_run_dir(run)]), "## Runs")[0]
    assert (row["table/row"], row["published ppl"], row["delta"]) == ("scale_table/adam", "30.05", "+0.45")


def test_plots_with_nothing_to_draw_are_not_written(runs, tmp_path):
    """The partial run logged no memory/paper_gb: no memory_ppl.png, and a line saying why."""
    from llmopt.report import write_plots

    lines = write_plots([load_run_dir(runs["partial"])], tmp_path / "plots")
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == ["eval_ppl.png", "loss.png"]
    memory_ppl = tmp_path / "plots" / "memory_ppl.png"
    assert lines[-1] == f"{memory_ppl} not written: no run has memory/paper_gb and a perplexity"
