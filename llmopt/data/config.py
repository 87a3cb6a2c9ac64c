"""The data config: one `configs/data/<name>.yaml`, resolved to a plain dict, checked once here.

Keys (top level):
  name            a label (saved with the run's config; not part of the resume fingerprint)
  mode            "truncate_pad" (one document per sequence, the papers' protocol) or "packed"
  seq_len         tokens per sequence (>= 2: a causal LM needs one input and one target)
  tokenizer       a Hugging Face name ("t5-base"), a local path (SentencePiece .model, tokenizers .json,
                  or a saved tokenizer directory; relative to data_dir), or "synthetic" (the offline corpus)
  vocab_size      null = len(tokenizer); a smaller value cuts off added special tokens the text never needs
                  (t5-base's 100 <extra_id_*> sentinels: 32100 -> 32000, the papers' model vocabulary)
  train, eval     sources (below); eval is read whole-stream, never split across ranks
  extra_eval      more held-out sets, {name: source}, evaluated with eval and logged as eval/<name>/...
                  (each cut to eval_tokens like eval); default none
  window_shuffle_buffer
                  packed mode: windows held in the shuffle buffer that each training window is drawn from
                  (int32: seq_len x 4 bytes each, e.g. 16 MiB for 16384 windows of 256 tokens; the buffer travels
                  in checkpoints), so that a batch mixes many documents instead of consecutive windows of a few
                  long ones; null = the packer's order. The truncate_pad stream keeps the papers' document order.
  eval_tokens     the validation set: the first sequences of the eval stream holding at least this many
                  non-pad tokens (10M in the protocol); null = the whole eval source
  shuffle_seed    seed of the sources' shuffle; null = the run seed for train and 0 for eval
  num_workers     DataLoader worker processes per rank that tokenize (0 = in the training process)
  on_bad_record   "skip" (count and warn) or "fail", for records that cannot be parsed
  data_dir        base of relative paths; null = the project root (the directory holding pyproject.toml)
  synthetic       parameters of the synthetic corpus (see llmopt.data.synthetic.SyntheticSpec)
  chunk_docs      documents per tokenization task; prefetch: tasks in flight per worker
  batches_ahead   micro-batches assembled ahead on a background thread of the training process (0 = in the
                  training loop); resume stays exact either way
  hub_timeout_s   how long to wait for the Hugging Face Hub before failing with a clear message

A source is a mapping with `type`:
  hub        path, name, split, text_field, shuffle_buffer     -> datasets.load_dataset(path, name, split=split,
                                                                  streaming=True)
  local      files (paths or globs), format (auto|json|text|parquet), text_field, text_unit
             (line|paragraph|file, for plain text), shuffle_buffer, interleave. A files entry may also be a mapping
             {path, start, stop, weight}: only documents start..stop-1 of each matching file (0-based, stop null =
             to the end), e.g. to hold out the first articles of a shard for evaluation and train on the rest.
             interleave (default true): several files are read side by side, each next document drawn from file f
             with probability weight_f (default 1) / the sum over the files not yet used up in the epoch, each file
             through its own shuffle buffer; false: one file after another (llmopt.data.sources)
  synthetic  split, num_docs, shuffle_buffer
`shuffle_buffer` 0 keeps the stream's order; > 0 is datasets' `shuffle(seed, buffer_size)`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from llmopt.config import DataSchema

MODES = ("truncate_pad", "packed")
BAD_RECORD_POLICIES = ("skip", "fail")
FORMATS = ("auto", "json", "text", "parquet")
TEXT_UNITS = ("line", "paragraph", "file")

_SOURCE_KEYS = {
    "hub": {"type", "path", "name", "split", "text_field", "shuffle_buffer"},
    "local": {"type", "files", "format", "text_field", "text_unit", "shuffle_buffer", "interleave"},
    "synthetic": {"type", "split", "num_docs", "shuffle_buffer"},
}
_TOP_KEYS = {"name", "mode", "seq_len", "tokenizer", "vocab_size", "train", "eval", "extra_eval", "eval_tokens",
             "shuffle_seed", "num_workers", "on_bad_record", "data_dir", "synthetic", "chunk_docs", "prefetch",
             "batches_ahead", "hub_timeout_s", "window_shuffle_buffer"}
_REQUIRED = ("mode", "seq_len", "tokenizer", "train", "eval")
DATA_DIR_HINT = "data.data_dir (or the LLMOPT_DATA_DIR environment variable the local configs read)"


def project_root() -> Path:
    """The directory holding pyproject.toml above this package (the checkout); else the working directory."""
    for parent in Path(__file__).resolve().parents:
        if (parent / "pyproject.toml").is_file() and (parent / "llmopt").is_dir():
            return parent
    return Path.cwd()


@dataclass(frozen=True)
class FileSpec:
    """A local source's files entry: a path or glob, the documents [start, stop) kept of each match, and each
    match's weight when the source interleaves its files."""
    path: str
    start: int = 0
    stop: int | None = None
    weight: float = 1.0

    def describe(self) -> str:
        if self.start == 0 and self.stop is None:
            return self.path
        return f"{self.path}[{self.start}:{'' if self.stop is None else self.stop}]"


