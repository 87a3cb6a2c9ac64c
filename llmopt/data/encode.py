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

The prefix shortcut (truncate_pad): a row keeps only the first ~seq_len tokens of a document (C4: ~250 of ~480),
so long texts are tokenized up to a space near 6 * seq_len characters instead of whole. It is exact when the
tokenizer splits the text into words at spaces before anything else can look across them (SentencePiece
models with no piece holding an inner "▁"; `tokenizers` pipelines whose pre-tokenizer splits on whitespace,
whose normalizer works character by character, with no added token containing a space): the tokens of the
text up to a space are then the first tokens of the whole text. A prefix that yields fewer tokens than a row
needs is tokenized again whole. Other tokenizers always tokenize whole texts.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable

import numpy as np

# normalizers that map characters one by one (no rule spans a space) and pre-tokenizers that split at spaces
_LOCAL_NORMALIZERS = {"Precompiled", "NFC", "NFD", "NFKC", "NFKD", "Lowercase", "Strip", "StripAccents"}
_SPACE_SPLITTERS = {"WhitespaceSplit", "Whitespace"}


def _tokenizers_prefix_safe(spec: dict, truncation_side: str) -> bool:
    """Whether a `tokenizers` pipeline (its JSON) allows the prefix shortcut (see the module docstring)."""
    norm, pre = spec.get("normalizer"), spec.get("pre_tokenizer")
    norms = [] if norm is None else norm.get("normalizers", [norm]) if norm["type"] == "Sequence" else [norm]
    first = pre and (pre["pretokenizers"][0] if pre["type"] == "Sequence" and pre["pretokenizers"] else pre)
    splits = bool(first) and (first["type"] in _SPACE_SPLITTERS
                              or (first["type"] == "Metaspace" and bool(first.get("split"))))
    spaced_added = any(any(c.isspace() for c in t.get("content", "")) for t in spec.get("added_tokens", []))
    return (truncation_side == "right" and splits and not spaced_added
            and all(n["type"] in _LOCAL_NORMALIZERS for n in norms))


class Encoder:
    def __init__(self, kind: str, payload, *, mode: str, seq_len: int, eos_id: int, unk_id: int, vocab_size: int,
                 truncation_side: str = "right", split_special_tokens: bool = False):
        if kind not in ("sentencepiece", "tokenizers", "transformers"):
            raise ValueError(f"unknown encoder kind {kind!r}")
        self.kind, self.payload = kind, payload
        self.mode, self.seq_len = mode, seq_len
        self.eos_id, self.unk_id, self.vocab_size = eos_id, unk_id, vocab_size
        self.truncation_side, self.split_special_tokens = truncation_side, split_special_tokens
        self.threads = 0  # sentencepiece threads; 0: the library's default; DataLoader workers use 1 each
        self._impl = None
        self._prefix_safe = False

    def __getstate__(self):
        return {**self.__dict__, "_impl": None}  # the tokenizer is rebuilt where it is used

    def _build(self):
        if self.kind == "sentencepiece":
            import sentencepiece as spm

            sp = spm.SentencePieceProcessor(model_proto=self.payload)
            self._prefix_safe = not any("▁" in sp.id_to_piece(i)[1:] for i in range(sp.get_piece_size()))
            return sp
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
            self._prefix_safe = _tokenizers_prefix_safe(json.loads(self.payload), self.truncation_side)
            return tk
        return self.payload

    def _sp_encode(self, texts: list[str]) -> list[list[int]]:
        return self._impl.encode(texts, **({"num_threads": self.threads} if self.threads else {}))

    def _tk_encode(self, texts: list[str], special: bool) -> list[list[int]]:
        return [e.ids for e in self._impl.encode_batch_fast(texts, add_special_tokens=special)]

    def _first_tokens(self, texts: list[str], encode: Callable[[list[str]], list[list[int]]],
                      enough: int) -> list[list[int]]:
        """encode(texts), or at least each result's first `enough` ids, through the prefix shortcut."""
        limit = 6 * self.seq_len  # characters: ~1.4x a row at C4's 4.4 characters per token
        cuts = [t.rfind(" ", 0, limit) if self._prefix_safe and len(t) > limit else -1 for t in texts]
        ids = encode([t[:c] if c > 0 else t for t, c in zip(texts, cuts)])
        redo = [i for i, c in enumerate(cuts) if c > 0 and len(ids[i]) < enough]
        for i, whole in zip(redo, encode([texts[i] for i in redo]) if redo else []):
            ids[i] = whole
        return ids

    def _pieces(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text: with the tokenizer's special tokens and truncation in truncate_pad mode,
        without them in packed mode (EOS is appended by the caller)."""
        if self._impl is None:
            self._impl = self._build()
        if self.mode == "packed":
            if self.kind == "sentencepiece":
                return self._sp_encode(texts)
            if self.kind == "tokenizers":
                return self._tk_encode(texts, special=False)
            return self._impl(texts, add_special_tokens=False)["input_ids"]
        if self.kind == "sentencepiece":  # T5's template "$A </s>": pieces cut to seq_len - 1, then EOS
            ids = self._first_tokens(texts, self._sp_encode, self.seq_len - 1)
            return [x[: self.seq_len - 1] + [self.eos_id] for x in ids]
        if self.kind == "tokenizers":  # truncation inside: a full row means the prefix was long enough
            return self._first_tokens(texts, lambda b: self._tk_encode(b, special=True), self.seq_len)
        return self._impl(texts, add_special_tokens=True, truncation=True, max_length=self.seq_len)["input_ids"]

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
