"""The mini-protocol and what it is built on: document ranges of local files, extra held-out sets, the model
cache that reuses one model across runs, scripts/mini_protocol.py end to end, configs/experiment/mini_protocol.

Everything runs on the CPU with the micro model on the real text of ../shared/data (a few steps each).
"""

from __future__ import annotations

import contextlib
import gzip
import importlib.util
import io
import json
import lzma
import math
import tarfile
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from llmopt.data import build_data, parse_config
from llmopt.data.config import FileSpec
from llmopt.data.sources import build_source, read_local_files, resolve_files
from tests.helpers.models import lm_loss, micro_model, random_batches
from tests.helpers.paths import SHARED_DATA
from tests.helpers.train import C4_SMALL, ROOT, compose_config, metrics

SPM = SHARED_DATA / "tokenizers" / "llmopt-en-32k.model"
ENWIKI_00 = SHARED_DATA / "enwiki" / "enwiki-00.jsonl.xz"
EVAL_METRICS = ("loss", "ppl", "tokens", "paper_loss", "paper_ppl")


def load_script():
    spec = importlib.util.spec_from_file_location("mini_protocol_script", ROOT / "scripts" / "mini_protocol.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


mp = load_script()


# ---- document ranges of local files (FileSpec) ---------------------------------------------------------
DOCS = [f"document number {i}: the {i}th of ten short texts" for i in range(10)]


@pytest.fixture
def numbered(tmp_path) -> Path:
    path = tmp_path / "numbered.jsonl"
    path.write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(DOCS)))
    return path


def cfg_with(train_files, eval_files, **over) -> dict:
    cfg = {"name": "ranges", "mode": "truncate_pad", "seq_len": 32, "tokenizer": str(SPM),
           "train": {"type": "local", "files": train_files, "shuffle_buffer": 0},
           "eval": {"type": "local", "files": eval_files, "shuffle_buffer": 0},
           "eval_tokens": None, "shuffle_seed": 1, "num_workers": 0}
    cfg.update(over)
    return cfg


def texts(cfg: dict, role: str = "train") -> list[str]:
    parsed = parse_config(cfg)
    if role.startswith("extra_eval."):
        src = build_source(parsed, role, 0, parsed.extra_eval[role.split(".", 1)[1]])
    else:
        src = build_source(parsed, role, 0)
    out = []
    for text, error in src.records(epoch=0):
        assert error is None
        out.append(text)
    return out


def test_start_and_stop_split_a_file_into_disjoint_parts(numbered):
    cfg = cfg_with([{"path": str(numbered), "start": 3}], [{"path": str(numbered), "stop": 3}])
    parsed = parse_config(cfg)
    assert parsed.train.files == (FileSpec(str(numbered), 3, None),)
    assert parsed.eval.files == (FileSpec(str(numbered), 0, 3),)
    train, held_out = texts(cfg, "train"), texts(cfg, "eval")
    assert held_out == DOCS[:3] and train == DOCS[3:]
    assert not set(train) & set(held_out) and held_out + train == DOCS   # disjoint; together every document
    # the ranges are part of the stream's identity (resume checks); a plain entry leaves the fingerprint as before
    assert build_source(parsed, "train", 0).fingerprint["doc_ranges"] == [[3, None]]
    plain = parse_config(cfg_with([str(numbered)], [str(numbered)]))
    assert "doc_ranges" not in build_source(plain, "train", 0).fingerprint
    assert texts(cfg_with([str(numbered)], [str(numbered)])) == DOCS


