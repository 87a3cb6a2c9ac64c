"""The offline default corpus: documents drawn from a seeded class-based Markov chain, with a word-level
tokenizer built in memory, so that a run needs no download and nothing outside the project.

The generative process (a small probabilistic grammar over `vocab_size - 3` made-up words):
  * the words are split into `num_classes` classes ("parts of speech");
  * a document starts with a class drawn from pi0, and each next class from a sparse class-transition
    matrix T (every class has `successors` possible next classes);
  * each word is drawn from its class's own (Dirichlet-skewed) word distribution;
  * after every word the document ends with probability p = 1 / mean_doc_words (so lengths are geometric,
    1 .. several times the mean: truncate_pad pads the short ones and truncates the long ones).
Token ids: pad 0, eos 1, unk 2 (T5's layout), words 3 .. vocab_size-1. Text is the words joined by spaces.

Because the class of a word is a function of the word, the next-token distribution given the whole history
depends only on the class of the previous token (or on the previous token being EOS), which makes the
entropy exact and the process learnable by a small model (the log-probabilities are rank <= num_classes + 1):
  H_c   = H_b(p) + (1 - p) * (H(T[c]) + sum_c' T[c, c'] H(E_c'))     next token after a word of class c
  H_eos = H(pi0) + sum_c pi0[c] H(E_c)                                next token after EOS
`entropy_per_token` gives the optimal cross-entropy per predicted token (nats) of each sequence mode:
  packed        the stationary entropy rate sum_s mu(s) H_s of the stream doc EOS doc EOS ...
  truncate_pad  E[sum of H over the targets of one sequence] / E[number of targets], where a sequence is one
                document + EOS truncated to seq_len (the last slot is then always EOS, which a position-aware
                model predicts with certainty) and the first token is never a target (labels are shifted).
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from dataclasses import dataclass, fields

import numpy as np

SPECIAL_TOKENS = ("<pad>", "</s>", "<unk>")
PAD_ID, EOS_ID, UNK_ID = 0, 1, 2


@dataclass(frozen=True)
class SyntheticSpec:
    seed: int = 1234              # the corpus (chain parameters and documents); not the run seed
    vocab_size: int = 512         # token ids, specials included (the `tiny` model flavor has 512)
    num_classes: int = 16
    successors: int = 4           # possible next classes of each class
    mean_doc_words: float = 96.0
    block_docs: int = 256         # documents generated together (one datasets shard per block)

    @classmethod
    def from_mapping(cls, cfg: Mapping | None) -> SyntheticSpec:
        cfg = dict(cfg or {})
        allowed = {f.name for f in fields(cls)}
        unknown = sorted(set(cfg) - allowed)
        if unknown:
            raise ValueError(f"data.synthetic: unknown key(s) {unknown}; allowed keys are {sorted(allowed)}")
        spec = cls(**cfg)
        if spec.vocab_size - len(SPECIAL_TOKENS) < spec.num_classes or spec.num_classes < 1:
            raise ValueError(f"data.synthetic needs 1 <= num_classes <= vocab_size - 3, got {spec}")
        if not 1 <= spec.successors <= spec.num_classes or spec.mean_doc_words < 1 or spec.block_docs < 1:
            raise ValueError(f"data.synthetic needs 1 <= successors <= num_classes, mean_doc_words >= 1 "
                             f"and block_docs >= 1, got {spec}")
        return spec


def word_strings(n: int) -> list[str]:
    """n distinct pronounceable two-syllable words, the same for every corpus seed."""
    syllables = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]
    words = [a + b for a in syllables for b in syllables]
    if n > len(words):
        raise ValueError(f"the synthetic vocabulary holds at most {len(words) + len(SPECIAL_TOKENS)} ids")
    order = np.random.default_rng(0).permutation(len(words))[:n]
    return [words[i] for i in order]


def _entropy(p: np.ndarray) -> float | np.ndarray:
    """Entropy in nats along the last axis (0 log 0 = 0)."""
    logp = np.log(np.where(p > 0, p, 1.0))
    return -(p * logp).sum(-1)


def _inverse_cdf(cum: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Row-wise sampling: index of the first cumulative probability >= u (cum rows end at ~1)."""
    return np.minimum((cum < u[:, None]).sum(-1), cum.shape[-1] - 1)


