"""From records to batches: background tokenization, sequence modes, exact resume, the validation set.

How the work is split, and why resume is exact with workers
-----------------------------------------------------------
Ranks: each rank reads its share of the stream, `split_dataset_by_node(shuffled stream, rank, world_size)`
(whole shards when their count divides world_size, else every world_size-th record).

Workers: the rank's records are grouped into chunks of `chunk_docs` consecutive records. In a torch DataLoader
with W workers, every worker reads all the rank's records (reading is cheap; tokenizing is not) and tokenizes
only the chunks c with c % W == w. The DataLoader takes results from its workers round-robin, so chunks come
back in stream order. Hence:
  * no document is tokenized twice or dropped: each chunk belongs to exactly one worker;
  * the batches are the same for any num_workers (0, 2, 8, ...): a run may even resume with another count;
  * nothing but cheap numpy batch assembly runs in the training process, on a background thread that keeps
    `data.batches_ahead` batches ready (BatchesAhead; 0 = assembled in the training loop's next()).
The cost is that each worker parses (and, from the Hub, downloads) the rank's whole record stream.

State: where the training loop has consumed up to, not where the workers or the batch thread are: (epoch, index
of the next record in this rank's epoch stream) plus, in packed mode, the tokens left in the pack buffer and the
window shuffle buffer (its windows and its generator's state). Whatever
the workers prefetched beyond that is dropped on resume and tokenized again. Resuming re-opens the rank's stream at
the start of that epoch (same seed, same `set_epoch`, so the same shuffled order; datasets' own state_dict
would lose the shuffle buffer) and skips `index` records at the raw level, without tokenizing them: free for
the synthetic corpus, ~30k records/s for local JSON lines, network-bound for the Hub.

Sequence modes
--------------
truncate_pad  one document per row: the tokenizer's encoding (T5: pieces + EOS) truncated to seq_len, padded
              with pad_id; labels are -100 on padding; attention_mask marks the document's tokens.
packed        documents (pieces + EOS) are concatenated and cut into rows of exactly seq_len tokens; the rest
              of a long document continues into the next rows (nothing is thrown away); no padding. With
              data.window_shuffle_buffer, each row is then drawn at random from a buffer of that many windows
              (WindowShuffle), so that the consecutive windows of a long document spread over many batches.
Labels are NOT shifted (transformers shifts them inside the model).
"""

from __future__ import annotations

import collections
import contextlib
import logging
import math
import os
import queue
import signal
import threading
import weakref
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from llmopt.data.encode import Encoder
from llmopt.data.sources import Source

log = logging.getLogger("llmopt.data")
STATE_FORMAT = "llmopt.data/2"  # /1: before the window shuffle (loads where it is off)


class BadRecordError(ValueError):
    """A record that cannot be parsed, with data.on_bad_record=fail."""


@dataclass
class Chunk:
    epoch: int
    start: int                 # index of the chunk's first record in its epoch's stream
    ids: np.ndarray            # int32 tokens of the good records, concatenated
    lengths: np.ndarray        # tokens per record, -1 for a bad record
    errors: dict[int, str]     # position in the chunk -> why that record is bad


@dataclass(frozen=True)
class StreamSettings:
    encoder: Encoder
    num_workers: int
    prefetch: int              # chunks in flight per worker
    chunk_docs: int
    on_bad_record: str


def raw_chunks(source: Source, rank: int, world_size: int, epoch: int, index: int, chunk_docs: int,
               on_bad_record: str, cycle: bool) -> Iterator[tuple[int, int, list[str | None], dict[int, str]]]:
    """(epoch, start, texts, errors) chunks of this rank's records from (epoch, index) on; with `cycle`, pass
    after pass forever (epoch + 1 each time), else one pass. A bad record's text is None."""
    while True:
        position = valid = 0
        texts: list[str | None] = []
        errors: dict[int, str] = {}
        start = index
        for text, error in source.records(epoch, rank, world_size):
            position += 1
            valid += text is not None
            if position <= index:  # fast-forward on resume: no tokenization
                continue
            if text is None:
                if on_bad_record == "fail":
                    raise BadRecordError(f"{error}. Set data.on_bad_record=skip to skip such records (they are "
                                         f"counted and reported), or fix the file.")
                errors[len(texts)] = error
            texts.append(text)
            if len(texts) == chunk_docs:
                yield epoch, start, texts, errors
                start, texts, errors = position, [], {}
        if texts:
            yield epoch, start, texts, errors
        if position < index:
            raise ValueError(f"{source.description}: the resume position (epoch {epoch}, record {index}) is past "
                             f"the end of the epoch ({position} records for rank {rank} of {world_size}); the "
                             f"data changed since the checkpoint was written")
        if valid == 0:
            raise ValueError(f"{source.description} gave rank {rank} of {world_size} no documents in epoch "
                             f"{epoch}; it needs at least one document per rank")
        if not cycle:
            return
        epoch, index = epoch + 1, 0