def test_start_and_stop_together_globs_and_plain_entries(numbered, tmp_path):
    assert texts(cfg_with([{"path": str(numbered), "start": 2, "stop": 5}], [str(numbered)])) == DOCS[2:5]
    assert texts(cfg_with([{"path": str(numbered), "start": 9, "stop": 10}], [str(numbered)])) == DOCS[9:]
    assert texts(cfg_with([{"path": str(numbered), "stop": 1000}], [str(numbered)])) == DOCS   # stop past the end
    assert texts(cfg_with([{"path": str(numbered), "start": 0, "stop": None}], [str(numbered)])) == DOCS
    # a glob: the range applies to each matching file; a plain entry next to it keeps its whole file
    other = tmp_path / "numbered_b.jsonl"
    other.write_text("".join(json.dumps({"text": "b " + t}) + "\n" for t in DOCS))
    got = texts(cfg_with([{"path": str(tmp_path / "numbered*.jsonl"), "start": 8}, str(numbered)], [str(numbered)]))
    assert sorted(got) == sorted(DOCS[8:] + ["b " + t for t in DOCS[8:]] + DOCS)  # interleaved, so any order
    # relative paths resolve against data_dir, as plain entries do
    rel = cfg_with([{"path": "numbered.jsonl", "start": 7}], ["numbered.jsonl"], data_dir=str(tmp_path))
    assert texts(rel) == DOCS[7:]
    # the reader itself: one (start, stop) per file
    records = read_local_files([str(numbered), str(other)], "auto", "text", "paragraph", [(1, 2), (0, 1)])
    assert [r["text"] for r in records] == [DOCS[1], "b " + DOCS[0]]


def test_plain_text_documents_are_counted_like_json_lines(tmp_path):
    path = tmp_path / "paras.txt"
    path.write_text("\n\n".join(DOCS) + "\n")
    assert texts(cfg_with([{"path": str(path), "start": 4, "stop": 6}], [str(path)])) == DOCS[4:6]


def test_start_beyond_the_file_fails_when_read(numbered):
    cfg = cfg_with([{"path": str(numbered), "start": 10}], [str(numbered)])
    parse_config(cfg)   # a file's length is unknown until it is read
    with pytest.raises(ValueError, match=r"numbered.jsonl holds 10 documents, so start=10 keeps none"):
        texts(cfg)
    with pytest.raises(ValueError, match=r"holds 10 documents, so start=25 keeps none"):
        list(read_local_files([str(numbered)], "auto", "text", "paragraph", [(25, None)]))


@pytest.mark.parametrize("entry, message", [
    ({"start": 5, "stop": 5}, r"data\.train\.files\[0\]: stop \(5\) must be greater than start \(5\)"),
    ({"start": 6, "stop": 2}, r"data\.train\.files\[0\]: stop \(2\) must be greater than start \(6\)"),
    ({"stop": 0}, r"data\.train\.files\[0\]\.stop must be an integer >= 1, got 0"),
    ({"start": -1}, r"data\.train\.files\[0\]\.start must be an integer >= 0, got -1"),
    ({"start": "3"}, r"data\.train\.files\[0\]\.start must be an integer >= 0, got '3'"),
    ({"start": 1.5}, r"data\.train\.files\[0\]\.start must be an integer"),
    ({"start": True}, r"data\.train\.files\[0\]\.start must be an integer"),
    ({"stop": "end"}, r"data\.train\.files\[0\]\.stop must be an integer"),
    ({"first": 3}, r"data\.train\.files\[0\]: unknown key\(s\) \['first'\]"),
    ({"path": None, "start": 3}, r"data\.train\.files\[0\] must be a path \(or glob\), or a mapping"),
    ({"path": "", "start": 3}, r"data\.train\.files\[0\] must be a path \(or glob\), or a mapping"),
    ({"path": 7}, r"data\.train\.files\[0\] must be a path"),
    ({"path": ["a", "b"]}, r"data\.train\.files\[0\] must be a path"),
])
def test_bad_file_entries_name_the_key(numbered, entry, message):
    spec = {"path": str(numbered), **entry}
    with pytest.raises(ValueError, match=message):
        parse_config(cfg_with([spec], [str(numbered)]))


@pytest.mark.parametrize("files, message", [
    ([7], r"data\.train\.files\[0\] must be a path"),
    ([""], r"data\.train\.files\[0\] must be a path"),
    ("one.jsonl", r"data\.train\.files must be a non-empty list"),
    ([], r"data\.train\.files must be a non-empty list"),
])
def test_bad_files_lists_name_the_key(numbered, files, message):
    with pytest.raises(ValueError, match=message):
        parse_config(cfg_with(files, [str(numbered)]))


