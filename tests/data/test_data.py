"""llmopt.data: sequence layouts, rank/worker sharding, exact resume, the validation set, sources, bad input.

The real C4 samples and the shared 32k SentencePiece model are read from ../shared/data (never copied).
"""

from __future__ import annotations

import bz2
import gc
import gzip
import json
import logging
import lzma
import multiprocessing
import socket
import threading
import time
from collections import Counter
from pathlib import Path

import datasets
import numpy as np
import pytest
import sentencepiece as spm
import torch
from datasets.distributed import split_dataset_by_node
from omegaconf import OmegaConf

from llmopt.data import (
    BadRecordError,
    HubUnreachableError,
    SyntheticCorpus,
    SyntheticSpec,
    build_data,
    entropy_per_token,
    parse_config,
)
from llmopt.data import sources as sources_mod
from llmopt.data.pipeline import DocStream, WindowShuffle
from llmopt.data.synthetic import build_tokenizer
from tests.helpers.train import compose_config

ROOT = Path(__file__).resolve().parents[2]
SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"
C4_TRAIN = SHARED / "c4" / "c4-train.sample.jsonl.gz"
C4_VAL = SHARED / "c4" / "c4-validation.sample.jsonl.gz"
SPM = SHARED / "tokenizers" / "llmopt-en-32k.model"
PAD, EOS = 0, 1


def c4_texts(path: Path = C4_VAL) -> list[str]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f]


@pytest.fixture(scope="module")
def sp() -> spm.SentencePieceProcessor:
    return spm.SentencePieceProcessor(model_file=str(SPM))


def local_cfg(files=(C4_VAL,), *, eval_files=(C4_VAL,), **over) -> dict:
    cfg = {
        "name": "test", "mode": "truncate_pad", "seq_len": 64, "tokenizer": str(SPM),
        "train": {"type": "local", "files": [str(f) for f in files], "shuffle_buffer": 0},
        "eval": {"type": "local", "files": [str(f) for f in eval_files], "shuffle_buffer": 0},
        "eval_tokens": 5000, "shuffle_seed": 42, "num_workers": 0, "on_bad_record": "fail",
    }
    cfg.update(over)
    return cfg


def take(data, n: int) -> list[dict]:
    return [next(data.train) for _ in range(n)]


def yaml_cfg(name: str) -> dict:
    """configs/data/<name>.yaml as a run gets it (composed by Hydra: the file inherits configs/data/_base.yaml)."""
    return OmegaConf.to_container(compose_config([f"data={name}"]).data, resolve=True)


# ---- sequence layouts ----------------------------------------------------------------------------------
def test_truncate_pad_layout_matches_reference(sp):
    L, B = 256, 16
    data = build_data(local_cfg(seq_len=L), micro_batch_size=B)
    batch = next(data.train)
    texts = c4_texts()[:B]
    # the reference: each document alone, T5 template (pieces + EOS, EOS kept when truncating), right padding
    for row, text in enumerate(texts):
        ids = sp.encode(text)[: L - 1] + [EOS]
        expected = torch.tensor(ids + [PAD] * (L - len(ids)))
        assert torch.equal(batch["input_ids"][row], expected)
        assert torch.equal(batch["attention_mask"][row], (torch.arange(L) < len(ids)).long())
        assert torch.equal(batch["labels"][row], expected.masked_fill(torch.arange(L) >= len(ids), -100))
    lengths = batch["attention_mask"].sum(1)
    assert (lengths == L).any() and (lengths < L).any()  # both a truncated and a padded document
    assert {k: v.dtype for k, v in batch.items()} == dict.fromkeys(batch, torch.int64)
    assert data.vocab_size == 32000 and (data.pad_id, data.eos_id) == (PAD, EOS)


@pytest.fixture(scope="module")
def t5like(tmp_path_factory) -> Path:
    """A t5-base-like transformers tokenizer: the shared 32k pieces + 100 <extra_id_*> sentinels = 32100 ids."""
    from transformers import T5Tokenizer

    path = tmp_path_factory.mktemp("t5like")
    T5Tokenizer.from_pretrained(str(SPM)).save_pretrained(path)
    return path


def test_prefix_shortcut_is_exact(sp, t5like):
    """truncate_pad tokenizes only a prefix of long texts (cut at a space); the rows must not change."""
    from transformers import AutoTokenizer

    from llmopt.data.encode import Encoder

    edge = ["a " + "z" * 5000, "nospace" * 900, "word " * 2000, ""]  # redo whole, no space, many pieces, empty
    texts = c4_texts() + edge
    for L in (16, 256):
        enc = Encoder("sentencepiece", SPM.read_bytes(), mode="truncate_pad", seq_len=L, eos_id=EOS, unk_id=2,
                      vocab_size=32000)
        ids, lengths = enc.encode(texts)
        expected = [sp.encode(t)[: L - 1] + [EOS] for t in texts]
        assert lengths.tolist() == [len(e) for e in expected]
        assert ids.tolist() == [i for e in expected for i in e]
        assert enc._prefix_safe and sum(len(t) > 6 * L for t in texts) > 100  # the shortcut was taken
    hf = AutoTokenizer.from_pretrained(t5like)
    texts = c4_texts()[:300] + edge
    enc = Encoder("tokenizers", hf.backend_tokenizer.to_str(), mode="truncate_pad", seq_len=64, eos_id=EOS,
                  unk_id=2, vocab_size=len(hf))
    ids, lengths = enc.encode(texts)
    expected = hf(texts, max_length=64, truncation=True)["input_ids"]
    assert enc._prefix_safe and ids.tolist() == [i for e in expected for i in e]
    assert lengths.tolist() == [len(e) for e in expected]


