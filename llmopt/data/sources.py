"""Document sources: the Hugging Face Hub (streamed), local files, and the synthetic corpus.

All three become a `datasets.IterableDataset`, so shuffling (`shuffle(seed, buffer_size)` + `set_epoch`) and
rank sharding (`split_dataset_by_node`) are the very same code for each. Local files are read by our own
reader, wrapped with `IterableDataset.from_generator` (one shard per file): datasets' JSON builder aborts a
whole file on one malformed line, and we need to skip-and-count such lines or fail with the file and line.

A source yields records (text, error): a document's text, or (None, message) for a record that could not be
parsed; the pipeline skips or fails on those (data.on_bad_record). Every record keeps its place in the stream,
which is what makes a resume position (epoch, record index) exact.

A local source of several files reads them side by side by default (`interleave: true`, InterleavedSource): each
file is shuffled through its own buffer, and each next record comes from file f with probability weight_f / the
sum of the weights of the files not yet used up in this epoch; the draws are seeded by (seed, epoch), so that the
order is llmopt's own and does not change with the datasets version. The ranks then split that one stream record
by record. `interleave: false` reads the files one after another (datasets shuffles their order each epoch and
hands whole files to the ranks when their count divides the world size).
"""

from __future__ import annotations

import contextlib
import glob
import inspect
import io
import itertools
import json
import lzma
import os
from collections.abc import Iterator
from pathlib import Path

import datasets
import numpy as np
from datasets import Features, IterableDataset, Value, load_dataset
from datasets.distributed import split_dataset_by_node

from llmopt.data.config import DATA_DIR_HINT, DataConfig, FileSpec, SourceConfig
from llmopt.data.synthetic import SyntheticCorpus, SyntheticSpec

_COMPRESSIONS = (".gz", ".xz", ".zst", ".zstd", ".bz2")
_FORMAT_OF_SUFFIX = {".jsonl": "json", ".json": "json", ".ndjson": "json", ".txt": "text", ".text": "text",
                     ".md": "text", ".parquet": "parquet"}
_RECORD_FEATURES = Features({"text": Value("string"), "error": Value("string")})
OFFLINE_HINT = ("To run without the Hub, point the data config at local files: `data=c4_local` (the C4 sample "
                "under data_dir), or set data.train / data.eval to {type: local, files: [...]} (JSON lines, plain "
                "text or parquet; .gz/.xz/.zst allowed) and data.tokenizer to a local SentencePiece .model "
                "(e.g. tokenizers/llmopt-en-32k.model); `data=offline` needs no files at all.")


# shuffle() = shuffled shard order + a buffer of shuffle_buffer records, as in the reference code's datasets
# 2.x. datasets >= 5 would also interleave 10 shards into the buffer through a thread pool, one thread hop per
# record (3x the cost of reading a JSON line): turned off where the option exists.
_ONE_SHARD_AT_A_TIME = ({"max_buffer_input_shards": 1}
                        if "max_buffer_input_shards" in inspect.signature(IterableDataset.shuffle).parameters else {})


class HubUnreachableError(RuntimeError):
    """The Hugging Face Hub cannot be reached (no network, offline mode, or a timeout)."""


def check_hub(what: str, timeout: float) -> None:
    """Fail fast, with one clear message, when the Hub cannot be reached; `load_dataset` itself retries for
    tens of seconds (or hangs behind a firewall that drops packets) before failing."""
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
            raise HubUnreachableError(f"{what} needs the Hugging Face Hub, but {var} is set. {OFFLINE_HINT}")
    from huggingface_hub.utils import get_session

    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    try:
        get_session().head(endpoint, timeout=timeout)  # any HTTP answer, even an error code, means reachable
    except Exception as exc:  # noqa: BLE001 - every transport failure (DNS, refused, timeout, TLS) means the same
        raise HubUnreachableError(f"{what} needs the Hugging Face Hub, but {endpoint} cannot be reached within "
                                  f"{timeout:g} s ({type(exc).__name__}: {exc}). {OFFLINE_HINT}") from None