class ChunkDataset(torch.utils.data.IterableDataset):
    """Tokenized chunks of one rank's stream from (epoch, index) on, in stream order (see the module
    docstring for how DataLoader workers share them)."""

    def __init__(self, source: Source, encoder: Encoder, *, rank: int, world_size: int, epoch: int, index: int,
                 chunk_docs: int, on_bad_record: str, cycle: bool):
        self.source, self.encoder = source, encoder
        self.rank, self.world_size, self.epoch, self.index = rank, world_size, epoch, index
        self.chunk_docs, self.on_bad_record, self.cycle = chunk_docs, on_bad_record, cycle

    def __iter__(self) -> Iterator[Chunk]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if info is not None:
            import fsspec.asyn
            import pyarrow

            fsspec.asyn.reset_lock()  # fsspec's event loop does not survive a fork (datasets does the same)
            # one thread per worker: the workers are the parallelism (idle pool threads spinning on every core
            # cost the machine several times the work itself)
            os.environ["TOKENIZERS_PARALLELISM"] = "false"
            self.encoder.threads = 1
            pyarrow.set_cpu_count(1)  # the datasets reader's decoding pool
        raw = raw_chunks(self.source, self.rank, self.world_size, self.epoch, self.index, self.chunk_docs,
                         self.on_bad_record, self.cycle)
        for c, (epoch, start, texts, errors) in enumerate(raw):
            if c % workers == worker:
                ids, lengths = self.encoder.encode(texts)
                yield Chunk(epoch, start, ids, lengths, errors)