def test_truncate_pad_equals_transformers_call_for_hf_tokenizers(tmp_path):
    """Fast (tokenizers) and pure-Python transformers tokenizers: rows equal tokenizer(texts, max_length=L,
    truncation=True, padding="max_length"), the reference call."""
    from transformers import AutoTokenizer, ByT5Tokenizer

    L, B = 48, 6
    spec = SyntheticSpec()
    docs = SyntheticCorpus(spec).documents("train", 0)[:B]
    data = build_data(yaml_cfg("offline") | {"seq_len": L}, micro_batch_size=B)
    ref = build_tokenizer(spec)(docs, max_length=L, truncation=True, padding="max_length", return_tensors="pt")
    batch = next(data.train)
    assert torch.equal(batch["input_ids"], ref["input_ids"])
    assert torch.equal(batch["attention_mask"], ref["attention_mask"])

    build_tokenizer(spec).backend_tokenizer.save(str(tmp_path / "words.json"))  # a bare tokenizers file
    from_json = build_data(yaml_cfg("offline") | {"seq_len": L, "tokenizer": str(tmp_path / "words.json")},
                           micro_batch_size=B)
    assert (from_json.pad_id, from_json.eos_id, from_json.vocab_size) == (0, 1, 512)
    assert torch.equal(next(from_json.train)["input_ids"], ref["input_ids"])

    ByT5Tokenizer().save_pretrained(tmp_path / "byt5")  # a pure-Python tokenizer, loaded from a directory
    slow = AutoTokenizer.from_pretrained(tmp_path / "byt5")
    assert getattr(slow, "backend_tokenizer", None) is None
    data = build_data(local_cfg(seq_len=L, tokenizer=str(tmp_path / "byt5")), micro_batch_size=B)
    texts = c4_texts()[:B]
    ref = slow(texts, max_length=L, truncation=True, padding="max_length", return_tensors="pt")
    batch = next(data.train)
    assert torch.equal(batch["input_ids"], ref["input_ids"])
    assert torch.equal(batch["labels"], ref["input_ids"].masked_fill(ref["attention_mask"] == 0, -100))


def test_packed_layout_keeps_every_token(sp):
    L, B, n = 64, 4, 6
    data = build_data(local_cfg(mode="packed", seq_len=L), micro_batch_size=B)
    batches = take(data, n)
    stream = [t for text in c4_texts()[:200] for t in sp.encode(text) + [EOS]]
    got = torch.cat([b["input_ids"].reshape(-1) for b in batches])
    assert got.tolist() == stream[: n * B * L]  # documents joined with EOS, long ones continued, nothing dropped
    for b in batches:
        assert torch.equal(b["labels"], b["input_ids"]) and bool((b["attention_mask"] == 1).all())
    assert data.train.state_dict()["buffer"].numel() > 0