@dataclass(frozen=True)
class SourceConfig:
    type: str
    path: str | None = None          # hub
    name: str | None = None          # hub config name ("en")
    split: str = "train"             # hub, synthetic
    files: tuple[FileSpec, ...] = ()  # local
    format: str = "auto"             # local
    text_field: str = "text"         # hub, local json/parquet
    text_unit: str = "paragraph"     # local plain text
    interleave: bool = True          # local: several files read side by side
    num_docs: int = 0                # synthetic
    shuffle_buffer: int = 0


@dataclass(frozen=True)
class DataConfig:
    mode: str
    seq_len: int
    tokenizer: str
    train: SourceConfig
    eval: SourceConfig
    extra_eval: dict[str, SourceConfig] = field(default_factory=dict)
    # the defaults are the config schema's (llmopt.config.DataSchema), which Hydra composes the data group onto
    name: str = DataSchema.name
    vocab_size: int | None = DataSchema.vocab_size
    eval_tokens: int | None = DataSchema.eval_tokens
    shuffle_seed: int | None = DataSchema.shuffle_seed
    num_workers: int = DataSchema.num_workers
    on_bad_record: str = DataSchema.on_bad_record
    data_dir: Path = field(default_factory=project_root)   # DataSchema.data_dir null = the project root
    synthetic: dict = field(default_factory=dict)
    chunk_docs: int = DataSchema.chunk_docs
    prefetch: int = DataSchema.prefetch
    batches_ahead: int = DataSchema.batches_ahead
    hub_timeout_s: float = DataSchema.hub_timeout_s
    window_shuffle_buffer: int | None = DataSchema.window_shuffle_buffer

    def resolve(self, path: str) -> Path:
        """A config path: absolute, or relative to data_dir."""
        p = Path(path).expanduser()
        return p if p.is_absolute() else self.data_dir / p


def _plain(obj):
    """Mappings and sequences (OmegaConf containers included) as plain dicts and lists."""
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, Sequence) and not isinstance(obj, (str, bytes)):
        return [_plain(v) for v in obj]
    return obj


def _check_keys(where: str, cfg: dict, allowed: set[str]) -> None:
    unknown = sorted(set(cfg) - allowed)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; allowed keys are {sorted(allowed)}")


# metric names of an eval set, which an extra set's name must not shadow (eval/loss vs eval/<name>/loss)
_EVAL_METRICS = ("loss", "ppl", "tokens", "paper_loss", "paper_ppl")