# ---- local files ------------------------------------------------------------------------------------------
def file_format(path: str, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    name = path.lower()
    for ext in _COMPRESSIONS:
        if name.endswith(ext):
            name = name[: -len(ext)]
    fmt = _FORMAT_OF_SUFFIX.get(os.path.splitext(name)[1])
    if fmt is None:
        raise ValueError(f"cannot tell the format of {path} from its name; set the source's format to json, text "
                         f"or parquet")
    return fmt


def resolve_files(cfg: DataConfig, src: SourceConfig, role: str) -> list[tuple[str, int, int | None, float]]:
    """The files of a local source, globs expanded, checked to exist and be non-empty, each with the range
    [start, stop) of its documents that the source keeps and its interleaving weight (each match of a glob gets
    the entry's weight)."""
    files: list[tuple[str, int, int | None, float]] = []
    for spec in src.files:
        pattern = spec.path
        path = cfg.resolve(pattern)
        if glob.has_magic(str(path)):
            matches = sorted(glob.glob(str(path)))
        else:
            matches = [str(path)] if path.exists() else []
        if not matches:
            raise FileNotFoundError(
                f"data.{role}.files: no file matches {pattern!r} (looked for {path}; data_dir is {cfg.data_dir}). "
                f"Fix {DATA_DIR_HINT} or data.{role}.files.")
        for match in matches:
            if os.path.isdir(match):
                raise ValueError(f"data.{role}.files: {match} is a directory; list its files or use a glob "
                                 f"such as {os.path.join(pattern, '*.jsonl.gz')}")
            if os.path.getsize(match) == 0:
                raise ValueError(f"data.{role}.files: {match} is empty (0 bytes); remove it from the list")
            file_format(match, src.format)  # fails early on an unknown extension
        files.extend((match, spec.start, spec.stop, spec.weight) for match in matches)
    return files


def _open(path: str):
    import fsspec

    if path.endswith((".zst", ".zstd")):
        return io.BufferedReader(_ZstdFrames(fsspec.open(path, "rb").open()), buffer_size=1 << 20)
    # gzip, xz, bz2 by extension; each raises EOFError on a truncated file
    return io.BufferedReader(fsspec.open(path, "rb", compression="infer").open())


class _ZstdFrames(io.RawIOBase):
    """A .zst file's frames decompressed one after another. zstandard's stream reader ends quietly where a
    truncated file ends (its last line then reads as a malformed record); this one raises EOFError there."""

    def __init__(self, compressed):
        import zstandard

        self.compressed, self.new_frame = compressed, zstandard.ZstdDecompressor().decompressobj
        self.frame, self.in_frame = self.new_frame(), False
        self.pending, self.offset = memoryview(b""), 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while self.offset == len(self.pending):
            rest = b""
            if self.frame.eof:  # what follows a frame's end starts the next frame
                rest, self.frame = self.frame.unused_data, self.new_frame()
            chunk = rest or self.compressed.read(1 << 20)
            if not chunk:
                if self.in_frame:
                    raise EOFError("the zstd stream ends inside a frame")
                return 0
            self.pending, self.offset = memoryview(self.frame.decompress(chunk)), 0
            self.in_frame = not self.frame.eof
        n = min(len(buffer), len(self.pending) - self.offset)
        buffer[:n] = self.pending[self.offset:self.offset + n]
        self.offset += n
        return n

    def close(self) -> None:
        self.compressed.close()
        super().close()


def _json_records(f, path: str, text_field: str) -> Iterator[tuple[str | None, str | None]]:
    for lineno, line in enumerate(f, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
            yield None, f"{path}:{lineno}: malformed JSON line ({exc})"
            continue
        if not isinstance(obj, dict):
            yield None, f"{path}:{lineno}: a JSON line must hold an object, got {type(obj).__name__}"
            continue
        text = obj.get(text_field)
        if not isinstance(text, str):
            raise ValueError(f"{path}:{lineno}: the record has no text field {text_field!r} (keys: {sorted(obj)}); "
                             f"set the source's text_field to the key that holds the document text")
        yield text, None


def _decode(raw: bytes, where: str) -> tuple[str | None, str | None]:
    try:
        return raw.decode("utf-8").strip("\r\n"), None
    except UnicodeDecodeError as exc:
        return None, f"{where}: not UTF-8 text ({exc})"


def _text_records(f, path: str, unit: str) -> Iterator[tuple[str | None, str | None]]:
    """Plain text: one document per non-blank line, per blank-line separated paragraph, or per file."""
    if unit == "file":
        yield _decode(f.read(), path)
        return
    if unit == "line":
        for lineno, line in enumerate(f, 1):
            if line.strip():
                yield _decode(line, f"{path}:{lineno}")
        return
    para: list[bytes] = []
    start = 0
    for lineno, line in enumerate(f, 1):
        if line.strip():
            start = start if para else lineno
            para.append(line)
        elif para:
            yield _decode(b"".join(para), f"{path}:{start}")
            para = []
    if para:
        yield _decode(b"".join(para), f"{path}:{start}")


def _parquet_records(path: str, text_field: str) -> Iterator[tuple[str | None, str | None]]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    if text_field not in pf.schema_arrow.names:
        raise ValueError(f"{path}: no column {text_field!r} (columns: {pf.schema_arrow.names}); set the source's "
                         f"text_field to the column that holds the document text")
    row = 0
    for batch in pf.iter_batches(columns=[text_field], batch_size=1024):
        for text in batch.column(0).to_pylist():
            row += 1
            if not isinstance(text, str):
                raise ValueError(f"{path}: row {row} has no text in column {text_field!r} ({text!r})")
            yield text, None


def _read_errors() -> tuple[type[BaseException], ...]:
    """What truncated or corrupt compressed data raises, per codec."""
    errors: list[type[BaseException]] = [EOFError, OSError, lzma.LZMAError]
    try:
        import zstandard

        errors.append(zstandard.ZstdError)
    except ImportError:
        pass
    return tuple(errors)


def read_local_files(files: list[str], fmt: str, text_field: str, text_unit: str,
                     doc_ranges: list[tuple[int, int | None]] | None = None) -> Iterator[dict]:
    """Records of local files, in order (the generator behind a local source; one datasets shard per file).
    doc_ranges[i] = (start, stop) keeps only documents start..stop-1 of files[i] (stop None: to the end)."""
    for i, path in enumerate(files):
        kind = file_format(path, fmt)
        start, stop = doc_ranges[i] if doc_ranges is not None else (0, None)
        count = 0
        try:
            with contextlib.ExitStack() as stack:
                if kind == "parquet":
                    records = _parquet_records(path, text_field)
                else:
                    f = stack.enter_context(_open(path))
                    records = (_json_records(f, path, text_field) if kind == "json"
                               else _text_records(f, path, text_unit))
                for text, error in records:
                    count += 1
                    if count > start:
                        yield {"text": text, "error": error}
                    if count == stop:
                        break
        except _read_errors() as exc:
            raise ValueError(f"{path}: cannot be read to the end ({type(exc).__name__}: {exc}); the file is "
                             f"truncated, or its compression does not match its name") from exc
        if count == 0:
            raise ValueError(f"{path} holds no documents; remove it from the source's files")
        if count <= start:
            raise ValueError(f"{path} holds {count} documents, so start={start} keeps none of them; lower the "
                             f"files entry's start")


def _synthetic_records(blocks: list[int], corpus: SyntheticCorpus, split: str, num_docs: int) -> Iterator[dict]:
    for block in blocks:
        docs = corpus.documents(split, block)
        for text in docs[: num_docs - block * corpus.spec.block_docs]:
            yield {"text": text, "error": None}


# ---- the source object ------------------------------------------------------------------------------------
class Source:
    """A document stream: `records(epoch, rank, world_size)` is this rank's share of one pass (epoch)."""

    def __init__(self, description: str, dataset: IterableDataset, text_field: str, shuffle_buffer: int,
                 shuffle_seed: int, fingerprint: dict):
        self.description = description
        self.dataset = dataset
        self.text_field = text_field
        self.shuffle_buffer = shuffle_buffer
        self.shuffle_seed = shuffle_seed
        self.fingerprint = fingerprint  # what defines the stream, for resume checks (no machine paths)

    def records(self, epoch: int, rank: int = 0, world_size: int = 1) -> Iterator[tuple[str | None, str | None]]:
        ds = self.dataset
        if self.shuffle_buffer:
            ds = ds.shuffle(seed=self.shuffle_seed, buffer_size=self.shuffle_buffer, **_ONE_SHARD_AT_A_TIME)
        if world_size > 1:  # the same seed on every rank, so that the ranks split one shuffled stream
            ds = split_dataset_by_node(ds, rank=rank, world_size=world_size)
        if self.shuffle_buffer:
            ds.set_epoch(epoch)  # after the split: split_dataset_by_node does not carry the epoch over
        # ds.iter (batches of records), not iter(ds): inside a DataLoader worker, iter(ds) would hand each
        # worker only some of the shards, and our workers must all see the rank's whole stream
        field = self.text_field
        for batch in ds.iter(batch_size=256):
            texts = batch.get(field)
            if texts is None:
                raise ValueError(f"{self.description}: the records have no text field {field!r} (keys: "
                                 f"{sorted(batch)}); set the source's text_field")
            for text, error in zip(texts, batch.get("error") or itertools.repeat(None)):
                if error is not None:
                    yield None, error
                elif not isinstance(text, str):
                    raise ValueError(f"{self.description}: a record has no text in field {field!r} ({text!r})")
                else:
                    yield text, None


class InterleavedSource:
    """Several sources read side by side (see the module docstring): the same `records` contract as Source."""

    def __init__(self, description: str, parts: list[Source], weights: list[float], seed: int, fingerprint: dict):
        self.description, self.parts, self.weights, self.seed = description, parts, weights, seed
        self.shuffle_buffer, self.shuffle_seed = parts[0].shuffle_buffer, seed
        self.fingerprint = fingerprint

    def records(self, epoch: int, rank: int = 0, world_size: int = 1) -> Iterator[tuple[str | None, str | None]]:
        merged = self._merged(epoch)
        # every rank reads the whole merged stream and keeps its share (reading is cheap next to tokenizing)
        return itertools.islice(merged, rank, None, world_size) if world_size > 1 else merged

    def _merged(self, epoch: int) -> Iterator[tuple[str | None, str | None]]:
        streams = [part.records(epoch) for part in self.parts]
        weights = np.asarray(self.weights, dtype=np.float64)
        rng = np.random.default_rng([self.seed, epoch])
        active = list(range(len(streams)))
        while active:
            p = weights[active] / weights[active].sum()
            for pick in rng.choice(len(active), size=4096, p=p).tolist():
                record = next(streams[active[pick]], None)
                if record is None:  # that file is used up: draw again among the others
                    del active[pick]
                    break
                yield record


def build_source(cfg: DataConfig, role: str, shuffle_seed: int, src: SourceConfig | None = None) -> Source:
    """The Source of data.<role> ("train", "eval", or "extra_eval.<name>" with its `src`); Hub sources are
    probed first (fail fast offline)."""
    src = src if src is not None else getattr(cfg, role)
    datasets.disable_progress_bars()
    if src.type == "hub":
        what = f"data.{role} (Hub dataset {src.path}, config {src.name}, split {src.split})"
        check_hub(what, cfg.hub_timeout_s)
        ds = load_dataset(src.path, src.name, split=src.split, streaming=True)
        if ds.features is not None:
            if src.text_field not in ds.features:
                raise ValueError(f"{what} has no column {src.text_field!r} (columns: {list(ds.features)}); set "
                                 f"data.{role}.text_field")
            ds = ds.select_columns([src.text_field])
        fingerprint = {"type": "hub", "path": src.path, "name": src.name, "split": src.split}
        return Source(what, ds, src.text_field, src.shuffle_buffer, shuffle_seed, fingerprint)
    if src.type == "local":
        files = resolve_files(cfg, src, role)
        paths, ranges = [f[0] for f in files], [(f[1], f[2]) for f in files]
        fingerprint = {"type": "local", "files": [Path(p).name for p in paths], "text_field": src.text_field,
                       "text_unit": src.text_unit}
        if any(r != (0, None) for r in ranges):  # only when used: earlier checkpoints still resume
            fingerprint["doc_ranges"] = [list(r) for r in ranges]
        described = [FileSpec(f[0], f[1], f[2]).describe() for f in files]
        what = f"data.{role} (local files {described})"
        if not src.interleave or len(files) == 1:
            return Source(what, _local_dataset(src, paths, ranges), "text", src.shuffle_buffer, shuffle_seed,
                          fingerprint)
        weights = [f[3] for f in files]
        fingerprint["interleave"] = weights  # another order than reading the files one after another
        # each file its own shuffle seed, so that the buffers do not draw in step
        seeds = np.random.SeedSequence([shuffle_seed, len(files)]).generate_state(len(files)).tolist()
        parts = [Source(f"{what}: {name}", _local_dataset(src, [path], [rng]), "text", src.shuffle_buffer, seed, {})
                 for name, path, rng, seed in zip(described, paths, ranges, seeds)]
        return InterleavedSource(f"{what}, interleaved with weights {weights}", parts, weights, shuffle_seed,
                                 fingerprint)
    spec = SyntheticSpec.from_mapping(cfg.synthetic)
    corpus = SyntheticCorpus(spec)
    n_blocks = -(-src.num_docs // spec.block_docs)
    ds = IterableDataset.from_generator(
        _synthetic_records, features=_RECORD_FEATURES,
        gen_kwargs={"blocks": list(range(n_blocks)), "corpus": corpus, "split": src.split, "num_docs": src.num_docs})
    fingerprint = {"type": "synthetic", "split": src.split, "num_docs": src.num_docs, **vars(spec)}
    return Source(f"data.{role} (synthetic corpus, split {src.split})", ds, "text", src.shuffle_buffer,
                  shuffle_seed, fingerprint)


def _local_dataset(src: SourceConfig, paths: list[str], ranges: list[tuple[int, int | None]]) -> IterableDataset:
    """The records of local files as a datasets stream, one shard per file."""
    return IterableDataset.from_generator(
        read_local_files, features=_RECORD_FEATURES,
        gen_kwargs={"files": paths, "fmt": src.format, "text_field": src.text_field, "text_unit": src.text_unit,
                    "doc_ranges": ranges})