# ---- sharding ------------------------------------------------------------------------------------------
def epoch_rows(data, docs_in_epoch: int, batch_size: int) -> list[tuple]:
    assert docs_in_epoch % batch_size == 0
    rows = [tuple(r.tolist()) for _ in range(docs_in_epoch // batch_size) for r in next(data.train)["input_ids"]]
    assert data.train.state_dict()["index"] == docs_in_epoch and data.train.epoch == 0
    return rows


def test_two_ranks_times_two_workers_cover_the_stream_once():
    cfg = local_cfg(seq_len=48, train={"type": "local", "files": [str(C4_VAL)], "shuffle_buffer": 100})
    single = epoch_rows(build_data(cfg, micro_batch_size=25), 1000, 25)
    per_rank = [epoch_rows(build_data(cfg | {"num_workers": 2}, micro_batch_size=25, rank=r, world_size=2), 500, 25)
                for r in range(2)]
    assert Counter(per_rank[0] + per_rank[1]) == Counter(single)  # the union, no duplicates, nothing dropped
    assert per_rank[0] == single[0::2] and per_rank[1] == single[1::2]  # one shuffled stream, split by record


def test_workers_do_not_change_the_batches():
    for mode in ("truncate_pad", "packed"):
        cfg = local_cfg(mode=mode, train={"type": "local", "files": [str(C4_VAL)], "shuffle_buffer": 50})
        ref = take(build_data(cfg, micro_batch_size=8), 40)
        for workers in (1, 2):
            got = take(build_data(cfg | {"num_workers": workers, "chunk_docs": 16}, micro_batch_size=8), 40)
            assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(ref, got)), (mode, workers)


def test_rank_split_by_whole_files():
    """Two files read one after another, two ranks: split_dataset_by_node hands out whole (shuffled) files; the
    union is the stream."""
    cfg = parse_config(local_cfg(files=(C4_TRAIN, C4_VAL)) | {
        "train": {"type": "local", "files": [str(C4_TRAIN), str(C4_VAL)], "interleave": False}})
    src = sources_mod.build_source(cfg, "train", 42)
    src.shuffle_buffer = 64
    single = [t for t, _ in src.records(epoch=3)]
    ranks = [[t for t, _ in src.records(epoch=3, rank=r, world_size=2)] for r in range(2)]
    assert sorted(len(r) for r in ranks) == [1000, 2880]
    assert Counter(ranks[0] + ranks[1]) == Counter(single) and len(single) == 3880


def test_interleaved_files_mix_by_weight_and_split_by_record():
    """Files read side by side: each epoch holds every record once; while both last, the draws follow the weights;
    the order changes with the epoch and the weights; the ranks split the one stream record by record."""
    val = set(c4_texts())
    def source(weights):
        train = {"type": "local", "files": [{"path": str(C4_TRAIN), "weight": weights[0]},
                                            {"path": str(C4_VAL), "weight": weights[1]}], "shuffle_buffer": 16}
        return sources_mod.build_source(parse_config(local_cfg(train=train)), "train", 42)
    src = source((1.0, 3.0))
    epoch0 = [t for t, _ in src.records(epoch=0)]
    assert Counter(epoch0) == Counter(c4_texts(C4_TRAIN) + c4_texts())  # every record once, nothing else
    head = epoch0[:800]  # the 1000 validation records are not used up yet
    share = sum(t in val for t in head) / len(head)
    assert 0.70 < share < 0.80, share  # weight 3 of 4
    assert [t for t, _ in src.records(epoch=1)][:100] != epoch0[:100]
    assert [t for t, _ in source((1.0, 1.0)).records(epoch=0)][:100] != epoch0[:100]
    ranks = [[t for t, _ in src.records(epoch=0, rank=r, world_size=2)] for r in range(2)]
    assert ranks[0] == epoch0[0::2] and ranks[1] == epoch0[1::2]
    assert "interleave" in src.fingerprint  # a checkpoint of the files read one after another does not resume here


def doc_stats(loader, batches: int) -> tuple[int, float]:
    """The fewest distinct documents in a batch, and the largest share of one document, over `batches` batches."""
    fewest, largest = 10**9, 0.0
    for _ in range(batches):
        next(loader)
        _, counts = np.unique(loader.last_docs, return_counts=True)
        fewest, largest = min(fewest, len(counts)), max(largest, counts.max() / len(loader.last_docs))
    return fewest, largest


def test_packed_batches_mix_many_wikipedia_articles():
    """The mini-protocol's data on two Wikipedia shards (articles of thousands of tokens): with the config's file
    interleaving and window shuffle, a 512-window batch holds hundreds of articles; read one file after another
    and cut in order, as before, it holds a few dozen, one article taking a sixth of the batch."""
    cfg = yaml_cfg("wiki_c4_local") | {"data_dir": str(SHARED), "num_workers": 0}
    cfg["train"] = cfg["train"] | {"files": ["enwiki/enwiki-01.jsonl.xz", "enwiki/enwiki-02.jsonl.xz"]}
    assert cfg["window_shuffle_buffer"] == 65536
    with build_data(cfg, micro_batch_size=512) as mixed:
        fewest, largest = doc_stats(mixed.train.loader, 5)
    assert fewest >= 300 and largest <= 0.03, (fewest, largest)
    in_order = cfg | {"window_shuffle_buffer": None, "train": cfg["train"] | {"interleave": False}}
    with build_data(in_order, micro_batch_size=512) as before:
        fewest, largest = doc_stats(before.train.loader, 5)
    assert fewest < 100 and largest > 0.05, (fewest, largest)


def test_window_shuffle_draws_each_packed_window_once():
    """The shuffle buffer hands out packed windows in another order, none twice and none lost: after the buffer
    (C windows) has filled, batch n comes from the first C + n x B packed windows."""
    cfg = local_cfg(mode="packed", seq_len=32, train={"type": "local", "files": [str(C4_VAL)], "shuffle_buffer": 0})
    packed = [tuple(r.tolist()) for b in take(build_data(cfg, micro_batch_size=4), 40) for r in b["input_ids"]]
    shuffled = [tuple(r.tolist()) for b in take(build_data(cfg | {"window_shuffle_buffer": 24}, micro_batch_size=4),
                                                 30) for r in b["input_ids"]]
    assert shuffled != packed[: len(shuffled)] and len(set(shuffled)) == len(shuffled) == 120
    assert set(shuffled) <= set(packed[: 24 + 120])


def test_window_shuffle_follows_the_one_window_at_a_time_rule_and_goes_back():
    """The vectorized exchange equals the rule written one draw at a time (draw a place, hand out what it holds,
    put the next window there), places drawn twice in a batch included; state_at rebuilds the buffer of an
    earlier snapshot exactly, and refuses to go back further than it keeps."""
    capacity, seq_len, batch = 12, 3, 8  # 8 draws from 12 places: most batches draw some place twice
    shuffle = WindowShuffle(capacity, [7, 0], history=4)
    rng = np.random.Generator(np.random.PCG64([7, 0]))
    fresh = iter(range(10_000))

    def windows(n):
        ids = [next(fresh) for _ in range(n)]
        return np.array([[i] * seq_len for i in ids], np.int32), np.array(ids, np.int64) * 10

    rows, docs = windows(capacity)
    shuffle.add(rows[:5], docs[:5])
    shuffle.add(rows[5:], docs[5:])
    ref_rows, ref_docs = [r.copy() for r in rows], list(docs)
    snapshots, repeats = [(shuffle.snapshot(), rows.copy(), docs.copy())], 0
    for _ in range(30):
        new_rows, new_docs = windows(batch)
        out_rows, out_docs = shuffle.exchange(new_rows, new_docs)
        places = rng.integers(0, capacity, size=batch).tolist()
        repeats += len(places) - len(set(places))
        for k, place in enumerate(places):
            assert np.array_equal(out_rows[k], ref_rows[place]) and out_docs[k] == ref_docs[place]
            ref_rows[place], ref_docs[place] = new_rows[k].copy(), new_docs[k]
        snapshots.append((shuffle.snapshot(), np.stack(ref_rows), np.array(ref_docs)))
    assert repeats > 30
    for back in range(5):  # the current state and up to `history` exchanges back
        snapshot, want_rows, want_docs = snapshots[-1 - back]
        state = shuffle.state_at(snapshot, seq_len)
        assert np.array_equal(state["windows"].numpy(), want_rows) and np.array_equal(state["window_docs"], want_docs)
    with pytest.raises(RuntimeError, match="cannot go back 5 exchanges: it keeps 4"):
        shuffle.state_at(snapshots[-6][0], seq_len)


# ---- exact resume --------------------------------------------------------------------------------------
def test_resume_mid_pack_is_exact(tmp_path):
    cfg = local_cfg(mode="packed", seq_len=64, train={"type": "local", "files": [str(C4_VAL)],
                                                      "shuffle_buffer": 100})
    ref = take(build_data(cfg | {"num_workers": 2}, micro_batch_size=4), 30)
    first = build_data(cfg | {"num_workers": 2}, micro_batch_size=4)
    take(first, 12)
    state = first.train.state_dict()
    assert state["buffer"].numel() > 0  # a partly filled pack buffer travels in the state
    torch.save(state, tmp_path / "data.pt")
    first.close()
    resumed = build_data(cfg, micro_batch_size=4)  # another worker count: the stream does not depend on it
    resumed.train.load_state_dict(torch.load(tmp_path / "data.pt"))  # weights_only: plain tensors and ints
    for a, b in zip(ref[12:], take(resumed, 18)):
        assert torch.equal(a["input_ids"], b["input_ids"])


def test_resume_mid_window_shuffle_is_exact(tmp_path):
    """Stopped with a full window buffer and a partly used pack buffer, two interleaved files: the resumed run
    equals the uninterrupted one bit for bit (another worker count too); a state of another buffer size, or of the
    loader before the window shuffle, is refused with the setting to use."""
    train = {"type": "local", "files": [str(C4_TRAIN), str(C4_VAL)], "shuffle_buffer": 32}
    cfg = local_cfg(mode="packed", seq_len=48, train=train, window_shuffle_buffer=40)
    ref = take(build_data(cfg | {"num_workers": 2}, micro_batch_size=4), 40)
    first = build_data(cfg, micro_batch_size=4)
    take(first, 17)
    state = first.train.state_dict()
    assert state["windows"].shape == (40, 48) and state["buffer"].numel() > 0
    torch.save(state, tmp_path / "data.pt")
    first.close()
    resumed = build_data(cfg | {"num_workers": 2}, micro_batch_size=4)
    resumed.train.load_state_dict(torch.load(tmp_path / "data.pt"))  # weights_only: tensors, ints, the rng's dict
    for a, b in zip(ref[17:], take(resumed, 23)):
        assert torch.equal(a["input_ids"], b["input_ids"])
    with pytest.raises(ValueError, match="window_shuffle_buffer=40"):
        build_data(cfg | {"window_shuffle_buffer": 80}, micro_batch_size=4).train.load_state_dict(state)
    old = {k: v for k, v in state.items() if not k.startswith("window")} | {"format": "llmopt.data/1"}
    with pytest.raises(ValueError, match="window_shuffle_buffer=null"):
        build_data(cfg, micro_batch_size=4).train.load_state_dict(old)
    no_shuffle = build_data(cfg | {"window_shuffle_buffer": None}, micro_batch_size=4)
    no_shuffle.train.load_state_dict(old)  # written before the window shuffle: resumes where it is off
    assert no_shuffle.train.state_dict()["index"] == state["index"]


def test_resume_across_epochs_replays_the_shuffle(tmp_path):
    path = tmp_path / "small.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in c4_texts()[:30]))
    cfg = local_cfg(files=(path,), train={"type": "local", "files": [str(path)], "shuffle_buffer": 8})
    ref = take(build_data(cfg, micro_batch_size=4), 20)  # 7.5 batches per epoch: 2+ epochs
    rows = [tuple(r.tolist()) for b in ref for r in b["input_ids"]]
    assert rows[:30] != rows[30:60] and Counter(rows[:30]) == Counter(rows[30:60])  # reshuffled each epoch
    first = build_data(cfg, micro_batch_size=4)
    take(first, 9)
    state = first.train.state_dict()
    assert state["epoch"] == 1 and state["index"] == 6
    resumed = build_data(cfg | {"num_workers": 2}, micro_batch_size=4)
    resumed.train.load_state_dict(state)
    for a, b in zip(ref[9:], take(resumed, 11)):
        assert torch.equal(a["input_ids"], b["input_ids"])
    with pytest.raises(ValueError, match="world_size"):
        build_data(cfg, micro_batch_size=4, rank=0, world_size=2).train.load_state_dict(state)
    with pytest.raises(ValueError, match="fingerprint"):
        build_data(cfg | {"seq_len": 32}, micro_batch_size=4).train.load_state_dict(state)


def batch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "llmopt-batches"]