def _ignore_interrupts(worker_id: int) -> None:
    """A DataLoader worker leaves Ctrl-C (SIGINT, sent to the whole process group) to the training process,
    which stops at a step boundary and checkpoints; a worker that died of it would fail that last step."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _as_is(item):
    return item


class DocStream:
    """Documents of one rank's stream, one at a time, from (epoch, index) on; tracks the position of the
    next record and counts (and reports) the bad records it skips."""

    def __init__(self, source: Source, settings: StreamSettings, *, rank: int, world_size: int, epoch: int,
                 index: int, cycle: bool):
        dataset = ChunkDataset(source, settings.encoder, rank=rank, world_size=world_size, epoch=epoch,
                               index=index, chunk_docs=settings.chunk_docs, on_bad_record=settings.on_bad_record,
                               cycle=cycle)
        if settings.num_workers == 0:
            self._chunks = iter(dataset)
        else:
            self._chunks = iter(torch.utils.data.DataLoader(
                dataset, batch_size=None, num_workers=settings.num_workers, prefetch_factor=settings.prefetch,
                collate_fn=_as_is, worker_init_fn=_ignore_interrupts))
        self.epoch, self.index, self.what = epoch, index, source.description
        self.bad_records = 0
        self._chunk: Chunk | None = None
        self._k = self._offset = 0

    def _next_chunk(self) -> Chunk:
        """The chunk that holds the next record: the next one from the workers once this one is used up."""
        if self._chunk is None or self._k == len(self._chunk.lengths):
            try:
                self._chunk, self._k, self._offset = next(self._chunks), 0, 0
            except StopIteration:
                raise
            except Exception as err:
                raise worker_error_unwrapped(err) from None
        return self._chunk

    def next_doc(self) -> np.ndarray:
        """Tokens of the next good document; StopIteration at the end of a one-pass stream."""
        while True:
            chunk, k = self._next_chunk(), self._k
            self._k += 1
            self.epoch, self.index = chunk.epoch, chunk.start + k + 1
            n = int(chunk.lengths[k])
            if n < 0:
                self.bad_records += 1
                if math.log10(self.bad_records).is_integer():  # the 1st, 10th, 100th ... one
                    log.warning("%s: skipped bad record #%d: %s", self.what, self.bad_records, chunk.errors[k])
                continue
            tokens = chunk.ids[self._offset: self._offset + n]
            self._offset += n
            return tokens

    def next_docs(self, n: int) -> list[np.ndarray]:
        """The next n good documents: next_doc() n times, with each run of good records in a chunk taken at once
        (the training process assembles every batch; per-document Python work shows at 1M+ tokens/s)."""
        docs: list[np.ndarray] = []
        while len(docs) < n:
            chunk, k = self._next_chunk(), self._k
            lengths = chunk.lengths[k: k + n - len(docs)]
            if lengths.min() < 0:  # a bad record in this run: one document at a time, with its report
                docs.append(self.next_doc())
                continue
            ends = (self._offset + np.cumsum(lengths)).tolist()
            docs.extend([chunk.ids[start:end] for start, end in zip([self._offset, *ends[:-1]], ends)])
            self._k, self._offset = k + len(lengths), ends[-1]
            self.epoch, self.index = chunk.epoch, chunk.start + self._k
        return docs

    def close(self) -> None:
        """Stop the workers now (a DataLoader iterator shuts them down when released)."""
        shutdown = getattr(self._chunks, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
        self._chunks = iter(())


def worker_error_unwrapped(err: Exception) -> Exception:
    """The error a DataLoader worker raised, with its own message: torch re-raises it in the training process
    as "Caught X in DataLoader worker process N. Original Traceback ..." with the useful line last."""
    message = str(err)
    if "in DataLoader worker process" not in message:
        return err
    kind = type(err)
    for prefix in (f"{kind.__module__}.{kind.__qualname__}: ", f"{kind.__qualname__}: "):
        start = message.rfind("\n" + prefix)
        if start >= 0:
            try:
                return kind(message[start + 1 + len(prefix):].strip())
            except Exception:  # an exception type that cannot be rebuilt from its message keeps torch's
                return err
    return err


def make_batch(ids: np.ndarray, lengths: np.ndarray | None) -> dict[str, torch.Tensor]:
    """The batch dict from token rows; `lengths` (tokens per row) marks padding, None = no padding.
    Built in numpy: torch's CPU ops would run tiny intra-op parallel regions on every core for each batch."""
    input_ids = ids.astype(np.int64)
    if lengths is None:
        mask = np.ones_like(input_ids)
        labels = input_ids.copy()
    else:
        mask = (np.arange(ids.shape[1])[None, :] < lengths[:, None]).astype(np.int64)
        labels = np.where(mask == 1, input_ids, -100)
    return {"input_ids": torch.from_numpy(input_ids), "labels": torch.from_numpy(labels),
            "attention_mask": torch.from_numpy(mask)}