class SyntheticCorpus:
    """The chain's parameters (a function of `spec.seed`) and the documents of any split and block."""

    def __init__(self, spec: SyntheticSpec):
        self.spec = spec
        rng = np.random.default_rng(spec.seed)
        n_words, n_cls = spec.vocab_size - len(SPECIAL_TOKENS), spec.num_classes
        self.words = np.array(word_strings(n_words), dtype=object)
        groups = np.array_split(np.arange(n_words), n_cls)
        self.class_start = np.array([g[0] for g in groups]) + len(SPECIAL_TOKENS)
        self.class_size = np.array([len(g) for g in groups])
        self.word_class = np.concatenate([np.full(len(g), c) for c, g in enumerate(groups)])
        # within-class word distributions, Zipf-like skew from a sparse Dirichlet
        self.word_probs = [rng.dirichlet(np.full(len(g), 0.5)) for g in groups]
        self.transition = np.zeros((n_cls, n_cls))
        for c in range(n_cls):
            nxt = rng.choice(n_cls, size=spec.successors, replace=False)
            self.transition[c, nxt] = rng.dirichlet(np.ones(spec.successors))
        self.pi0 = rng.dirichlet(np.ones(n_cls))
        self.p_end = 1.0 / spec.mean_doc_words
        # cumulative tables for vectorized sampling (word table padded with 1.0 past each class's size)
        self._cum_pi0 = np.cumsum(self.pi0)
        self._cum_t = np.cumsum(self.transition, axis=1)
        self._cum_w = np.ones((n_cls, self.class_size.max()))
        for c, p in enumerate(self.word_probs):
            self._cum_w[c, : len(p)] = np.cumsum(p)
        self._h_word = np.array([_entropy(p) for p in self.word_probs])

    # ---- documents -------------------------------------------------------------------------------------
    def documents(self, split: str, block: int) -> list[str]:
        """The `block_docs` documents of block `block` of `split`, as text (deterministic in all three)."""
        rng = np.random.default_rng([self.spec.seed, zlib.crc32(split.encode()), block])
        n = self.spec.block_docs
        lengths = rng.geometric(self.p_end, size=n)
        order = np.argsort(-lengths, kind="stable")      # longest first: the active docs are a prefix
        sorted_len = lengths[order]
        classes = np.zeros((n, int(sorted_len[0])), dtype=np.int64)
        classes[:, 0] = _inverse_cdf(self._cum_pi0[None, :], rng.random(n))
        active = n
        for t in range(1, classes.shape[1]):  # one vectorized step per position, over all unfinished docs
            while sorted_len[active - 1] <= t:
                active -= 1
            classes[:active, t] = _inverse_cdf(self._cum_t[classes[:active, t - 1]], rng.random(active))
        flat_cls = classes[np.arange(classes.shape[1]) < sorted_len[:, None]]   # doc by doc, in sorted order
        within = _inverse_cdf(self._cum_w[flat_cls], rng.random(flat_cls.size))
        ids = self.class_start[flat_cls] + np.minimum(within, self.class_size[flat_cls] - 1)
        docs_sorted = np.split(self.words[ids - len(SPECIAL_TOKENS)], np.cumsum(sorted_len)[:-1])
        docs = [""] * n
        for rank, idx in enumerate(order):
            docs[idx] = " ".join(docs_sorted[rank])
        return docs

    # ---- exact probabilities -----------------------------------------------------------------------------
    def next_token_logprob(self, prev: np.ndarray, nxt: np.ndarray) -> np.ndarray:
        """log P(next token | previous token) of the stream doc EOS doc EOS ... (ids; -inf where impossible)."""
        prev, nxt = np.asarray(prev), np.asarray(nxt)
        with np.errstate(divide="ignore"):
            log_word = np.full(self.spec.vocab_size, -np.inf)
            log_word[len(SPECIAL_TOKENS):] = np.log(np.concatenate(self.word_probs))
            cls = np.zeros(self.spec.vocab_size, dtype=np.int64)
            cls[len(SPECIAL_TOKENS):] = self.word_class
            after_word = np.where(nxt == EOS_ID, np.log(self.p_end),
                                  np.log1p(-self.p_end) + np.log(self.transition[cls[prev], cls[nxt]])
                                  + log_word[nxt])
            after_eos = np.log(self.pi0[cls[nxt]]) + log_word[nxt]
            out = np.where(prev == EOS_ID, after_eos, after_word)
        valid = (prev >= len(SPECIAL_TOKENS)) | (prev == EOS_ID)
        return np.where(valid & ((nxt >= len(SPECIAL_TOKENS)) | ((nxt == EOS_ID) & (prev != EOS_ID))), out, -np.inf)

    def _next_entropy(self) -> tuple[np.ndarray, float]:
        """Entropy of the next token after a word of each class, and after EOS."""
        p = self.p_end
        h_bin = -(p * np.log(p) + (1 - p) * np.log1p(-p)) if p < 1 else 0.0
        h_cls = h_bin + (1 - p) * (_entropy(self.transition) + self.transition @ self._h_word)
        h_eos = float(_entropy(self.pi0) + self.pi0 @ self._h_word)
        return h_cls, h_eos

    def entropy_per_token(self, mode: str = "packed", seq_len: int | None = None) -> float:
        """Optimal cross-entropy per predicted token, nats (see the module docstring)."""
        h_cls, h_eos = self._next_entropy()
        if mode == "packed":
            # stationary distribution of the chain over classes + EOS
            n = self.spec.num_classes
            chain = np.zeros((n + 1, n + 1))
            chain[:n, :n] = (1 - self.p_end) * self.transition
            chain[:n, n] = self.p_end
            chain[n, :n] = self.pi0
            vals, vecs = np.linalg.eig(chain.T)
            mu = np.real(vecs[:, np.argmin(np.abs(vals - 1))])
            mu = mu / mu.sum()
            return float(mu[:n] @ h_cls + mu[n] * h_eos)
        if mode == "truncate_pad":
            if seq_len is None or seq_len < 2:
                raise ValueError("entropy_per_token(mode='truncate_pad') needs seq_len >= 2")
            # a_t[c] = P(the document has a t-th word and it is of class c), t = 1 .. seq_len - 1
            a = self.pi0.copy()
            loss = targets = 0.0
            for t in range(1, seq_len):
                targets += a.sum()                 # target at position t exists iff the doc has >= t words
                if t <= seq_len - 2:               # position seq_len - 1 always holds EOS: zero loss
                    loss += a @ h_cls
                a = (1 - self.p_end) * (a @ self.transition)
            return float(loss / targets)
        raise ValueError(f"mode must be 'packed' or 'truncate_pad', got {mode!r}")


def build_tokenizer(spec: SyntheticSpec):
    """The corpus's word-level tokenizer (pad 0, eos 1, unk 2) as a transformers PreTrainedTokenizerFast;
    like T5's, it appends EOS to every text and keeps it when truncating."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    words = word_strings(spec.vocab_size - len(SPECIAL_TOKENS))
    vocab = {tok: i for i, tok in enumerate([*SPECIAL_TOKENS, *words])}
    backend = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = WhitespaceSplit()
    backend.post_processor = TemplateProcessing(single="$A </s>", special_tokens=[("</s>", EOS_ID)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>",
                                   unk_token="<unk>", name_or_path="llmopt-synthetic")


def entropy_per_token(data_cfg: Mapping) -> float:
    """Optimal loss per predicted token (nats) of a data config whose corpus is synthetic (e.g. `offline`),
    for its `mode` and `seq_len`: the floor a model's token-weighted loss approaches."""
    spec = SyntheticSpec.from_mapping(data_cfg.get("synthetic"))
    return SyntheticCorpus(spec).entropy_per_token(data_cfg["mode"], data_cfg.get("seq_len"))