def same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k]
                                        for k in a)


def test_batches_made_ahead_equal_the_loop_and_resume_exactly():
    """data.batches_ahead: the same batches and states as batches made in next(); the state is that of the last
    batch handed out, not of the ones made ahead; loading a state mid-stream rewinds exactly."""
    before = set(batch_threads())  # other tests' (dropped) streams may still be ending theirs
    for mode, windows in (("truncate_pad", None), ("packed", None), ("packed", 20)):
        cfg = local_cfg(mode=mode, seq_len=48, train={"type": "local", "files": [str(C4_VAL)], "shuffle_buffer": 50},
                        window_shuffle_buffer=windows)
        loop = build_data(cfg | {"batches_ahead": 0}, micro_batch_size=8)
        ref = [(next(loop.train), loop.train.state_dict()) for _ in range(30)]
        ahead = build_data(cfg | {"batches_ahead": 3, "num_workers": 2, "chunk_docs": 16}, micro_batch_size=8)
        for batch, state in ref[:10]:
            assert all(torch.equal(batch[k], v) for k, v in next(ahead.train).items())
            assert same_state(ahead.train.state_dict(), state)
        deadline = time.monotonic() + 30
        while ahead.train.loader.state_dict()["batches"] < 14 and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.2)
        assert ahead.train.loader.state_dict()["batches"] == 14  # three ready, a fourth waiting for room; no more
        assert same_state(ahead.train.state_dict(), ref[9][1])
        ahead.train.load_state_dict(ref[4][1])  # back to after batch 5, with the thread running
        assert not set(batch_threads()) - before
        for batch, state in ref[5:20]:
            assert all(torch.equal(batch[k], v) for k, v in next(ahead.train).items()), mode
            assert same_state(ahead.train.state_dict(), state)
        ahead.close()
        assert not set(batch_threads()) - before and same_state(ahead.train.state_dict(), ref[19][1])
        for batch, _ in ref[20:]:  # after close, the stream re-opens after the last batch handed out
            assert torch.equal(next(ahead.train)["input_ids"], batch["input_ids"])
        ahead.close()