def pad_rows(docs: list[np.ndarray], seq_len: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Documents (each <= seq_len tokens) as rows padded with pad_id, and their lengths."""
    lengths = np.array([len(d) for d in docs], dtype=np.int64)
    rows = np.full((len(docs), seq_len), pad_id, dtype=np.int32)
    rows[np.arange(seq_len)[None, :] < lengths[:, None]] = np.concatenate(docs)
    return rows, lengths


class WindowShuffle:
    """Packed windows drawn at random from a buffer of `capacity` windows: each window handed out leaves a place
    that the next packed window takes (datasets' shuffle-buffer rule, one window at a time), so that a batch mixes
    many documents rather than consecutive windows of a few long ones.

    The buffer is one array, changed in place by a few vectorized operations per batch: the batch thread
    (BatchesAhead) shares the GIL with the training loop, so per-window Python work there slows the loop. A
    snapshot after every batch is therefore only a position (`exchanges`, the fill and the generator's state);
    `state_at` rebuilds the buffer at an earlier snapshot from the current one by undoing the exchanges made
    since, which the buffer keeps (the last `history` of them: as many as the batch thread can be ahead)."""

    def __init__(self, capacity: int, seed: list[int], history: int = 2):
        self.capacity = capacity
        self.rows: np.ndarray | None = None          # int32 [capacity, seq_len], allocated by the first add
        self.docs = np.zeros(capacity, np.int64)     # the document of each row's first token
        self.filled = 0                              # rows in use (the buffer fills before the first exchange)
        self.exchanges = 0                           # exchange() calls so far
        self.rng = np.random.Generator(np.random.PCG64(seed))
        self._undo: collections.deque = collections.deque(maxlen=history)  # (exchanges after, places, rows, docs)
        self._lock = threading.Lock()                # state_at (training loop) against exchange (batch thread)

    @property
    def full(self) -> bool:
        return self.filled == self.capacity

    def add(self, rows: np.ndarray, docs: np.ndarray) -> None:
        """Fill the buffer (before it is full)."""
        if self.rows is None:
            self.rows = np.empty((self.capacity, rows.shape[1]), np.int32)
        self.rows[self.filled: self.filled + len(rows)] = rows
        self.docs[self.filled: self.filled + len(rows)] = docs
        self.filled += len(rows)

    def exchange(self, rows: np.ndarray, docs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Hand out len(rows) windows drawn from the full buffer, each place refilled by the next of `rows`: the
        k-th draw takes place p_k, which holds what the last earlier draw of p_k put there (rows[j]) or else what
        the buffer held."""
        places = self.rng.integers(0, self.capacity, size=len(rows))
        order = np.argsort(places, kind="stable")
        ordered = places[order]
        repeat = np.zeros(len(rows), bool)
        repeat[1:] = ordered[1:] == ordered[:-1]          # in sorted order: a place drawn before in this batch
        last = np.ones(len(rows), bool)
        last[:-1] = ~repeat[1:]                           # ... and the last draw of each place
        out_rows, out_docs = self.rows[places], self.docs[places]
        again = order[repeat]                             # draws of a place drawn before: what that draw put
        before = order[np.flatnonzero(repeat) - 1]
        out_rows[again], out_docs[again] = rows[before], docs[before]
        first = order[~repeat]
        with self._lock:
            self.rows[ordered[last]], self.docs[ordered[last]] = rows[order[last]], docs[order[last]]
            self.exchanges += 1
            self._undo.append((self.exchanges, places[first], out_rows[first], out_docs[first]))
        return out_rows, out_docs

    def keep(self, history: int) -> None:
        """Keep the last `history` exchanges for state_at."""
        self._undo = collections.deque(self._undo, maxlen=history)

    def snapshot(self) -> dict:
        return {"capacity": self.capacity, "filled": self.filled, "exchanges": self.exchanges,
                "rng": self.rng.bit_generator.state}

    def state_at(self, snapshot: dict, seq_len: int) -> dict:
        """The buffer as it was at `snapshot` (of this buffer, at most `history` exchanges ago), as checkpoint
        values (tensors, ints)."""
        with self._lock:
            rows = (self.rows[:snapshot["filled"]].copy() if self.rows is not None
                    else np.zeros((0, seq_len), np.int32))
            docs = self.docs[:snapshot["filled"]].copy()
            undo = [u for u in self._undo if u[0] > snapshot["exchanges"]]
            missing = self.exchanges - snapshot["exchanges"] - len(undo)
        if missing:
            raise RuntimeError(f"the window shuffle buffer cannot go back {self.exchanges - snapshot['exchanges']} "
                               f"exchanges: it keeps {self._undo.maxlen}")
        for _, places, old_rows, old_docs in reversed(undo):
            rows[places], docs[places] = old_rows, old_docs
        return {"windows": torch.from_numpy(rows), "window_docs": torch.from_numpy(docs),
                "window_rng": snapshot["rng"]}

    def load(self, state: dict) -> None:
        windows = state["windows"].numpy()
        self.rows, self.filled, self.exchanges = None, 0, 0
        self._undo.clear()
        if len(windows):
            self.add(windows, state["window_docs"].numpy())
        self.rng.bit_generator.state = state["window_rng"]


def doc_id(epoch: int, index: int) -> int:
    """A document's identity in the training stream: its epoch and its record index in that epoch."""
    return (epoch << 32) | index


class TrainLoader:
    """This rank's infinite stream of training batches, with an exact state_dict (see the module docstring).
    In packed mode `last_docs` holds, for each row of the last batch, the document of its first token (doc_id)."""

    def __init__(self, source: Source, settings: StreamSettings, *, mode: str, seq_len: int,
                 micro_batch_size: int, pad_id: int, rank: int, world_size: int, fingerprint: str,
                 window_shuffle_buffer: int | None = None, window_seed: int = 0):
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
        self.source, self.settings = source, settings
        self.mode, self.seq_len, self.batch_size, self.pad_id = mode, seq_len, micro_batch_size, pad_id
        self.rank, self.world_size, self.fingerprint = rank, world_size, fingerprint
        self._epoch, self._index, self._batches, self._bad = 0, 0, 0, 0
        self._buffer = np.zeros(0, np.int32)   # packed mode: tokens read but not yet emitted
        self._buffer_doc = 0                   # ... all of one document (the tail of the last one read)
        self._windows = (WindowShuffle(window_shuffle_buffer, [window_seed, rank, 0x5EED])
                         if mode == "packed" and window_shuffle_buffer else None)
        self._docs: DocStream | None = None
        self.last_docs = np.zeros(0, np.int64)

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self._docs is None:
            self._docs = DocStream(self.source, self.settings, rank=self.rank, world_size=self.world_size,
                                   epoch=self._epoch, index=self._index, cycle=True)
        docs = self._docs
        bad_before = docs.bad_records
        try:
            if self.mode == "truncate_pad":
                rows, lengths = pad_rows(docs.next_docs(self.batch_size), self.seq_len, self.pad_id)
            else:
                lengths = None
                windows = self._windows
                while windows is not None and not windows.full:
                    windows.add(*self._pack(docs, min(self.batch_size, windows.capacity - windows.filled)))
                rows, self.last_docs = self._pack(docs, self.batch_size)
                if windows is not None:
                    rows, self.last_docs = windows.exchange(rows, self.last_docs)
        except BaseException:
            self.close()  # the state stays at the last whole batch; the next call re-opens the stream there
            raise
        self._epoch, self._index = docs.epoch, docs.index
        self._bad += docs.bad_records - bad_before
        self._batches += 1
        return make_batch(rows, lengths)

    def _pack(self, docs: DocStream, n: int) -> tuple[np.ndarray, np.ndarray]:
        """The next n packed windows and the document of each one's first token."""
        need = n * self.seq_len
        parts, ids, have = [self._buffer], [self._buffer_doc], len(self._buffer)
        while have < need:
            parts.append(docs.next_doc())
            ids.append(doc_id(docs.epoch, docs.index - 1))
            have += len(parts[-1])
        flat = np.concatenate(parts)
        starts = np.cumsum([0] + [len(p) for p in parts[:-1]])
        first_docs = np.asarray(ids, dtype=np.int64)[np.searchsorted(starts, np.arange(n) * self.seq_len,
                                                                     side="right") - 1]
        self._buffer = flat[need:].copy()  # a copy, so that the chunks' arrays can be freed
        self._buffer_doc = ids[-1]
        return flat[:need].reshape(n, self.seq_len), first_docs

    @property
    def bad_records(self) -> int:
        """Records skipped so far (data.on_bad_record=skip), over the whole run, resumes included."""
        return self._bad

    @property
    def epoch(self) -> int:
        return self._epoch

    def snapshot(self) -> dict:
        """The state after the last batch, cheap to take after every batch (see state_dict)."""
        state = {"format": STATE_FORMAT, "fingerprint": self.fingerprint, "mode": self.mode,
                 "seq_len": self.seq_len, "micro_batch_size": self.batch_size, "rank": self.rank,
                 "world_size": self.world_size, "epoch": self._epoch, "index": self._index,
                 "batches": self._batches, "bad_records": self._bad, "buffer": torch.from_numpy(self._buffer.copy()),
                 "buffer_doc": self._buffer_doc}
        if self._windows is not None:
            state["window_shuffle"] = self._windows.snapshot()
        return state

    def state_dict(self) -> dict:
        return self.materialize(self.snapshot())

    def materialize(self, snapshot: dict) -> dict:
        """A snapshot of this loader as its state_dict (checkpoint values): the shuffle buffer rebuilt as it was
        then (at most `history` batches ago, see reserve_history)."""
        state = {k: v for k, v in snapshot.items() if k != "window_shuffle"}
        shuffle = snapshot.get("window_shuffle")
        state["window_capacity"] = None
        if shuffle is not None:
            state.update(self._windows.state_at(shuffle, self.seq_len))
            state["window_capacity"] = shuffle["capacity"]
        return state

    def reserve_history(self, batches: int) -> None:
        """Let materialize() go back `batches` batches (BatchesAhead: as many as its thread can be ahead)."""
        if self._windows is not None:
            self._windows.keep(batches)

    def load_state_dict(self, state: dict) -> None:
        if state.get("format") not in (STATE_FORMAT, "llmopt.data/1"):
            raise ValueError(f"not a data-loader state of this version ({state.get('format')!r} != {STATE_FORMAT!r})")
        mine = {"fingerprint": self.fingerprint, "rank": self.rank, "world_size": self.world_size}
        diff = {k: (state.get(k), v) for k, v in mine.items() if state.get(k) != v}
        if diff:
            raise ValueError(f"cannot resume this data stream from that state: {diff} differ (saved, now). Resume "
                             f"with the same data config (source, tokenizer, mode, seq_len) and world size.")
        if self.mode == "truncate_pad" and len(state["buffer"]):
            raise ValueError("a truncate_pad stream has no pack buffer; this state is corrupt")
        capacity = self._windows.capacity if self._windows is not None else None
        saved = state.get("window_capacity")
        if saved != capacity:
            def shown(n):
                return "null" if n is None else n
            raise ValueError(f"cannot resume this data stream from that state: it was written with "
                             f"data.window_shuffle_buffer={shown(saved)}, this run has {shown(capacity)}; resume "
                             f"with data.window_shuffle_buffer={shown(saved)}")
        self.close()
        self._epoch, self._index = int(state["epoch"]), int(state["index"])
        self._batches, self._bad = int(state["batches"]), int(state["bad_records"])
        self._buffer = np.asarray(state["buffer"], dtype=np.int32).copy()
        self._buffer_doc = int(state.get("buffer_doc", 0))
        if self._windows is not None:
            self._windows.load(state)

    def close(self) -> None:
        """Stop the workers; the next batch re-opens the stream at the current position."""
        if self._docs is not None:
            self._docs.close()
            self._docs = None


class BatchesAhead:
    """A TrainLoader's batches made ahead on a background thread (`depth` ready, one more waiting for room;
    depth 0: made in the caller's next()), so that the training loop's host time goes to queueing GPU work, not
    to receiving chunks and padding rows. Each batch travels with the loader's state after it: state_dict() is
    the state after the last batch handed out, so resume stays exact (batches made ahead are dropped and made
    again). The thread ends on close(), on load_state_dict(), or soon after this object is dropped."""

    def __init__(self, loader: TrainLoader, depth: int):
        if depth < 0:
            raise ValueError(f"data.batches_ahead must be >= 0, got {depth}")
        self.loader, self.depth = loader, depth
        # the thread is at most depth + 1 batches ahead when state_dict() runs (depth queued, one waiting for
        # room), and may be making one more
        loader.reserve_history(depth + 2)
        self._state = loader.snapshot()   # after the last batch handed out
        self._thread: threading.Thread | None = None

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self.depth == 0:
            batch = next(self.loader)
            self._state = self.loader.snapshot()
            return batch
        if self._thread is None:
            self._queue, self._stop = queue.Queue(self.depth), threading.Event()
            self._thread = threading.Thread(target=_make_batches, args=(self.loader, self._queue, self._stop),
                                            daemon=True, name="llmopt-batches")  # holds no reference to self
            self._thread.start()
            weakref.finalize(self, self._stop.set)
        batch, state = self._queue.get()
        if batch is None:  # the loader raised: its state is that of the last batch queued, i.e. handed out
            self._thread.join()
            self._thread = None
            raise state
        self._state = state
        return batch

    def _halt(self) -> None:
        """Stop the thread and rewind the loader to the last batch handed out."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
            self.loader.load_state_dict(self.state_dict())
            self._state = self.loader.snapshot()  # the same position, as a snapshot of the reloaded buffer

    @property
    def bad_records(self) -> int:
        return int(self._state["bad_records"])

    @property
    def epoch(self) -> int:
        return int(self._state["epoch"])

    def state_dict(self) -> dict:
        return self.loader.materialize(self._state)

    def load_state_dict(self, state: dict) -> None:
        self._halt()
        self.loader.load_state_dict(state)
        self._state = self.loader.snapshot()

    def close(self) -> None:
        """Stop the thread and the workers; the next batch re-opens the stream after the last one handed out."""
        self._halt()
        self.loader.close()


def _make_batches(loader: TrainLoader, out: queue.Queue, stop: threading.Event) -> None:
    """BatchesAhead's thread: (batch, loader snapshot after it) into `out` until `stop`; an error from the loader
    goes into `out` after the batches made before it."""

    def put(item) -> None:
        while not stop.is_set():  # wait for room, but notice `stop` within 0.1 s
            with contextlib.suppress(queue.Full):
                return out.put(item, timeout=0.1)

    try:
        while not stop.is_set():
            put((next(loader), loader.snapshot()))
    except BaseException as error:
        put((None, error))


# ---- the validation set -------------------------------------------------------------------------------
class EvalSet:
    """The fixed validation set: sequences (unpadded tokens + lengths), the same for every run and world size."""

    def __init__(self, tokens: np.ndarray, lengths: np.ndarray, seq_len: int, pad_id: int, mode: str):
        self.tokens, self.lengths = tokens, lengths
        self.offsets = np.concatenate([[0], np.cumsum(lengths)])
        self.seq_len, self.pad_id, self.mode = seq_len, pad_id, mode

    @property
    def num_sequences(self) -> int:
        return len(self.lengths)

    @property
    def num_tokens(self) -> int:
        """Non-pad tokens in the whole set."""
        return int(self.lengths.sum())

    def batch_sizes(self, batch_size: int, world_size: int) -> list[int]:
        """Sizes of the consecutive batches the set is cut into: full batches, then the shortfall spread over
        the last ones so that the count is a multiple of world_size (every rank runs the same number of
        forward passes, which FSDP needs) and no batch is empty."""
        n = self.num_sequences
        count = math.ceil(math.ceil(n / batch_size) / world_size) * world_size
        if count > n:
            raise ValueError(f"the validation set has {n} sequences, too few for {world_size} ranks with at least "
                             f"one sequence per batch; raise data.eval_tokens")
        sizes = [batch_size] * count
        deficit, i = count * batch_size - n, count - 1
        while deficit:
            cut = min(deficit, batch_size - 1)
            sizes[i] -= cut
            deficit -= cut
            i -= 1
        return sizes

    def batches(self, batch_size: int, rank: int = 0, world_size: int = 1) -> Iterator[dict[str, torch.Tensor]]:
        """This rank's batches: batch b of the set goes to rank b % world_size."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        starts = np.concatenate([[0], np.cumsum(self.batch_sizes(batch_size, world_size))])
        for b in range(rank, len(starts) - 1, world_size):
            lo, hi = int(starts[b]), int(starts[b + 1])
            docs = [self.tokens[self.offsets[i]: self.offsets[i + 1]] for i in range(lo, hi)]
            rows, lengths = pad_rows(docs, self.seq_len, self.pad_id)
            yield make_batch(rows, lengths if self.mode == "truncate_pad" else None)


def build_eval_set(source: Source, settings: StreamSettings, *, mode: str, seq_len: int, pad_id: int,
                   eval_tokens: int | None) -> EvalSet:
    """The first sequences of the whole (never rank-split) eval stream holding >= eval_tokens non-pad tokens."""
    docs = DocStream(source, settings, rank=0, world_size=1, epoch=0, index=0, cycle=False)
    seqs: list[np.ndarray] = []
    total = 0
    pending = np.zeros(0, np.int32)  # packed mode: tokens not yet cut into a window
    try:
        while eval_tokens is None or total < eval_tokens:
            try:
                doc = docs.next_doc()
            except StopIteration:
                if eval_tokens is not None:
                    raise ValueError(
                        f"{source.description} holds only {total} tokens ({mode}, seq_len {seq_len}), fewer "
                        f"than data.eval_tokens={eval_tokens}; lower data.eval_tokens, or set it to null to "
                        f"use the whole source") from None
                break
            if mode == "truncate_pad":
                seqs.append(doc)
                total += len(doc)
                continue
            pending = np.concatenate([pending, doc])
            n_win = len(pending) // seq_len  # cut every full window at once (a long document gives many)
            if eval_tokens is not None:
                n_win = min(n_win, math.ceil((eval_tokens - total) / seq_len))
            seqs.extend(pending[: n_win * seq_len].reshape(n_win, seq_len))
            total += n_win * seq_len
            pending = pending[n_win * seq_len:]
    finally:
        docs.close()
    if not seqs:
        raise ValueError(f"{source.description} gave no complete validation sequence")
    return EvalSet(np.concatenate(seqs).astype(np.int32), np.array([len(s) for s in seqs], dtype=np.int64),
                   seq_len, pad_id, mode)