# ---- extra held-out sets ---------------------------------------------------------------------------------
@pytest.mark.parametrize("extra, message", [
    ({"loss": None}, r"data\.extra_eval: 'loss' cannot name an eval set"),
    ({"ppl": None}, r"'ppl' cannot name"),
    ({"tokens": None}, r"'tokens' cannot name"),
    ({"paper_loss": None}, r"'paper_loss' cannot name"),
    ({"paper_ppl": None}, r"'paper_ppl' cannot name"),
    ({"Wiki": None}, r"'Wiki' cannot name"),
    ({"1wiki": None}, r"'1wiki' cannot name"),
    ({"wiki/a": None}, r"'wiki/a' cannot name"),
    ({"wiki": {"type": "local"}}, r"data\.extra_eval\.wiki\.files must be a non-empty list"),
    ({"wiki": {"type": "hdfs"}}, r"data\.extra_eval\.wiki\.type must be one of"),
    ({"wiki": {"type": "local", "files": ["x.jsonl"], "shuffle": 1}},
     r"data\.extra_eval\.wiki \(type local\): unknown key\(s\) \['shuffle'\]"),
    ({"wiki": {"type": "local", "files": [{"path": "x.jsonl", "stop": 0}]}},
     r"data\.extra_eval\.wiki\.files\[0\]\.stop must be an integer >= 1"),
    (["wiki"], r"data\.extra_eval must be a mapping"),
])
def test_bad_extra_eval_names_the_key(numbered, extra, message):
    if isinstance(extra, dict):
        extra = {k: v if v is not None else {"type": "local", "files": [str(numbered)]} for k, v in extra.items()}
    with pytest.raises(ValueError, match=message):
        parse_config(cfg_with([str(numbered)], [str(numbered)], extra_eval=extra))


def test_extra_held_out_sets_are_their_own_sources(numbered, sp_ids):
    head = {"type": "local", "files": [{"path": str(numbered), "stop": 3}], "shuffle_buffer": 0}
    tail = {"type": "local", "files": [{"path": str(numbered), "start": 3}], "shuffle_buffer": 0}
    cfg = cfg_with([{"path": str(numbered), "start": 3}], [{"path": str(numbered), "stop": 3}],
                   extra_eval={"tail": tail, "head_2": head})
    assert list(parse_config(cfg).extra_eval) == ["tail", "head_2"]
    assert texts(cfg, "extra_eval.tail") == DOCS[3:] and texts(cfg, "extra_eval.head_2") == DOCS[:3]
    data = build_data(cfg, micro_batch_size=2)
    assert data.extra_eval_names == ["tail", "head_2"]

    def first_tokens(name):   # truncate_pad: one document per sequence, its tokens then EOS
        rows = []
        for batch in data.eval_batches(4, name):
            for ids, mask in zip(batch["input_ids"], batch["attention_mask"]):
                rows.append(ids[: int(mask.sum())].tolist())
        return rows

    assert first_tokens(None) == [sp_ids(t) for t in DOCS[:3]]
    assert first_tokens("tail") == [sp_ids(t) for t in DOCS[3:]]
    assert first_tokens("head_2") == first_tokens(None)
    assert data.held_out_set(None) is data.eval_set and data.held_out_set("tail").num_sequences == 7
    with pytest.raises(KeyError, match=r"no held-out set 'nope'.*\['tail', 'head_2'\]"):
        data.held_out_set("nope")
    assert build_data(cfg_with([str(numbered)], [str(numbered)]), micro_batch_size=2).extra_eval_names == []


@pytest.fixture(scope="module")
def sp_ids():
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(SPM))
    return lambda text: sp.encode(text)[:31] + [1]   # seq_len 32: up to 31 tokens, then EOS (id 1)