def _int(where: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{where} must be an integer >= {minimum}, got {value!r}")
    return value


def _source(where: str, raw) -> SourceConfig:
    if not isinstance(raw, dict) or "type" not in raw:
        raise ValueError(f"data.{where} must be a mapping with a 'type' ({'|'.join(_SOURCE_KEYS)}), got {raw!r}")
    kind = raw["type"]
    if kind not in _SOURCE_KEYS:
        raise ValueError(f"data.{where}.type must be one of {sorted(_SOURCE_KEYS)}, got {kind!r}")
    _check_keys(f"data.{where} (type {kind})", raw, _SOURCE_KEYS[kind])
    if kind == "local":
        files = raw.get("files")
        if isinstance(files, str) or not isinstance(files, list) or not files:
            raise ValueError(f"data.{where}.files must be a non-empty list of paths or globs, got {files!r}")
        raw = {**raw, "files": tuple(_file_spec(f"data.{where}.files[{i}]", f) for i, f in enumerate(files))}
    src = SourceConfig(**raw)
    _int(f"data.{where}.shuffle_buffer", src.shuffle_buffer, 0)
    if kind == "hub" and not src.path:
        raise ValueError(f"data.{where}.path must name a Hub dataset, e.g. allenai/c4")
    if kind == "local":
        if not isinstance(src.interleave, bool):
            raise ValueError(f"data.{where}.interleave must be true or false, got {src.interleave!r}")
        if src.format not in FORMATS:
            raise ValueError(f"data.{where}.format must be one of {FORMATS}, got {src.format!r}")
        if src.text_unit not in TEXT_UNITS:
            raise ValueError(f"data.{where}.text_unit must be one of {TEXT_UNITS}, got {src.text_unit!r}")
    if kind == "synthetic":
        _int(f"data.{where}.num_docs", src.num_docs, 1)
    return src


def _file_spec(where: str, raw) -> FileSpec:
    if isinstance(raw, str) and raw:
        return FileSpec(raw)
    if not isinstance(raw, dict) or not isinstance(raw.get("path"), str) or not raw["path"]:
        raise ValueError(f"{where} must be a path (or glob), or a mapping {{path, start, stop}}, got {raw!r}")
    _check_keys(where, raw, {"path", "start", "stop", "weight"})
    start = raw.get("start") if raw.get("start") is not None else 0
    weight = raw.get("weight") if raw.get("weight") is not None else 1.0
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 < weight < math.inf:
        raise ValueError(f"{where}.weight must be a number > 0 (the file's share of the interleaved draws), got "
                         f"{weight!r}")
    spec = FileSpec(raw["path"], _int(f"{where}.start", start, 0),
                    None if raw.get("stop") is None else _int(f"{where}.stop", raw["stop"], 1), float(weight))
    if spec.stop is not None and spec.stop <= spec.start:
        raise ValueError(f"{where}: stop ({spec.stop}) must be greater than start ({spec.start}); the range "
                         f"[start, stop) of documents kept would be empty")
    return spec


def _extra_eval(raw) -> dict[str, SourceConfig]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ValueError(f"data.extra_eval must be a mapping {{name: source}}, got {raw!r}")
    for name in raw:
        if not re.fullmatch(r"[a-z][a-z0-9_]*", name) or name in _EVAL_METRICS:
            raise ValueError(f"data.extra_eval: {name!r} cannot name an eval set (its metrics are logged as "
                             f"eval/<name>/loss); use lower-case letters, digits and _, not one of {_EVAL_METRICS}")
    return {name: _source(f"extra_eval.{name}", src) for name, src in raw.items()}


def parse_config(data_cfg: Mapping) -> DataConfig:
    """Check a data config and return it typed; every problem is a ValueError naming the key."""
    raw = _plain(data_cfg)
    if not isinstance(raw, dict):
        raise ValueError(f"the data config must be a mapping (one configs/data/<name>.yaml), got {type(data_cfg)}")
    _check_keys("data", raw, _TOP_KEYS)
    missing = [k for k in _REQUIRED if raw.get(k) is None]
    if missing:
        raise ValueError(f"data config is missing required key(s) {missing}")
    if raw["mode"] not in MODES:
        raise ValueError(f"data.mode must be one of {MODES}, got {raw['mode']!r}")
    if isinstance(raw["seq_len"], bool) or not isinstance(raw["seq_len"], int) or raw["seq_len"] < 2:
        raise ValueError(f"data.seq_len must be an integer >= 2 (a causal LM needs at least one input and one "
                         f"target token per sequence), got {raw['seq_len']!r}")
    if raw.get("on_bad_record", DataSchema.on_bad_record) not in BAD_RECORD_POLICIES:
        raise ValueError(f"data.on_bad_record must be one of {BAD_RECORD_POLICIES}, got {raw['on_bad_record']!r}")
    kwargs = {k: v for k, v in raw.items() if v is not None and k not in ("train", "eval", "extra_eval", "data_dir")}
    kwargs["train"] = _source("train", raw["train"])
    kwargs["eval"] = _source("eval", raw["eval"])
    kwargs["extra_eval"] = _extra_eval(raw.get("extra_eval"))
    if raw.get("data_dir") is not None:
        data_dir = Path(str(raw["data_dir"])).expanduser()
        kwargs["data_dir"] = data_dir if data_dir.is_absolute() else project_root() / data_dir
    cfg = DataConfig(**kwargs)
    _int("data.num_workers", cfg.num_workers, 0)
    _int("data.chunk_docs", cfg.chunk_docs, 1)
    _int("data.prefetch", cfg.prefetch, 1)
    _int("data.batches_ahead", cfg.batches_ahead, 0)
    if cfg.window_shuffle_buffer is not None and (isinstance(cfg.window_shuffle_buffer, bool) or not isinstance(
            cfg.window_shuffle_buffer, int) or cfg.window_shuffle_buffer < 1):
        raise ValueError(f"data.window_shuffle_buffer must be a number of windows >= 1, or null for the packer's "
                         f"order, got {cfg.window_shuffle_buffer!r}")
    if cfg.vocab_size is not None:
        _int("data.vocab_size", cfg.vocab_size, 3)
    if cfg.eval_tokens is not None:
        _int("data.eval_tokens", cfg.eval_tokens, 1)
    if isinstance(cfg.hub_timeout_s, bool) or not isinstance(cfg.hub_timeout_s, (int, float)) or cfg.hub_timeout_s <= 0:
        raise ValueError(f"data.hub_timeout_s must be a number of seconds > 0, got {cfg.hub_timeout_s!r}")
    if not isinstance(cfg.synthetic, dict):
        raise ValueError(f"data.synthetic must be a mapping, got {cfg.synthetic!r}")
    return cfg
