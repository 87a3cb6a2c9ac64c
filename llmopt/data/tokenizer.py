"""Loading the tokenizer named by `data.tokenizer`, and the id-range checks that protect the model.

  "synthetic"              the offline corpus's word-level tokenizer (transformers PreTrainedTokenizerFast)
  a SentencePiece .model   used through the sentencepiece library itself (`SentencePieceTokenizer`): exact
                           for the model file, and 3-6x faster than its transformers conversion (whose unigram
                           tie-breaking also differs on ~0.2% of C4 documents)
  a tokenizers .json       transformers PreTrainedTokenizerFast over it
  a directory / Hub name   transformers AutoTokenizer (Hub names are tried in the local cache first, then the
                           Hub is probed so that an offline machine fails fast with a clear message)
A tokenizer without a pad token pads with EOS (padding is recognised by the attention mask, never by id).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from llmopt.data.config import DATA_DIR_HINT, DataConfig
from llmopt.data.encode import Encoder

_EOS_CANDIDATES = ("</s>", "<|endoftext|>", "<eos>", "<|end_of_text|>")
_PAD_CANDIDATES = ("<pad>", "[PAD]", "<|padding|>")
_UNK_CANDIDATES = ("<unk>", "[UNK]")


class SentencePieceTokenizer:
    """A thin tokenizer over a SentencePiece model, with T5's conventions (pieces + EOS, no BOS)."""

    def __init__(self, path: str | Path):
        import sentencepiece as spm

        self.name_or_path = str(path)
        self.model_proto = Path(path).read_bytes()
        self.sp = spm.SentencePieceProcessor(model_proto=self.model_proto)
        if self.sp.eos_id() < 0:
            raise ValueError(f"the SentencePiece model {path} has no EOS piece; documents need one to end with")
        self.eos_token_id = self.sp.eos_id()
        self.pad_token_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else self.eos_token_id
        self.unk_token_id = self.sp.unk_id()
        self.bos_token_id = None
        self.eos_token = self.sp.id_to_piece(self.eos_token_id)
        self.pad_token = self.sp.id_to_piece(self.pad_token_id)
        self.unk_token = self.sp.id_to_piece(self.unk_token_id)

    def __len__(self) -> int:
        return self.sp.get_piece_size()

    @property
    def vocab_size(self) -> int:
        return len(self)

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "sp"}

    def __setstate__(self, state):
        import sentencepiece as spm

        self.__dict__.update(state)
        self.sp = spm.SentencePieceProcessor(model_proto=self.model_proto)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.sp.encode(text) + ([self.eos_token_id] if add_special_tokens else [])

    def __call__(self, text: str | list[str], add_special_tokens: bool = True) -> dict:
        if isinstance(text, str):
            return {"input_ids": self.encode(text, add_special_tokens)}
        return {"input_ids": [self.encode(t, add_special_tokens) for t in text]}

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        ids = [int(i) for i in ids]
        if skip_special_tokens:
            ids = [i for i in ids if not (self.sp.is_control(i) or i == self.pad_token_id)]
        return self.sp.decode(ids)

    def batch_decode(self, batch, skip_special_tokens: bool = False) -> list[str]:
        return [self.decode(ids, skip_special_tokens) for ids in batch]

    def convert_ids_to_tokens(self, ids):
        return self.sp.id_to_piece(ids) if isinstance(ids, int) else [self.sp.id_to_piece(int(i)) for i in ids]

    def get_added_vocab(self) -> dict[str, int]:
        return {}


@dataclass
class LoadedTokenizer:
    tokenizer: object
    encoder: Encoder
    vocab_size: int
    pad_id: int
    eos_id: int
    description: str
    ident: str  # machine-independent name (file name or Hub name), for the resume fingerprint


def _from_tokenizer_file(path: Path):
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    vocab = Tokenizer.from_file(str(path)).get_vocab()
    pick = {role: next((t for t in cands if t in vocab), None)
            for role, cands in (("eos_token", _EOS_CANDIDATES), ("pad_token", _PAD_CANDIDATES),
                                ("unk_token", _UNK_CANDIDATES))}
    if pick["eos_token"] is None:
        raise ValueError(f"the tokenizer file {path} has none of the end-of-document tokens {_EOS_CANDIDATES}; "
                         f"save it as a transformers tokenizer directory with eos_token set instead")
    return PreTrainedTokenizerFast(tokenizer_file=str(path), **{k: v for k, v in pick.items() if v})