# ---- configs/data/wiki_c4_local.yaml on the real data -------------------------------------------------
def test_wiki_c4_local_holds_out_the_first_100_articles():
    raw = OmegaConf.to_container(compose_config(["data=wiki_c4_local"]).data, resolve=True)   # with data/_base
    cfg = parse_config(raw)
    assert cfg.train.files[0] == FileSpec("enwiki/enwiki-00.jsonl.xz", start=100, stop=None)
    assert [f.start for f in cfg.train.files[1:]] == [0, 0, 0]
    assert {f.path for f in cfg.train.files} == {"enwiki/enwiki-00.jsonl.xz", "enwiki/enwiki-01.jsonl.xz",
                                                 "enwiki/enwiki-02.jsonl.xz", "c4/c4-train.sample.jsonl.gz"}
    assert list(cfg.extra_eval) == ["wiki"]
    assert cfg.extra_eval["wiki"].files == (FileSpec("enwiki/enwiki-00.jsonl.xz", start=0, stop=100),)
    assert cfg.extra_eval["wiki"].shuffle_buffer == 0 and cfg.eval.shuffle_buffer == 0
    assert [f.path for f in cfg.eval.files] == ["c4/c4-validation.sample.jsonl.gz"]
    train_files = resolve_files(cfg, cfg.train, "train")
    assert Path(train_files[0][0]).resolve() == ENWIKI_00.resolve() and train_files[0][1:] == (100, None, 1.0)

    with lzma.open(ENWIKI_00, "rt", encoding="utf-8") as f:
        articles = [json.loads(next(f))["text"] for _ in range(102)]
    wiki = [t for t, _ in build_source(cfg, "extra_eval.wiki", 0, cfg.extra_eval["wiki"]).records(0)]
    assert wiki == articles[:100]
    # the training stream's enwiki-00 starts right after them (the first record only: no whole shard read)
    first = next(read_local_files([train_files[0][0]], "auto", "text", "paragraph", [train_files[0][1:3]]))
    assert first["text"] == articles[100] and first["text"] not in wiki

    # both held-out sets hold the eval_tokens budget (tokenizing the 100 articles and the C4 sample: < 1 s);
    # a set too small would fail only at the first evaluation, 250 steps into a GPU run
    data = build_data({**raw, "num_workers": 0}, micro_batch_size=4)
    assert data.extra_eval_names == ["wiki"]
    wiki_set, c4_set = data.held_out_set("wiki"), data.held_out_set(None)
    for held_out in (wiki_set, c4_set):
        assert cfg.eval_tokens <= held_out.num_tokens < cfg.eval_tokens + cfg.seq_len
        assert held_out.num_sequences == held_out.num_tokens // 256
    a, b = next(data.eval_batches(4, "wiki")), next(data.eval_batches(4))
    assert not torch.equal(a["input_ids"], b["input_ids"])


# ---- the trainer: extra held-out sets, and one model reused across runs ------------------------------
SAME_AS_EVAL = "+data.extra_eval.x=${data.eval}"
OTHER = "+data.extra_eval.other={type:local,files:[c4/c4-train.sample.jsonl.gz],shuffle_buffer:0}"
CACHE_RUN = [*C4_SMALL, "trainer.steps=4", "trainer.eval_every=2", "optimizer=adamw", "optimizer.lr=3e-3",
             "checkpoint.final=false", SAME_AS_EVAL, OTHER]


class SpyCache:
    """A ModelCache that records what each get() returned and whether it built the model."""

    def __init__(self):
        from llmopt.train.run import ModelCache

        self.cache = ModelCache()
        self.calls = []

    def get(self, key, build):
        built = []

        def spy():
            built.append(True)
            return build()

        out = self.cache.get(key, spy)
        self.calls.append({"key": key, "model": out[0], "loss_model": out[1], "built": bool(built),
                           "trained": None})
        return out


@pytest.fixture(scope="module")
def cache_runs(tmp_path_factory):
    """One run without a cache, then two runs of the same config through one cache."""
    from llmopt.train.run import run
    from llmopt.train.rundir import format_summary

    tmp = tmp_path_factory.mktemp("cache")
    spy = SpyCache()
    out = {}
    for name, models in [("plain", None), ("first", spy), ("second", spy)]:
        cfg = compose_config([f"checkpoint.dir={tmp / name / 'checkpoints'}", *CACHE_RUN])
        summary = run(cfg, tmp / name, models=models)
        if models is not None:   # the weights the run ended with, before the next run resets them
            spy.calls[-1]["trained"] = {k: v.clone() for k, v in spy.calls[-1]["model"].state_dict().items()}
        out[name] = {"summary": summary, "records": metrics(tmp / name), "text": format_summary(summary)}
    return out, spy