def test_batches_ahead_hand_out_the_good_batches_then_the_error(tmp_path):
    lines = [json.dumps({"text": t}) for t in c4_texts()[:20]]
    lines[9] = '{"text": "broken'
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    before = set(batch_threads())
    data = build_data(local_cfg(files=(path,), batches_ahead=4, chunk_docs=4), micro_batch_size=4)
    take(data, 2)  # records 0-7
    with pytest.raises(BadRecordError, match="bad.jsonl:10: malformed JSON"):
        next(data.train)
    assert data.train.state_dict()["batches"] == 2 and data.train.state_dict()["index"] == 8
    assert not set(batch_threads()) - before
    with pytest.raises(BadRecordError):  # the stream re-opens where it stopped, and fails there again
        next(data.train)
    with pytest.raises(ValueError, match="data.batches_ahead must be an integer >= 0"):
        build_data(local_cfg(batches_ahead=-1), micro_batch_size=4)


def test_a_dropped_stream_ends_its_thread_and_workers():
    data = build_data(local_cfg(num_workers=1, batches_ahead=2), micro_batch_size=4)
    threads, children = set(batch_threads()), set(multiprocessing.active_children())
    take(data, 1)
    (thread,) = set(batch_threads()) - threads
    workers = set(multiprocessing.active_children()) - children
    assert len(workers) == 1
    del data
    gc.collect()
    thread.join(timeout=10)
    assert not thread.is_alive()
    deadline = time.monotonic() + 10
    while any(p.is_alive() for p in workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(p.is_alive() for p in workers)


# ---- the validation set --------------------------------------------------------------------------------
def eval_rows(data, batch_size: int) -> list[list[tuple]]:
    return [[tuple(r.tolist()) for r in b["input_ids"]] for b in data.eval_batches(batch_size)]


def test_validation_set_budget_and_world_size_independence():
    budget = 5000
    shuffled_eval = {"type": "local", "files": [str(C4_VAL)], "shuffle_buffer": 100}
    cfg = local_cfg(eval_tokens=budget, eval=shuffled_eval, shuffle_seed=None)  # eval shuffle: never the run seed
    one = build_data(cfg, micro_batch_size=4)
    es = one.eval_set
    assert es.num_tokens >= budget and es.num_tokens - es.lengths[-1] < budget  # the shortest prefix
    reference = [r for batch in eval_rows(one, 7) for r in batch]
    assert len(reference) == es.num_sequences
    assert sum(int(b["attention_mask"].sum()) for b in one.eval_batches(7)) == es.num_tokens
    for world_size in (2, 3):
        per_rank = [eval_rows(build_data(cfg, micro_batch_size=9, rank=r, world_size=world_size, seed=r + 5), 7)
                    for r in range(world_size)]
        assert len({len(b) for b in per_rank}) == 1  # the same number of batches on every rank
        merged = [row for i in range(len(per_rank[0])) for rank in per_rank for row in rank[i]]
        assert merged == reference  # batch b on rank b % world_size; union = the 1-process set, in order
    packed = build_data(local_cfg(mode="packed", eval_tokens=budget), micro_batch_size=4).eval_set
    assert packed.num_tokens == 64 * packed.num_sequences and budget <= packed.num_tokens < budget + 64
    whole = build_data(local_cfg(eval_tokens=None, seq_len=16), micro_batch_size=4).eval_set
    assert whole.num_sequences == 1000
    with pytest.raises(ValueError, match="eval_tokens"):
        _ = build_data(local_cfg(eval_tokens=10**9), micro_batch_size=4).eval_set


# ---- sources and formats -------------------------------------------------------------------------------
def test_local_formats_and_compressions(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    texts = [t.replace("\n\n", "\n") for t in c4_texts()[:20]]  # no blank lines: paragraphs = documents
    jsonl = "".join(json.dumps({"text": t, "url": "u"}) + "\n" for t in texts).encode()
    (tmp_path / "a.jsonl").write_bytes(jsonl)
    (tmp_path / "a.jsonl.gz").write_bytes(gzip.compress(jsonl))
    (tmp_path / "a.jsonl.xz").write_bytes(lzma.compress(jsonl))
    (tmp_path / "a.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(jsonl))
    (tmp_path / "a.jsonl.bz2").write_bytes(bz2.compress(jsonl))
    (tmp_path / "a.txt").write_text("\n\n".join(texts) + "\n")
    pq.write_table(pa.table({"text": texts}), tmp_path / "a.parquet")
    for name in ("a.jsonl", "a.jsonl.gz", "a.jsonl.xz", "a.jsonl.zst", "a.jsonl.bz2", "a.txt", "a.parquet"):
        cfg = parse_config(local_cfg(files=(tmp_path / name,)))
        got = [t for t, _ in sources_mod.build_source(cfg, "train", 0).records(0)]
        assert got == texts, name
    lines = [t for t, _ in sources_mod.read_local_files([str(tmp_path / "a.txt")], "text", "text", "line")]
    assert len(lines) == sum(len(t.splitlines()) for t in texts)


def test_data_dir_override_and_default(monkeypatch, tmp_path):
    assert parse_config(yaml_cfg("c4_local")).resolve("c4/x").resolve() == (SHARED / "c4" / "x").resolve()
    monkeypatch.setenv("LLMOPT_DATA_DIR", str(tmp_path))
    assert parse_config(yaml_cfg("c4_local")).data_dir == tmp_path
    with pytest.raises(FileNotFoundError, match="LLMOPT_DATA_DIR"):
        build_data(yaml_cfg("c4_local"), micro_batch_size=2)


def test_every_config_builds_and_yields():
    for name in ("offline", "c4_local", "wiki_c4_local"):
        cfg = yaml_cfg(name)
        data = build_data(cfg | {"num_workers": 0}, micro_batch_size=2)
        batch = next(data.train)
        assert batch["input_ids"].shape == (2, cfg["seq_len"]) and int(batch["input_ids"].max()) < data.vocab_size
        data.check_vocab(data.vocab_size)
    c4 = parse_config(yaml_cfg("c4"))
    assert (c4.mode, c4.seq_len, c4.shuffle_seed, c4.eval_tokens, c4.tokenizer) == (
        "truncate_pad", 256, 42, 10_000_000, "t5-base")
    assert (c4.train.path, c4.train.name, c4.train.split, c4.eval.split) == ("allenai/c4", "en", "train", "validation")


# ---- the Hub path (cannot run here: its load_dataset call is checked, and its offline failure) ----------
def test_hub_source_builds_the_right_load_dataset_call(monkeypatch, sp):
    calls = []

    def fake_load_dataset(*args, **kwargs):
        calls.append((args, kwargs))
        return datasets.load_dataset("json", data_files=str(C4_VAL), split="train", streaming=True)

    monkeypatch.setattr(sources_mod, "load_dataset", fake_load_dataset)
    monkeypatch.setattr(sources_mod, "check_hub", lambda what, timeout: None)
    cfg = yaml_cfg("c4") | {"tokenizer": str(SPM), "vocab_size": None, "num_workers": 0, "seq_len": 32,
                            "eval_tokens": 2000}
    data = build_data(cfg, micro_batch_size=4, rank=1, world_size=2)
    assert calls == [(("allenai/c4", "en"), {"split": "train", "streaming": True}),
                     (("allenai/c4", "en"), {"split": "validation", "streaming": True})]
    batch = next(data.train)
    # expected: the same dataset, shuffle(seed=42, buffer 1000), then split_dataset_by_node(rank 1 of 2)
    ds = datasets.load_dataset("json", data_files=str(C4_VAL), split="train", streaming=True)
    ds = split_dataset_by_node(ds.shuffle(seed=42, buffer_size=1000), rank=1, world_size=2)
    ds.set_epoch(0)
    texts = [ex["text"] for _, ex in zip(range(4), ds)]
    assert texts != c4_texts()[1:9:2]  # really shuffled
    for row, text in zip(batch["input_ids"], texts):
        ids = sp.encode(text)[:31] + [EOS]
        assert row.tolist() == ids + [PAD] * (32 - len(ids))
    assert data.eval_set.num_tokens >= 2000


def test_offline_fails_fast_with_a_clear_message(monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there: refused at once
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)  # CI sets both
    start = time.monotonic()
    with pytest.raises(HubUnreachableError, match=r"(?s)needs the Hugging Face Hub.*data=c4_local.*type: local"):
        build_data(yaml_cfg("c4"), micro_batch_size=2)  # t5-base first (unless cached), else allenai/c4
    with pytest.raises(HubUnreachableError, match=r"(?s)allenai/c4.*cannot be reached.*data=offline"):
        build_data(yaml_cfg("c4") | {"tokenizer": str(SPM), "vocab_size": None}, micro_batch_size=2)
    assert time.monotonic() - start < 10
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HubUnreachableError, match="HF_HUB_OFFLINE"):
        build_data(yaml_cfg("c4") | {"tokenizer": str(SPM), "vocab_size": None}, micro_batch_size=2)


def test_a_silent_hub_times_out_instead_of_hanging(monkeypatch):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)  # accepts connections, never answers
    accepted = []
    threading.Thread(target=lambda: accepted.append(server.accept()), daemon=True).start()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)  # CI sets both
    start = time.monotonic()
    with pytest.raises(HubUnreachableError, match="within 1 s"):
        build_data(yaml_cfg("c4") | {"tokenizer": str(SPM), "vocab_size": None, "hub_timeout_s": 1},
                   micro_batch_size=2)
    assert time.monotonic() - start < 5
    server.close()


