"""Texts -> token ids, in the calling process or in a background worker process.

An `Encoder` is small and picklable: it carries only what a worker needs to rebuild the tokenizer (a
SentencePiece model's bytes, a `tokenizers` JSON string, or, for pure-Python tokenizers, the transformers
object itself), and builds it on first use in the process that encodes.

What a document becomes:
  truncate_pad  the tokenizer's own encoding with its special tokens, truncated to seq_len, exactly the
                reference call tokenizer(text, max_length=seq_len, truncation=True) (T5: pieces + EOS, and EOS
                stays last when truncating; a SentencePiece .model gets that same T5 layout)
  packed        the pieces without special tokens, then EOS (documents are later joined and cut into windows)
Ids >= vocab_size (only added special tokens such as T5's <extra_id_*> sentinels, checked when the tokenizer
is loaded) become unk, so the model never indexes past its embedding.
"""

from __future__ import annotations

import itertools

import numpy as np


class Encoder:
    def __init__(self, kind: str, payload, *, mode: str, seq_len: int, eos_id: int, unk_id: int, vocab_size: int,
                 truncation_side: str = "right", split_special_tokens: bool = False):
        if kind not in ("sentencepiece", "tokenizers", "transformers"):
            raise ValueError(f"unknown encoder kind {kind!r}")
        self.kind, self.payload = kind, payload
        self.mode, self.seq_len = mode, seq_len
        self.eos_id, self.unk_id, self.vocab_size = eos_id, unk_id, vocab_size
        self.truncation_side, self.split_special_tokens = truncation_side, split_special_tokens
        self.threads = 0  # 0: the library's default (all cores); workers use 1 each
        self._impl = None
        self._prefix_safe: bool | None = None  # sentencepiece: may a long text be cut at a space?

    def __getstate__(self):
        return {**self.__dict__, "_impl": None}  # the tokenizer is rebuilt where it is used

    def _build(self):
        if self.kind == "sentencepiece":
            import sentencepiece as spm

            return spm.SentencePieceProcessor(model_proto=self.payload)
        if self.kind == "tokenizers":
            from tokenizers import Tokenizer

            tk = Tokenizer.from_str(self.payload)
            tk.no_padding()
            if self.mode == "truncate_pad":  # as transformers sets it for truncation=True, max_length=L
                tk.enable_truncation(max_length=self.seq_len, strategy="longest_first",
                                     direction=self.truncation_side)
            else:
                tk.no_truncation()
            tk.encode_special_tokens = self.split_special_tokens
            return tk
        return self.payload

    def _sp_encode(self, texts: list[str]) -> list[list[int]]:
        return self._impl.encode(texts, **({"num_threads": self.threads} if self.threads else {}))

    def _sp_encode_prefixes(self, texts: list[str]) -> list[list[int]]:
        """Pieces of each text, or at least their first seq_len - 1, tokenizing only a prefix of long texts.

        Exact: when no piece holds an inner "▁" (the model splits by whitespace), a piece never spans a
        space, so the pieces of the text up to a space are the first pieces of the whole text. A prefix that
        gives fewer than seq_len - 1 pieces is re-done on the whole text. (truncate_pad keeps ~250 of C4's
        ~480 pieces per document: this halves the tokenization work.)"""
        if self._prefix_safe is None:
            sp = self._impl
            self._prefix_safe = not any("▁" in sp.id_to_piece(i)[1:] for i in range(sp.get_piece_size()))
        limit = 6 * self.seq_len  # characters: ~1.4x the seq_len - 1 pieces at C4's 4.4 characters per piece
        cuts = [t.rfind(" ", 0, limit) if self._prefix_safe and len(t) > limit else -1 for t in texts]
        ids = self._sp_encode([t[:c] if c > 0 else t for t, c in zip(texts, cuts)])
        redo = [i for i, c in enumerate(cuts) if c > 0 and len(ids[i]) < self.seq_len - 1]
        for i, full in zip(redo, self._sp_encode([texts[i] for i in redo]) if redo else []):
            ids[i] = full
        return ids

    def _pieces(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text: with the tokenizer's special tokens and truncation in truncate_pad mode,
        without them in packed mode (EOS is appended by the caller)."""
        if self._impl is None:
            self._impl = self._build()
        special = self.mode == "truncate_pad"
        if self.kind == "sentencepiece":
            if not special:
                return self._sp_encode(texts)
            ids = self._sp_encode_prefixes(texts)
            # T5's template "$A </s>": the pieces truncated to seq_len - 1, then EOS
            return [x[: self.seq_len - 1] + [self.eos_id] for x in ids]
        if self.kind == "tokenizers":
            return [e.ids for e in self._impl.encode_batch_fast(texts, add_special_tokens=special)]
        if special:
            return self._impl(texts, add_special_tokens=True, truncation=True, max_length=self.seq_len)["input_ids"]
        return self._impl(texts, add_special_tokens=False)["input_ids"]

    def encode(self, texts: list[str | None]) -> tuple[np.ndarray, np.ndarray]:
        """(ids, lengths): the int32 concatenation of every text's tokens, and each text's token count, -1 for
        None (a bad record, which keeps its place in the chunk)."""
        good = [t for t in texts if t is not None]
        pieces = self._pieces(good) if good else []
        lens = np.fromiter((len(p) for p in pieces), dtype=np.int64, count=len(pieces))
        flat = np.fromiter(itertools.chain.from_iterable(pieces), dtype=np.int32, count=int(lens.sum()))
        if self.mode == "packed":  # one EOS after every document
            flat = np.insert(flat, np.cumsum(lens), np.int32(self.eos_id))
            lens += 1
        flat[flat >= self.vocab_size] = self.unk_id
        lengths = np.full(len(texts), -1, dtype=np.int32)
        lengths[[i for i, t in enumerate(texts) if t is not None]] = lens
        return flat, lengths