def test_extra_eval_set_equal_to_the_main_one_gives_the_same_numbers(cache_runs):
    runs, _ = cache_runs
    summary, records = runs["plain"]["summary"], runs["plain"]["records"]
    for m in EVAL_METRICS:
        assert f"eval/x/{m}" in summary and f"eval/other/{m}" in summary, m
    assert summary["eval/x/loss"] == summary["eval/loss"] and summary["eval/x/tokens"] == summary["eval/tokens"]
    assert summary["eval/x/paper_loss"] == summary["eval/paper_loss"]
    assert summary["eval/x/ppl"] == pytest.approx(math.exp(summary["eval/x/loss"]))
    # another source: another set (C4 train documents, same budget), another loss
    assert summary["eval/other/loss"] != summary["eval/loss"] and abs(summary["eval/other/loss"] - 10) < 1
    assert summary["eval/other/tokens"] > 3000 and summary["eval/tokens"] > 3000   # targets: one less per sequence
    evals = [r for r in records if "eval/loss" in r]
    assert [r["step"] for r in evals] == [2, 4]
    for r in evals:   # every evaluation logs every set
        assert {f"eval/{s}{m}" for s in ("", "x/", "other/") for m in EVAL_METRICS} <= set(r), sorted(r)
        assert r["eval/x/loss"] == r["eval/loss"]
    assert evals[1]["eval/loss"] < evals[0]["eval/loss"]       # trained between the two
    assert "eval loss, x set" in runs["plain"]["text"] and "eval loss, other set" in runs["plain"]["text"]


def test_model_cache_reuses_the_model_with_its_initial_weights(cache_runs):
    runs, spy = cache_runs
    first, second = spy.calls
    assert first["built"] and not second["built"]
    assert first["key"] == second["key"]
    assert second["model"] is first["model"] and second["loss_model"] is first["loss_model"]
    assert len(spy.cache._entries) == 1
    # the first run moved the weights: without the reset the second run would start from them
    initial = spy.cache._entries[first["key"]][1]   # (what build() returned, the initial weights)
    moved = [k for k in initial if not torch.equal(first["trained"][k].cpu(), initial[k])]
    assert moved and "model.embed_tokens.weight" in moved

    def train_losses(name):
        return [(r["step"], r["train/loss"]) for r in runs[name]["records"] if "train/loss" in r]

    assert [s for s, _ in train_losses("plain")] == [1, 2, 3, 4]
    assert train_losses("first") == train_losses("plain")
    assert train_losses("second") == train_losses("plain")
    for key in ("eval/loss", "eval/x/loss", "eval/other/loss", "eval/tokens", "tokens_seen"):
        assert runs["second"]["summary"][key] == runs["first"]["summary"][key] == runs["plain"]["summary"][key], key
    evals = {name: [r["eval/loss"] for r in runs[name]["records"] if "eval/loss" in r] for name in runs}
    assert evals["second"] == evals["first"] == evals["plain"]


def test_model_cache_keys_keep_different_models_apart():
    from llmopt.train.run import ModelCache

    cache = ModelCache()
    builds = []

    def build(seed):
        def make():
            builds.append(seed)
            model = micro_model(seed=seed)
            return model, model
        return make

    a, _ = cache.get(("micro", 0), build(0))
    b, _ = cache.get(("micro", 1), build(1))
    assert b is not a and builds == [0, 1]
    with torch.no_grad():
        for p in a.parameters():
            p.add_(1.0)
    ptrs = [p.data_ptr() for p in a.parameters()]
    again, _ = cache.get(("micro", 0), build(0))
    assert again is a and builds == [0, 1]
    assert [p.data_ptr() for p in again.parameters()] == ptrs   # copied into the same tensors
    fresh = micro_model(seed=0)
    for (name, p), q in zip(again.named_parameters(), fresh.parameters()):
        assert torch.equal(p, q), name


# ---- scripts/mini_protocol.py end to end ------------------------------------------------------------------
TINY = ["model=micro", "model.vocab_size=32000", "data.seq_len=64", "data.num_workers=0", "data.eval_tokens=2000",
        "trainer.steps=4", "trainer.global_batch_size=8", "trainer.micro_batch_size=4", "trainer.eval_every=2",
        "trainer.eval_batch_size=8", "trainer.compile=false", "trainer.log_every=1", "diagnostics.every=2"]


def main(*argv) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert mp.main([str(a) for a in argv]) == 0
    return out.getvalue()


