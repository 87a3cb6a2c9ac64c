"""`build_data`: the one entry point the trainer calls (the contract is in llmopt/data/__init__.py)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Mapping

import torch

from llmopt.data.config import DataConfig, parse_config
from llmopt.data.pipeline import BatchesAhead, EvalSet, StreamSettings, TrainLoader, build_eval_set
from llmopt.data.sources import Source, build_source
from llmopt.data.tokenizer import LoadedTokenizer, load_tokenizer


class Data:
    """Tokenizer, this rank's training stream and the fixed validation set of one data config."""

    def __init__(self, cfg: DataConfig, tok: LoadedTokenizer, train_source: Source, eval_source: Source, *,
                 micro_batch_size: int, rank: int, world_size: int, extra_eval_sources: dict | None = None,
                 train_seed: int = 0):
        self.config = cfg
        self.tokenizer = tok.tokenizer
        self.tokenizer_description = tok.description
        self.vocab_size = tok.vocab_size
        self.pad_id, self.eos_id = tok.pad_id, tok.eos_id
        self.rank, self.world_size = rank, world_size
        self._settings = StreamSettings(tok.encoder, cfg.num_workers, cfg.prefetch, cfg.chunk_docs,
                                        cfg.on_bad_record)
        # the validation set (name None) and the extra held-out sets, tokenized on first use
        self._eval_sources: dict[str | None, Source] = {None: eval_source, **(extra_eval_sources or {})}
        self._eval_sets: dict[str | None, EvalSet] = {}
        self.extra_eval_names: list[str] = list(extra_eval_sources or {})
        fingerprint = {"mode": cfg.mode, "seq_len": cfg.seq_len, "tokenizer": tok.ident,
                       "vocab_size": tok.vocab_size, "source": train_source.fingerprint,
                       "shuffle": [train_source.shuffle_buffer, train_source.shuffle_seed]}
        loader = TrainLoader(
            train_source, self._settings, mode=cfg.mode, seq_len=cfg.seq_len, micro_batch_size=micro_batch_size,
            pad_id=tok.pad_id, rank=rank, world_size=world_size,
            fingerprint=hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:16],
            window_shuffle_buffer=cfg.window_shuffle_buffer, window_seed=train_seed)
        self.train = BatchesAhead(loader, cfg.batches_ahead)
        self.entropy_per_token: float | None = None  # the loss floor, when the corpus is synthetic
        if cfg.train.type == "synthetic":
            from llmopt.data.synthetic import SyntheticCorpus, SyntheticSpec

            corpus = SyntheticCorpus(SyntheticSpec.from_mapping(cfg.synthetic))
            self.entropy_per_token = corpus.entropy_per_token(cfg.mode, cfg.seq_len)

    @property
    def eval_set(self) -> EvalSet:
        """The validation set (data.eval)."""
        return self.held_out_set(None)

    def held_out_set(self, name: str | None) -> EvalSet:
        """The validation set (None) or the extra held-out set `name`, built (tokenized) on first use and kept
        in memory (int32: 40 MB per 10M tokens)."""
        if name not in self._eval_sources:
            raise KeyError(f"no held-out set {name!r}; data.extra_eval names {self.extra_eval_names}")
        if name not in self._eval_sets:
            cfg = self.config
            self._eval_sets[name] = build_eval_set(self._eval_sources[name], self._settings, mode=cfg.mode,
                                                   seq_len=cfg.seq_len, pad_id=self.pad_id,
                                                   eval_tokens=cfg.eval_tokens)
        return self._eval_sets[name]

    def build_held_out_sets(self) -> None:
        """Tokenize the validation set and every extra held-out set now: a source too small for data.eval_tokens
        is then refused before the first step, not at the first evaluation."""
        for name in self._eval_sources:
            self.held_out_set(name)

    def eval_batches(self, batch_size: int, name: str | None = None) -> Iterator[dict[str, torch.Tensor]]:
        """A fresh iterator over this rank's share of the validation set (or of extra held-out set `name`);
        every rank gets the same number of batches, and the union over ranks is the 1-process set."""
        return self.held_out_set(name).batches(batch_size, self.rank, self.world_size)

    def check_vocab(self, model_vocab_size: int) -> None:
        """Refuse a model whose embedding has fewer rows than the ids the pipeline emits."""
        if self.vocab_size > model_vocab_size:
            raise ValueError(
                f"the tokenizer ({self.tokenizer_description}) emits ids up to {self.vocab_size - 1}, but the model's "
                f"vocabulary has only {model_vocab_size} entries: those ids would index past the embedding. Use a "
                f"model with vocab_size >= {self.vocab_size} (model.vocab_size={self.vocab_size}), or a "
                f"tokenizer with at most {model_vocab_size} ids (data.tokenizer, or data.vocab_size to cut off "
                f"added special tokens).")

    def close(self) -> None:
        """Stop the training stream's worker processes (they also stop when the Data object is released)."""
        self.train.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def build_data(data_cfg: Mapping, *, micro_batch_size: int, rank: int = 0, world_size: int = 1,
               seed: int = 0) -> Data:
    """Everything data for one rank. `seed` (the run seed) shuffles the training stream only when
    data.shuffle_seed is null; the validation set never depends on it."""
    cfg = parse_config(data_cfg)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}")
    tok = load_tokenizer(cfg)
    train_seed = cfg.shuffle_seed if cfg.shuffle_seed is not None else seed
    eval_seed = cfg.shuffle_seed if cfg.shuffle_seed is not None else 0
    train_source = build_source(cfg, "train", train_seed)
    eval_source = build_source(cfg, "eval", eval_seed)
    extra = {name: build_source(cfg, f"extra_eval.{name}", eval_seed, src) for name, src in cfg.extra_eval.items()}
    return Data(cfg, tok, train_source, eval_source, micro_batch_size=micro_batch_size, rank=rank,
                world_size=world_size, extra_eval_sources=extra, train_seed=train_seed)