# ---- bad input -----------------------------------------------------------------------------------------
def test_missing_and_empty_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no file matches"):
        build_data(local_cfg(files=(tmp_path / "nope.jsonl",)), micro_batch_size=2)
    with pytest.raises(FileNotFoundError, match="no file matches"):
        build_data(local_cfg(files=(tmp_path / "*.jsonl",)), micro_batch_size=2)
    (tmp_path / "empty.jsonl").write_bytes(b"")
    with pytest.raises(ValueError, match="empty"):
        build_data(local_cfg(files=(tmp_path / "empty.jsonl",)), micro_batch_size=2)
    cut = gzip.compress(gzip.decompress(C4_VAL.read_bytes()))
    (tmp_path / "cut.jsonl.gz").write_bytes(cut[: len(cut) // 2])  # a truncated download
    data = build_data(local_cfg(files=(tmp_path / "cut.jsonl.gz",)), micro_batch_size=2)
    with pytest.raises(ValueError, match="cut.jsonl.gz: cannot be read to the end"):
        take(data, 10_000)
    (tmp_path / "blank.jsonl.gz").write_bytes(gzip.compress(b"\n\n"))  # non-empty file, no documents
    data = build_data(local_cfg(files=(tmp_path / "blank.jsonl.gz",)), micro_batch_size=2)
    with pytest.raises(ValueError, match="holds no documents"):
        next(data.train)


def test_truncated_zstd_file_is_reported_as_truncated_also_when_bad_records_are_skipped(tmp_path):
    """zstandard's stream reader ends quietly where a truncated .zst ends: its last line read as a malformed
    record, and with on_bad_record=skip the file was used as if complete."""
    import zstandard

    from llmopt.data.sources import read_local_files

    text = gzip.decompress(C4_VAL.read_bytes())
    frame = zstandard.ZstdCompressor().compress(text)
    (tmp_path / "two.jsonl.zst").write_bytes(frame + frame)  # two frames, as `zstd` writes concatenated files
    records = list(read_local_files([str(tmp_path / "two.jsonl.zst")], "auto", "text", "line"))
    assert len(records) == 2 * text.count(b"\n") and not any(r["error"] for r in records)
    (tmp_path / "cut.jsonl.zst").write_bytes(frame[: len(frame) // 2])
    for on_bad_record in ("fail", "skip"):
        data = build_data(local_cfg(files=(tmp_path / "cut.jsonl.zst",), on_bad_record=on_bad_record),
                          micro_batch_size=2)
        with pytest.raises(ValueError, match=r"cut.jsonl.zst: cannot be read to the end .*zstd stream ends inside"):
            take(data, 10_000)


def test_a_bad_record_read_by_a_worker_is_reported_by_its_own_message(tmp_path):
    """torch re-raises a DataLoader worker's error as "Caught BadRecordError in DataLoader worker process 0.
    Original Traceback ...", the useful line last: the user saw a traceback, not the file and line."""
    lines = [json.dumps({"text": t}) for t in c4_texts()[:20]]
    lines[9] = '{"text": "broken'
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    for batches_ahead in (0, 2):
        data = build_data(local_cfg(files=(path,), num_workers=2, chunk_docs=4, batches_ahead=batches_ahead),
                          micro_batch_size=4)
        with pytest.raises(BadRecordError) as raised:
            take(data, 10)
        data.close()
        message = str(raised.value)
        assert message.startswith(f"{path}:10: malformed JSON") and "on_bad_record=skip" in message
        assert "Traceback" not in message and "worker" not in message and "\n" not in message


def test_malformed_json_lines_skip_and_count_or_fail(tmp_path, caplog):
    texts = c4_texts()[:10]
    lines = [json.dumps({"text": t}) for t in texts]
    lines[3] = '{"text": "broken'
    lines[7] = "[1, 2]"
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    data = build_data(local_cfg(files=(path,), eval_files=(path,), eval_tokens=100, on_bad_record="skip"),
                      micro_batch_size=4)
    with caplog.at_level(logging.WARNING, logger="llmopt.data"):
        take(data, 2)
    assert data.train.bad_records == 2 and data.train.state_dict()["bad_records"] == 2
    assert f"{path}:4: malformed JSON" in caplog.text
    with pytest.raises(BadRecordError, match=rf"(?s){path.name}:4: malformed JSON.*on_bad_record=skip"):
        next(build_data(local_cfg(files=(path,)), micro_batch_size=4).train)


def test_bulk_document_reads_equal_one_at_a_time(tmp_path, caplog):
    """DocStream.next_docs(n) (what truncate_pad batches use) gives next_doc()'s documents, position and
    bad-record count, across bad records, chunk boundaries and epochs."""
    lines = [json.dumps({"text": t}) for t in c4_texts()[:40]]
    lines[3], lines[17], lines[18] = '{"text": "broken', "[1, 2]", '{"text": 3'
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(lines) + "\n")
    data = build_data(local_cfg(files=(path,), on_bad_record="skip", chunk_docs=8), micro_batch_size=4)

    def stream():
        return DocStream(data.train.loader.source, data._settings, rank=0, world_size=1, epoch=0, index=0, cycle=True)

    one, bulk = stream(), stream()
    for n in (1, 5, 8, 13, 30, 2):  # 59 documents: past the end of the 37 good ones, into the next epoch
        expected = [one.next_doc().tolist() for _ in range(n)]
        assert [d.tolist() for d in bulk.next_docs(n)] == expected
        assert (bulk.epoch, bulk.index, bulk.bad_records) == (one.epoch, one.index, one.bad_records)
    assert bulk.epoch == 1 and bulk.bad_records == 6


def test_documents_without_the_text_field(tmp_path):
    path = tmp_path / "notext.jsonl"
    path.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps({"body": "x", "url": "u"}) + "\n")
    data = build_data(local_cfg(files=(path,), on_bad_record="skip"), micro_batch_size=2)
    with pytest.raises(ValueError, match=r"notext.jsonl:2: the record has no text field 'text' \(keys: \['body'"):
        next(data.train)


def test_config_errors():
    with pytest.raises(ValueError, match="seq_len must be an integer >= 2"):
        build_data(local_cfg(seq_len=1), micro_batch_size=2)
    with pytest.raises(ValueError, match="on_bad_record"):
        parse_config(local_cfg(on_bad_record="ignore"))
    with pytest.raises(ValueError, match="unknown key"):
        parse_config(local_cfg(seqlen=64))
    with pytest.raises(ValueError, match="mode"):
        parse_config(local_cfg(mode="pack"))
    with pytest.raises(ValueError, match="rank"):
        build_data(local_cfg(), micro_batch_size=2, rank=2, world_size=2)
    for bad in (0, -5, "many", True):
        with pytest.raises(ValueError, match="window_shuffle_buffer must be a number of windows >= 1, or null"):
            parse_config(local_cfg(window_shuffle_buffer=bad))
    for bad in (0, -1.0, "x"):
        with pytest.raises(ValueError, match=r"files\[0\].weight must be a number > 0"):
            parse_config(local_cfg(train={"type": "local", "files": [{"path": str(C4_VAL), "weight": bad}]}))
    with pytest.raises(ValueError, match="interleave must be true or false"):
        parse_config(local_cfg(train={"type": "local", "files": [str(C4_VAL)], "interleave": "yes"}))


def test_vocab_checks():
    data = build_data(local_cfg(), micro_batch_size=2)
    data.check_vocab(32000)
    with pytest.raises(ValueError, match=r"emits ids up to 31999.*only 512 entries"):
        data.check_vocab(512)
    with pytest.raises(ValueError, match="data.vocab_size=1000 is smaller"):
        build_data(local_cfg(vocab_size=1000), micro_batch_size=2)


def test_t5_sentinels_are_cut_off_at_vocab_size(tmp_path, t5like):
    """A t5-base-like tokenizer (32000 pieces + 100 <extra_id_*> sentinels = 32100 ids) with data.vocab_size
    32000, as in configs/data/c4.yaml: the model never sees an id >= 32000, even for text naming a sentinel."""
    path = tmp_path / "s.jsonl"
    path.write_text(json.dumps({"text": "a sentinel <extra_id_0> in the text"}) + "\n")
    cfg = local_cfg(files=(path,), tokenizer=str(t5like))
    assert len(build_data(cfg, micro_batch_size=1).tokenizer) == 32100
    with pytest.raises(ValueError, match=r"emits ids up to 32099"):
        build_data(cfg, micro_batch_size=1).check_vocab(32000)
    data = build_data(cfg | {"vocab_size": 32000}, micro_batch_size=1)
    data.check_vocab(32000)
    ids = next(data.train)["input_ids"][0]
    raw = data.tokenizer("a sentinel <extra_id_0> in the text")["input_ids"]
    assert 32099 in raw and int(ids.max()) < 32000
    assert ids[: len(raw)].tolist() == [2 if i >= 32000 else i for i in raw]  # the sentinel became unk


# ---- the synthetic offline corpus ----------------------------------------------------------------------
def test_synthetic_entropy_matches_the_stream():
    cfg = yaml_cfg("offline")
    corpus = SyntheticCorpus(SyntheticSpec.from_mapping(cfg["synthetic"]))
    for mode in ("packed", "truncate_pad"):
        data = build_data(cfg | {"mode": mode}, micro_batch_size=64)
        assert data.entropy_per_token == pytest.approx(entropy_per_token(cfg | {"mode": mode}))
        loss = count = 0.0
        padded = truncated = 0
        for batch in take(data, 40):  # ~300k tokens
            ids, mask = batch["input_ids"].numpy(), batch["attention_mask"].numpy().astype(bool)
            logp = corpus.next_token_logprob(ids[:, :-1], ids[:, 1:])
            target = mask[:, 1:]
            if mode == "truncate_pad":
                logp[:, -1] = np.where(target[:, -1], 0.0, logp[:, -1])  # last slot: always EOS, known
                padded += int((~mask).any(1).sum())
                truncated += int(mask[:, -1].sum())
            assert np.isfinite(logp[target]).all()
            loss -= logp[target].sum()
            count += target.sum()
        assert loss / count == pytest.approx(data.entropy_per_token, rel=0.01), mode
        if mode == "truncate_pad":
            assert padded > 0 and truncated > 0  # varied lengths: both padding and truncation happen
    assert 3.0 < data.entropy_per_token < np.log(512) - 1


def test_synthetic_is_deterministic_and_offline():
    a, b = (take(build_data(yaml_cfg("offline"), micro_batch_size=4), 3) for _ in range(2))
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, b))
    data = build_data(yaml_cfg("offline"), micro_batch_size=4)
    tok = data.tokenizer
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id, len(tok)) == (0, 1, 2, 512)
    assert data.vocab_size == 512


# ---- the tokenizer-training command --------------------------------------------------------------------
def test_train_tokenizer_command(tmp_path):
    from llmopt.data.train_tokenizer import main

    main(["--input", str(C4_VAL), "--vocab-size", "300", "--output", str(tmp_path / "t300"), "--max-lines", "2000",
          "--threads", "1"])
    model = spm.SentencePieceProcessor(model_file=str(tmp_path / "t300.model"))
    assert (model.get_piece_size(), model.pad_id(), model.eos_id(), model.unk_id(), model.bos_id()) == (
        300, 0, 1, 2, -1)
    data = build_data(local_cfg(tokenizer=str(tmp_path / "t300.model")), micro_batch_size=4)
    assert data.vocab_size == 300 and int(next(data.train)["input_ids"].max()) < 300