@pytest.fixture(scope="module")
def protocol(tmp_path_factory):
    """Four invocations into one --out: two runs; the same again (skipped); SGD at lr 0.5 forced to diverge by an
    infinite lr (--set wins over the run's own override; a merely huge lr can leave the micro model stuck at the
    uniform prediction with zero gradients, finite); then the lower SGD lr runs that depend on it."""
    tmp = tmp_path_factory.mktemp("protocol")
    dirs = ["--out", tmp / "out", "--work", tmp / "work", "--archive", tmp / "archive"]
    logs = {"first": main(*dirs, "--runs", "adamw_lr1e-3", "column_lr1e-3", "--set", *TINY)}
    mtimes = {p: p.stat().st_mtime_ns for p in (tmp / "out").glob("*/result.json")}
    logs["again"] = main(*dirs, "--runs", "adamw_lr1e-3", "column_lr1e-3", "--set", *TINY)
    logs["again_mtimes"] = mtimes
    logs["diverge"] = main(*dirs, "--runs", "sgd_lr0.5", "--set", *TINY, "optimizer.lr=inf")
    logs["lower"] = main(*dirs, "--runs", "sgd_lr0.2", "sgd_lr0.1", "sgd_lr0.05", "--set", *TINY)
    return tmp, logs


def result(tmp: Path, name: str) -> dict:
    return json.loads((tmp / "out" / name / "result.json").read_text())


def test_protocol_runs_write_results_and_archives(protocol):
    tmp, logs = protocol
    adamw, column = result(tmp, "adamw_lr1e-3"), result(tmp, "column_lr1e-3")
    for res, name in ((adamw, "adamw_lr1e-3"), (column, "column_lr1e-3")):
        assert res["name"] == name and res["overrides"] == mp.RUNS[name] + TINY
        assert res["diverged"] is None and res["steps"] == 4 and res["tokens_seen"] > 0
        assert sorted(res["evals"], key=int) == ["2", "4"]
        for step in ("2", "4"):
            assert set(res["evals"][step]) == {"c4", "wiki"}
            for s in ("c4", "wiki"):
                e = res["evals"][step][s]
                assert 5 < e["loss"] < 12 and e["ppl"] == pytest.approx(math.exp(e["loss"]))
                assert e["paper_loss"] < e["loss"]
        assert res["evals"]["4"]["c4"]["loss"] != res["evals"]["4"]["wiki"]["loss"]   # two different sets
        assert res["tokens_per_s"] > 0 and math.isfinite(res["final_train_loss"])
        assert res["peak_memory_gb"] > 0 and res["device"] == "cpu" and res["wall_s"] > 0
        assert f"[mini_protocol] {name}: optimizer=" in logs["first"]
        # what scripts/plot_runs.py reads: the config and the metrics, next to result.json
        cfg = OmegaConf.load(tmp / "out" / name / "config.yaml")
        assert cfg.model.flavor == "micro" and cfg.data.name == "wiki_c4_local" and cfg.trainer.steps == 4
        records = [json.loads(line) for line in gzip.decompress(
            (tmp / "out" / name / "metrics.jsonl.gz").read_bytes()).decode().splitlines()]
        assert [r["step"] for r in records if "eval/wiki/loss" in r] == [2, 4]
        with tarfile.open(tmp / "archive" / f"{name}.tar.gz") as tar:
            names = set(tar.getnames())
            assert {f"{name}/result.json", f"{name}/config.yaml", f"{name}/metrics.jsonl.gz"} <= names
            assert json.loads(tar.extractfile(f"{name}/result.json").read()) == res
    assert not list((tmp / "out").glob(".*partial"))
    # SCALE without momentum keeps only AdamW's state of the 1-D parameters (the RMSNorm weights): 2 bf16
    # tensors per weight of the 5 norms of 32; AdamW keeps 2 per parameter of the whole model
    params = sum(p.numel() for p in micro_model().parameters()) + (32000 - 128) * 32 * 2
    assert adamw["optimizer_state_gb"] == pytest.approx(2 * 2 * params / 1e9, rel=1e-4)
    assert column["optimizer_state_gb"] == pytest.approx(2 * 2 * 5 * 32 / 1e9, rel=0.1)
    assert 0 < column["optimizer_state_gb"] < 1e-3 * adamw["optimizer_state_gb"]


