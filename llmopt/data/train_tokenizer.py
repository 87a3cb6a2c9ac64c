"""Train a SentencePiece unigram tokenizer on local text, for offline work.

    python -m llmopt.data.train_tokenizer --input ../shared/data/c4/c4-train.sample.jsonl.gz \\
        --input '../shared/data/enwiki/*.jsonl.xz' --vocab-size 32000 --output tokenizers/my-32k

writes my-32k.model (+ .vocab), with T5's special ids (pad 0, eos 1, unk 2, no bos), the layout the data
pipeline and the model flavors expect; point data.tokenizer at the .model. Inputs are read by the same
reader as local data sources (JSON lines, plain text, parquet; .gz/.xz/.zst), one training sentence per
non-empty line of each document, up to --max-lines lines (SentencePiece samples --sentence-sample of them).
"""

from __future__ import annotations

import argparse
import glob
import itertools
import sys
from collections.abc import Iterator
from pathlib import Path

from llmopt.data.sources import read_local_files


def training_lines(files: list[str], text_field: str, max_line_chars: int) -> Iterator[str]:
    for record in read_local_files(files, "auto", text_field, "paragraph"):
        if record["text"] is None:  # a malformed record: skipped, and said so
            print(f"skipping: {record['error']}", file=sys.stderr)
            continue
        for line in record["text"].splitlines():
            line = line.strip()
            if line:
                yield line[:max_line_chars]


def train(files: list[str], output: str, vocab_size: int, *, text_field: str = "text", max_lines: int = 2_000_000,
          sentence_sample: int = 1_000_000, character_coverage: float = 0.9995, max_line_chars: int = 4192,
          threads: int = 2, seed: int = 0) -> Path:
    """Train and return the path of the .model file."""
    import sentencepiece as spm

    if vocab_size < 8:
        raise ValueError(f"--vocab-size must be >= 8, got {vocab_size}")
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    spm.set_random_generator_seed(seed)  # sampling of the input lines
    lines = itertools.islice(training_lines(files, text_field, max_line_chars), max_lines)
    spm.SentencePieceTrainer.train(
        sentence_iterator=lines, model_prefix=output, model_type="unigram", vocab_size=vocab_size,
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, pad_piece="<pad>", eos_piece="</s>", unk_piece="<unk>",
        character_coverage=character_coverage, input_sentence_size=sentence_sample, shuffle_input_sentence=True,
        max_sentence_length=max_line_chars * 4, num_threads=threads, minloglevel=2)
    return Path(f"{output}.model")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m llmopt.data.train_tokenizer", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", action="append", required=True,
                    help="a file or glob (repeat for several): .jsonl/.json/.txt/.parquet, optionally compressed")
    ap.add_argument("--output", required=True, help="output prefix: writes PREFIX.model and PREFIX.vocab")
    ap.add_argument("--vocab-size", type=int, default=32000)
    ap.add_argument("--text-field", default="text", help="the JSON/parquet field holding the text")
    ap.add_argument("--max-lines", type=int, default=2_000_000, help="lines read from the inputs")
    ap.add_argument("--sentence-sample", type=int, default=1_000_000, help="lines SentencePiece samples")
    ap.add_argument("--character-coverage", type=float, default=0.9995)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    files: list[str] = []
    for pattern in args.input:
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        missing = [m for m in matches if not Path(m).is_file()]
        if not matches or missing:
            ap.error(f"--input {pattern!r}: no such file")
        files.extend(matches)
    model = train(files, args.output, args.vocab_size, text_field=args.text_field, max_lines=args.max_lines,
                  sentence_sample=args.sentence_sample, character_coverage=args.character_coverage,
                  threads=args.threads, seed=args.seed)

    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(model))
    sample = list(itertools.islice(training_lines(files, args.text_field, 4192), 2000))
    chars_per_token = sum(map(len, sample)) / max(1, sum(map(len, sp.encode(sample))))
    print(f"wrote {model} ({sp.get_piece_size()} pieces; pad {sp.pad_id()}, eos {sp.eos_id()}, unk {sp.unk_id()}; "
          f"{chars_per_token:.2f} characters per token on the first training lines)")


if __name__ == "__main__":
    main()