def _from_hub_or_dir(name: str, cfg: DataConfig, local_dir: Path | None):
    from transformers import AutoTokenizer

    if local_dir is not None:
        return AutoTokenizer.from_pretrained(str(local_dir))
    try:
        return AutoTokenizer.from_pretrained(name, local_files_only=True)  # a cached copy works offline
    except (OSError, ValueError):
        from llmopt.data.sources import check_hub

        check_hub(f"data.tokenizer {name!r} (not in the local Hugging Face cache)", cfg.hub_timeout_s)
        return AutoTokenizer.from_pretrained(name)


def load_tokenizer(cfg: DataConfig) -> LoadedTokenizer:
    name = cfg.tokenizer
    path = cfg.resolve(name)
    looks_like_path = name.endswith((".model", ".json", ".spm")) or name.startswith(("/", "./", "../", "~"))
    if name == "synthetic":
        from llmopt.data.synthetic import SyntheticSpec, build_tokenizer

        tok, desc = build_tokenizer(SyntheticSpec.from_mapping(cfg.synthetic)), "synthetic word-level"
    elif path.is_file() and path.suffix in (".model", ".spm"):
        tok, desc = SentencePieceTokenizer(path), f"SentencePiece {path}"
    elif path.is_file() and path.suffix == ".json":
        tok, desc = _from_tokenizer_file(path), f"tokenizers file {path}"
    elif path.is_dir():
        tok, desc = _from_hub_or_dir(name, cfg, path), f"tokenizer directory {path}"
    elif looks_like_path:
        raise FileNotFoundError(f"data.tokenizer: {name!r} not found (looked for {path}; data_dir is "
                                f"{cfg.data_dir}); fix {DATA_DIR_HINT} or data.tokenizer")
    else:
        tok, desc = _from_hub_or_dir(name, cfg, None), f"Hugging Face tokenizer {name!r}"

    if tok.eos_token_id is None:
        raise ValueError(f"{desc} has no EOS token; documents need one to end with (set its eos_token)")
    if tok.pad_token_id is None:  # e.g. GPT-2: pad with EOS; padding is masked by position, not by id
        tok.pad_token = tok.eos_token
    vocab_size = _vocab_size(tok, cfg.vocab_size, desc)
    unk = tok.unk_token_id if tok.unk_token_id is not None else tok.eos_token_id
    if isinstance(tok, SentencePieceTokenizer):
        encoder = Encoder("sentencepiece", tok.model_proto, mode=cfg.mode, seq_len=cfg.seq_len,
                          eos_id=tok.eos_token_id, unk_id=unk, vocab_size=vocab_size)
    elif getattr(tok, "backend_tokenizer", None) is not None:
        encoder = Encoder("tokenizers", tok.backend_tokenizer.to_str(), mode=cfg.mode, seq_len=cfg.seq_len,
                          eos_id=tok.eos_token_id, unk_id=unk, vocab_size=vocab_size,
                          truncation_side=tok.truncation_side,
                          split_special_tokens=bool(getattr(tok, "split_special_tokens", False)))
    else:  # a pure-Python transformers tokenizer travels to the workers whole
        encoder = Encoder("transformers", tok, mode=cfg.mode, seq_len=cfg.seq_len, eos_id=tok.eos_token_id,
                          unk_id=unk, vocab_size=vocab_size)
    return LoadedTokenizer(tok, encoder, vocab_size, tok.pad_token_id, tok.eos_token_id, desc, Path(name).name)


def _vocab_size(tok, wanted: int | None, desc: str) -> int:
    """The id space the pipeline emits: len(tokenizer), or `wanted` when only added special tokens (never
    needed by text, e.g. T5's sentinels) lie at or above it."""
    n = len(tok)
    if wanted is None or wanted >= n:
        return n if wanted is None else wanted
    specials = {tok.pad_token_id, tok.eos_token_id, tok.unk_token_id, getattr(tok, "bos_token_id", None)}
    cut = set(range(wanted, n))
    droppable = set(tok.get_added_vocab().values()) - specials
    if not cut <= droppable:
        regular = sorted(cut - droppable)
        raise ValueError(f"data.vocab_size={wanted} is smaller than {desc} needs: ids {regular[:5]}... "
                         f"({len(regular)} ids) are regular or special tokens the text uses, not droppable added "
                         f"tokens; set data.vocab_size to null (= {n}) or to at least {max(regular) + 1}")
    return wanted