def test_every_run_starts_from_the_same_weights_and_data(protocol):
    """train/loss at step 1 is the loss of the initial weights on the first batch: the same for every run,
    whatever its optimizer, when the model cache restores the weights and the data order is fixed."""
    tmp, _ = protocol
    first = {}
    for name in ("adamw_lr1e-3", "column_lr1e-3", "sgd_lr0.5", "sgd_lr0.2"):
        records = [json.loads(line) for line in gzip.decompress(
            (tmp / "out" / name / "metrics.jsonl.gz").read_bytes()).decode().splitlines()]
        first[name] = next(r["train/loss"] for r in records if r["step"] == 1)
    assert len(set(first.values())) == 1, first


def test_finished_runs_are_skipped(protocol):
    tmp, logs = protocol
    assert "[mini_protocol] adamw_lr1e-3: done already, skipped" in logs["again"]
    assert "[mini_protocol] column_lr1e-3: done already, skipped" in logs["again"]
    assert "optimizer=" not in logs["again"]          # nothing started
    for path, mtime in logs["again_mtimes"].items():
        assert path.stat().st_mtime_ns == mtime
    assert "| adamw_lr1e-3 |" in logs["again"]         # the table of what is there


def test_divergence_is_a_result_and_opens_the_next_lower_lr(protocol):
    tmp, logs = protocol
    high = result(tmp, "sgd_lr0.5")
    assert high["diverged"] and high["diverged"].startswith("non-finite loss or gradient at step")
    assert high["overrides"] == mp.RUNS["sgd_lr0.5"] + TINY + ["optimizer.lr=inf"]
    assert math.isinf(OmegaConf.load(tmp / "out" / "sgd_lr0.5" / "config.yaml").optimizer.lr)   # --set won
    assert high["evals"] == {} and high["steps"] == 1   # step 1 logged, step 2 (NaN weights) refused
    assert "| sgd_lr0.5 | non-finite loss" in logs["diverge"]
    assert (tmp / "archive" / "sgd_lr0.5.tar.gz").is_file()
    # the next invocation, without the absurd lr: sgd_lr0.2 runs because 0.5 diverged, at its own lr
    low = result(tmp, "sgd_lr0.2")
    assert low["diverged"] is None and sorted(low["evals"], key=int) == ["2", "4"]
    assert low["overrides"] == mp.RUNS["sgd_lr0.2"] + TINY
    assert OmegaConf.load(tmp / "out" / "sgd_lr0.2" / "config.yaml").optimizer.lr == 0.2
    # it did not diverge: the lower lrs are skipped, and leave nothing
    assert "sgd_lr0.1: skipped, sgd_lr0.2 did not diverge" in logs["lower"]
    assert "sgd_lr0.05: skipped, sgd_lr0.1 did not diverge" in logs["lower"]
    assert not (tmp / "out" / "sgd_lr0.1").exists() and not (tmp / "out" / "sgd_lr0.05").exists()


def test_table_and_list(protocol):
    tmp, _ = protocol
    text = main("--out", tmp / "out", "--table")
    rows = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| run")]
    names = [line.split("|")[1].strip() for line in rows]
    done = ["adamw_lr1e-3", "sgd_lr0.5", "sgd_lr0.2", "column_lr1e-3"]        # RUNS order
    assert names[: len(done)] == done
    assert "Reference (best AdamW per precision)" in text
    listing = main("--list")
    listed = [line.split()[0] for line in listing.splitlines() if line.strip()]
    assert listed == list(mp.RUNS)
    assert all("experiment=mini_protocol" in line for line in listing.splitlines() if line.strip())


def test_time_budget_and_unknown_runs(tmp_path):
    out = main("--out", tmp_path / "out", "--work", tmp_path / "work", "--runs", "muon", "--time-budget", "0",
               "--set", *TINY)
    assert "[mini_protocol] muon: not started, it would overrun --time-budget" in out
    assert not (tmp_path / "out" / "muon").exists()
    with pytest.raises(SystemExit), contextlib.redirect_stderr(io.StringIO()) as err:
        mp.main(["--out", str(tmp_path / "out"), "--runs", "adamw_lr9"])
    assert "unknown run(s) ['adamw_lr9']" in err.getvalue()


