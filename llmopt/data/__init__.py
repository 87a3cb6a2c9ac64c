"""llmopt.data: C4 from the Hub, local text files, or an offline synthetic corpus -> token batches.

The contract with the trainer:

    from llmopt.data import build_data
    data = build_data(data_cfg, micro_batch_size=B, rank=rank, world_size=world_size, seed=seed)
    data.tokenizer            transformers tokenizer (or, for a SentencePiece .model, a thin equivalent)
    data.vocab_size           ids are < vocab_size
    data.pad_id, data.eos_id
    data.train                infinite iterator of this rank's batches; state_dict() / load_state_dict(sd)
    data.eval_batches(bs)     fresh iterator over this rank's share of the fixed validation set
    data.extra_eval_names     names of the extra held-out sets (data.extra_eval); data.eval_batches(bs, name)
    data.check_vocab(n)       ValueError if ids could reach past a model vocabulary of n
    data.entropy_per_token    optimal loss per predicted token (nats) when the corpus is synthetic, else None
    data.close()              stop background workers (also done at exit)

data.train is a plain iterator, already split by rank: do not hand it to accelerator.prepare (Accelerate
would shard it again). Every batch is dict(input_ids, labels, attention_mask) of CPU int64 tensors
[B, seq_len]; labels are the inputs with padding set to -100 (not shifted: transformers shifts). The data
config keys are documented in llmopt.data.config, the pipeline (workers, resume, validation set) in
llmopt.data.pipeline, the sources in llmopt.data.sources, the synthetic corpus in llmopt.data.synthetic.
"""

from llmopt.data.build import Data, build_data
from llmopt.data.config import DataConfig, parse_config
from llmopt.data.pipeline import BadRecordError
from llmopt.data.sources import HubUnreachableError
from llmopt.data.synthetic import SyntheticCorpus, SyntheticSpec, entropy_per_token
from llmopt.data.tokenizer import SentencePieceTokenizer

__all__ = ["BadRecordError", "Data", "DataConfig", "HubUnreachableError", "SentencePieceTokenizer",
           "SyntheticCorpus", "SyntheticSpec", "build_data", "entropy_per_token", "parse_config"]
