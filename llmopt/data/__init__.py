"""llmopt.data: C4 from the Hub, local text files, or an offline synthetic corpus -> token batches.

The contract with the trainer:

    from llmopt.data import build_data
    data = build_data(data_cfg, micro_batch_size=B, rank=rank, world_size=world_size, seed=seed)
    data.tokenizer            transformers tokenizer (or, for a SentencePiece .model, a thin equivalent)
    data.vocab_size           ids are < vocab_size
    data.pad_id, data.eos_id
    data.train                infinite iterator of this rank's batches; state_dict() / load_state_dict(sd)
    data.eval_batches(bs)     fresh iterator over this rank's share of the fixed validation set
    data.check_vocab(n)       ValueError if ids could reach past a model vocabulary of n
    data.entropy_per_token    optimal loss per predicted token (nats) when the corpus is synthetic, else None
    data.close()              stop background workers (also done at exit)

Every batch is dict(input_ids, labels, attention_mask) of CPU int64 tensors [B, seq_len]; labels are the
inputs with padding set to -100 (not shifted: transformers shifts). The data config keys are documented in
llmopt.data.config, the pipeline (workers, resume, validation set) in llmopt.data.pipeline, the sources in
llmopt.data.sources, the synthetic corpus in llmopt.data.synthetic.

Names are imported lazily so that tokenizer worker processes (which import llmopt.data.encode) start fast.
"""

from importlib import import_module

_EXPORTS = {
    "build_data": "llmopt.data.build",
    "Data": "llmopt.data.build",
    "parse_config": "llmopt.data.config",
    "DataConfig": "llmopt.data.config",
    "HubUnreachableError": "llmopt.data.sources",
    "BadRecordError": "llmopt.data.pipeline",
    "SentencePieceTokenizer": "llmopt.data.tokenizer",
    "entropy_per_token": "llmopt.data.synthetic",
    "SyntheticCorpus": "llmopt.data.synthetic",
    "SyntheticSpec": "llmopt.data.synthetic",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'llmopt.data' has no attribute {name!r}")