# ---- configs/experiment/mini_protocol.yaml ----------------------------------------------------------------
def test_experiment_config_is_the_protocol():
    from llmopt.train.run import trainer_config
    from llmopt.train.schedule import build_schedule

    cfg = mp.compose([])
    assert cfg.model.flavor == "60m" and cfg.model.vocab_size is None
    assert cfg.data.name == "wiki_c4_local" and cfg.data.mode == "packed" and cfg.data.seq_len == 256
    assert cfg.trainer.global_batch_size == 512 and cfg.trainer.steps == 1000
    assert cfg.trainer.precision == "bf16_pure" and cfg.trainer.eval_every == 250
    assert (cfg.schedule.name, cfg.schedule.warmup_ratio, cfg.schedule.min_lr_ratio,
            cfg.schedule.reference_quirks) == ("cosine", 0.1, 0.1, False)
    assert cfg.seed == 42 and cfg.data.shuffle_seed == 42
    assert cfg.checkpoint.final is False and cfg.checkpoint.export_hf is False
    data = parse_config(OmegaConf.to_container(cfg.data, resolve=True))
    assert list(data.extra_eval) == ["wiki"] and data.eval_tokens >= 100_000
    assert data.extra_eval["wiki"].files[0].stop == 100 and data.train.files[0].start == 100
    # exactly 1000 updates, 100 of warmup; evaluations at every horizon of the table
    tcfg = trainer_config(cfg)
    assert tcfg.accumulation(1) >= 1
    param = torch.nn.Parameter(torch.zeros(1))
    schedule, _ = build_schedule(torch.optim.SGD([param], lr=1.0), steps=tcfg.steps,
                                 **OmegaConf.to_container(cfg.schedule, resolve=True))
    assert schedule.num_updates == 1000 and schedule.warmup == 100
    eval_steps = [s for s in range(1, schedule.num_updates + 1)
                  if s % tcfg.eval_every == 0 or s == schedule.num_updates]
    assert eval_steps == [250, 500, 750, 1000] and set(mp.HORIZONS) <= set(eval_steps)
    assert tcfg.steps * tcfg.global_batch_size * cfg.data.seq_len == 131_072_000
    assert mp.EVAL_SETS == {"c4": "eval/", "wiki": "eval/wiki/"}


def test_only_if_diverged_chains_runs_in_order():
    order = list(mp.RUNS)
    for lower, higher in mp.ONLY_IF_DIVERGED.items():
        assert lower in mp.RUNS and higher in mp.RUNS
        assert order.index(higher) < order.index(lower), (higher, lower)   # the higher lr runs first
        lr = {name: float(mp.RUNS[name][1].split("=")[1]) for name in (lower, higher)}
        assert mp.RUNS[lower][0] == mp.RUNS[higher][0] == "optimizer=sgd" and lr[lower] < lr[higher]


@pytest.mark.parametrize("name", list(mp.RUNS))
def test_every_run_composes_and_its_optimizer_steps(name):
    from llmopt.optim import build_optimizer
    from llmopt.train.run import optimizer_kwargs

    overrides = mp.RUNS[name]
    cfg = mp.compose(overrides)
    assert cfg.model.flavor == "60m" and cfg.data.name == "wiki_c4_local" and cfg.trainer.steps == 1000
    values = dict(o.split("=", 1) for o in overrides)
    if "optimizer.lr" in values:
        assert cfg.optimizer.lr == pytest.approx(float(values["optimizer.lr"]))
    assert cfg.optimizer.name == values["optimizer"]
    assert cfg.trainer.precision == values.get("trainer.precision", "bf16_pure")
    o, t = cfg.optimizer, cfg.trainer
    assert cfg.run_name == f"mini_{o.name}_{cfg.lookahead.name}_lr{o.lr}_{t.precision}"
    opt_name, hparams, lookahead = optimizer_kwargs(cfg)
    assert (lookahead is not None) == ("lookahead=ema_nesterov" in overrides)
    if lookahead is not None:
        assert (lookahead["start_step"], lookahead["end_step"]) == (300, 800)
    model = micro_model()
    optimizer = build_optimizer(model, opt_name, lookahead=lookahead, **hparams)
    before = [p.detach().clone() for p in model.parameters()]
    for tokens in random_batches(2):
        if hasattr(optimizer, "pre_forward"):
            optimizer.pre_forward()
        lm_loss(model, tokens).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    after = list(model.parameters())
    assert all(torch.isfinite(p).all() for p in after)
    assert any(not torch.equal(a, b) for a, b in zip(after, before))
