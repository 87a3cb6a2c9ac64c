"""The config schema: one dataclass per group of configs/, each field with its default and its doc, written once.

Hydra composes configs/train.yaml onto `RunConfig` (stored in ConfigStore as `llmopt_schema` and named first in
train.yaml's defaults), so an unknown key or a value of the wrong type is refused at compose time, naming the key.
The yaml files set only what differs from these defaults. Importing llmopt registers the schema and the
`fraction_of_steps` resolver, so that any compose of configs/ (the CLI, the tests, the scripts) sees them.

The optimizer, lookahead and schedule groups hold different keys per option (each optimizer its own
hyper-parameters): they are typed here only as mappings with a `name`, and their keys are checked when they are
built, against the signature of what they build (llmopt.optim.spec(name), EMANesterov, make_schedule).

A field's doc is its trailing comment (continued on the comment lines below it); `python -m llmopt.train --help`
shows them (`help_text`).
"""

from __future__ import annotations

import inspect
import re
import textwrap
from dataclasses import MISSING as NO_DEFAULT
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
SCHEMA_NAME = "llmopt_schema"

PRECISIONS = ("bf16_pure", "amp_bf16", "fp32")
# how evaluation runs: as training does (its autocast, its weights), or in fp32 without autocast (the SGD-LL and
# EMA-Nesterov scripts' --eval_in_fp32; under bf16_pure on an fp32 copy of the weights)
EVAL_PRECISIONS = ("train", "fp32")
# how the micro-batches' losses make the step's loss: every target token of the global batch the same weight, or
# the reference loop's mean of per-micro-batch means (there a micro-batch with fewer non-pad tokens weighs more)
LOSS_WEIGHTINGS = ("tokens", "micro_batch_mean")


@dataclass
class ModelConfig:
    flavor: str = MISSING        # LLaMA flavor of llmopt.model.FLAVORS: micro, tiny, 60m, 130m, 350m, 1b, 7b
    vocab_size: int | None = None  # null = the flavor's own vocabulary
    padding_idx: int = 0         # the embedding row never trained: 0 = t5's pad; -1 = GaLore's and APOLLO's
                                 # configs' (row vocab-1); 1 = SCALE's, SGD-LL's, EMA-Nesterov's (t5's EOS)


@dataclass
class DataSchema:
    """The data group as Hydra types it; llmopt.data.config.parse_config checks the sources and the values
    (its module docstring describes every key), and its DataConfig takes its defaults from here."""
    mode: str = MISSING          # truncate_pad (one document per sequence, the papers') | packed
    seq_len: int = MISSING       # tokens per sequence
    tokenizer: str = MISSING     # a Hub name (t5-base), a local path (relative to data_dir) or synthetic
    train: dict[str, Any] = MISSING  # the training source: {type: hub | local | synthetic, ...}
    eval: dict[str, Any] = MISSING   # the validation source, read whole-stream
    extra_eval: dict[str, Any] = field(default_factory=dict)  # more held-out sets {name: source}: eval/<name>/...
    name: str = "data"           # a label saved with the run's config
    vocab_size: int | None = None  # null = len(tokenizer); smaller cuts off unused special tokens
    eval_tokens: int | None = None  # the validation set's non-pad tokens; null = the whole eval source
    shuffle_seed: int | None = None  # seed of the sources' shuffle; null = the run seed (train), 0 (eval)
    num_workers: int = 0         # tokenizer processes per rank (0 = in the training process)
    on_bad_record: str = "fail"  # fail | skip (count and warn) a record that cannot be parsed
    data_dir: str | None = None  # base of relative paths; null = the project root
    synthetic: dict[str, Any] = field(default_factory=dict)  # the synthetic corpus (llmopt.data.SyntheticSpec)
    chunk_docs: int = 64         # documents per tokenization task
    prefetch: int = 4            # tokenization tasks in flight per worker
    batches_ahead: int = 4       # micro-batches assembled ahead on a background thread (0 = in the loop)
    hub_timeout_s: float = 10.0  # how long to wait for the Hugging Face Hub before failing
    window_shuffle_buffer: int | None = None  # packed mode: windows shuffled through this many;
                                 # null = the packer's order


@dataclass
class TrainerConfig:
    steps: int = 300             # schedule length (the reference-quirks schedule makes steps + 1 updates)
    global_batch_size: int = 32  # sequences per optimizer step, over all ranks
    micro_batch_size: int = 16   # sequences per forward/backward on one rank
    precision: str = "fp32"      # bf16_pure (the papers' code) | amp_bf16 (fp32 master weights) | fp32
    grad_clip: float = 0.0       # gradient-norm clip; 0 = off
    eval_every: int = 100        # steps between evaluations (and at the end)
    eval_batch_size: int | None = None         # sequences per evaluation batch on one rank; null = micro
    eval_global_batch_size: int | None = None  # ... over all ranks instead, split evenly (the paper-compatible
                                 # loss depends on it)
    eval_precision: str = "train"    # train (the training autocast and weights) | fp32 (no autocast, fp32 weights:
                                 # the SGD-LL / EMA-Nesterov scripts' --eval_in_fp32)
    log_every: int = 10          # steps between log records
    nonfinite: str = "stop"      # stop | skip: what a NaN/Inf loss or gradient does
    loss_weighting: str = "tokens"   # tokens (every target token alike) | micro_batch_mean (the reference loop's
                                 # mean of the micro-batches' mean losses)
    compile: bool = False        # torch.compile the model
    compile_options: dict[str, Any] = field(default_factory=dict)  # torch.compile inductor options, e.g.
                                 # {coordinate_descent_tuning: true}
    activation_checkpointing: bool = False  # recompute layer activations in backward (less memory, ~1/3 more time)
    loss_head: str = "auto"      # auto (one_pass on CUDA, else plain) | plain | one_pass | chunked
    loss_dtype: str = "float32"  # float32 (softmax in fp32) | logits (in the logits' dtype: the papers' bf16)
    rotary_table: bool = True    # RoPE cos/sin from a table (transformers' values, fewer FLOPs)
    attention: str = "sdpa"      # sdpa (is_causal, also compiled) | transformers (its own masks)
    sdpa_backend: str = "auto"   # auto (torch's pick) | math | math_bf16 (the papers' torch 2.4) | flash |
                                 # efficient | cudnn
    device: str = "auto"         # auto | cpu | cuda
    deterministic: bool = False  # GPU runs repeat bit for bit, slower (llmopt.train.reproducible)

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ValueError(f"unknown precision {self.precision!r}; choose one of {list(PRECISIONS)}")
        if self.eval_every <= 0:
            raise ValueError(f"eval_every must be > 0 (steps between evaluations), got {self.eval_every}")
        if self.log_every <= 0:
            raise ValueError(f"log_every must be > 0, got {self.log_every}")
        if self.micro_batch_size <= 0 or self.global_batch_size <= 0:
            raise ValueError("micro_batch_size and global_batch_size must be > 0")
        if self.nonfinite not in ("stop", "skip"):
            raise ValueError(f"nonfinite must be 'stop' or 'skip', got {self.nonfinite!r}")
        if self.loss_weighting not in LOSS_WEIGHTINGS:
            raise ValueError(f"trainer.loss_weighting must be one of {list(LOSS_WEIGHTINGS)}, got "
                             f"{self.loss_weighting!r}")
        if self.eval_precision not in EVAL_PRECISIONS:
            raise ValueError(f"trainer.eval_precision must be one of {list(EVAL_PRECISIONS)}, got "
                             f"{self.eval_precision!r}")
        if not self.grad_clip >= 0:
            raise ValueError(f"trainer.grad_clip must be >= 0 (0 = off), got {self.grad_clip}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"trainer.device must be auto, cpu or cuda, got {self.device!r}")

    @property
    def fp32_eval(self) -> bool:
        """Evaluation in fp32 on a model of its own beside the training one (training is not in fp32)."""
        return self.eval_precision == "fp32" and self.precision != "fp32"

    def accumulation(self, world_size: int) -> int:
        per_step = self.micro_batch_size * world_size
        if self.global_batch_size % per_step:
            raise ValueError(f"global_batch_size={self.global_batch_size} is not divisible by "
                             f"micro_batch_size x world_size = {self.micro_batch_size} x {world_size}; "
                             "change one of them")
        return self.global_batch_size // per_step

    def eval_batch(self, world_size: int) -> int:
        """Sequences per evaluation batch on one rank. The paper-compatible loss divides by (batches + 1) per
        rank, so it depends on this: eval_global_batch_size keeps it the same on any number of GPUs."""
        if self.eval_global_batch_size is None:
            return self.eval_batch_size or self.micro_batch_size
        if self.eval_batch_size is not None:
            raise ValueError("set one of trainer.eval_batch_size (per rank) and trainer.eval_global_batch_size "
                             "(all ranks), not both")
        if self.eval_global_batch_size <= 0 or self.eval_global_batch_size % world_size:
            raise ValueError(f"eval_global_batch_size={self.eval_global_batch_size} must be a positive multiple of "
                             f"the number of processes ({world_size}); change it or the process count")
        return self.eval_global_batch_size // world_size


@dataclass
class CheckpointConfig:
    dir: str = "${hydra:runtime.output_dir}/checkpoints"  # set a stable path to resume across invocations
    every: int = 0               # steps between checkpoints; 0 = only at the end and on preemption
    keep: int = 2                # the last K are kept
    final: bool = True           # checkpoint at the end of the run
    resume: str = "auto"         # auto (newest valid in dir) | none | path to a step_<8 digits> directory
    export_hf: bool = True       # also save the final model with save_pretrained (<run dir>/hf_model)
    allow_other_runs: bool = False   # true: write beside another run's checkpoints in dir (each prunes its own)


@dataclass
class DiagnosticsConfig:
    every: int = 0               # steps between per-layer diagnostics; 0 = off
    init_device: str = "cpu"     # where w_0 is kept for the distance from initialization


@dataclass
class WandbConfig:
    enabled: bool = False        # log to W&B too (metrics.jsonl in the run directory always)
    mode: str = "${oc.env:WANDB_MODE,offline}"  # online | offline; WANDB_MODE, when set, wins (W&B's convention)
    project: str = "llmopt"      # the W&B project
    entity: str | None = None    # the W&B entity (user or team); null = W&B's default
    group: str | None = None     # the W&B run group
    name: str = "${run_name}"    # the W&B run name
    tags: list[str] = field(default_factory=list)  # W&B tags


@dataclass
class LoggerConfig:
    wandb: WandbConfig = field(default_factory=WandbConfig)  # Weights & Biases


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)  # the LLaMA model
    data: DataSchema = field(default_factory=DataSchema)     # the token stream and the held-out sets
    optimizer: dict[str, Any] = field(default_factory=dict)  # {name, lr, ...}: the keys of llmopt.optim.spec(name)
    lookahead: dict[str, Any] = field(default_factory=dict)  # {name: none} | {name: ema_nesterov, ...}: EMANesterov's
    schedule: dict[str, Any] = field(default_factory=dict)   # {name, ...}: llmopt.train.schedule.make_schedule's
    trainer: TrainerConfig = field(default_factory=TrainerConfig)  # the training loop
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)  # checkpoints and resuming
    diagnostics: DiagnosticsConfig = field(default_factory=DiagnosticsConfig)  # per-layer diagnostics
    logger: LoggerConfig = field(default_factory=LoggerConfig)  # where metrics go
    seed: int = 0                # the run seed: model initialization, data order
    run_name: str = "${optimizer.name}_${model.flavor}_${lookahead.name}_lr${optimizer.lr}_seed${seed}"  # names the
                                 # run directory and the W&B run
    output_root: str = "outputs" # run directories go under it


def check_schema(cfg) -> None:
    """Refuse a composed config the schema does not describe: Hydra types every group at compose time, but a
    `+key=value` override adds its key even to a typed node (an OmegaConf error names the key)."""
    OmegaConf.merge(OmegaConf.structured(RunConfig), OmegaConf.to_container(cfg))  # as plain data: retyped


def fraction_of_steps(fraction: float, *, _root_) -> int:
    """`${fraction_of_steps:0.3}` in a config: that share of trainer.steps, rounded (e.g. a lookahead window)."""
    return round(float(fraction) * _root_.trainer.steps)


# -- --help ------------------------------------------------------------------------------------------------
def field_docs(cls) -> dict[str, str]:
    """{field: its trailing comment, continuation lines joined} from the dataclass's source."""
    docs, last = {}, None
    for line in inspect.getsource(cls).splitlines():
        declared = re.match(r"    (\w+): [^#]*?(?:#\s*(.*))?$", line)
        continued = re.match(r"\s+#\s*(.*)$", line)
        if declared and declared.group(1) in {f.name for f in fields(cls)}:
            last = declared.group(1)
            docs[last] = declared.group(2) or ""
        elif continued and last is not None:
            docs[last] += " " + continued.group(1)
        else:
            last = None
    return docs


def _default(f) -> str:
    if f.default_factory is not NO_DEFAULT:
        return "" if is_dataclass(made := f.default_factory()) else f" = {made}"
    return " (required)" if f.default == MISSING else f" = {'null' if f.default is None else f.default}"


def _describe(cls, prefix: str) -> list[str]:
    lines, docs = [], field_docs(cls)
    for f in fields(cls):
        nested = f.default_factory is not NO_DEFAULT and is_dataclass(f.default_factory)
        if nested:
            lines += _describe(f.default_factory, f"{prefix}{f.name}.")
        else:
            lines.append(f"  {prefix}{f.name}{_default(f)}\n      {docs[f.name]}")
    return lines


def group_options(group: str) -> list[str]:
    """The options of a config group (configs/<group>/**.yaml); files starting with `_` are bases."""
    root = CONFIG_DIR / group
    return sorted(str(p.relative_to(root).with_suffix("")) for p in root.rglob("*.yaml")
                  if not any(part.startswith("_") for part in p.relative_to(root).parts))


def help_text() -> str:
    """`python -m llmopt.train --help` (hydra.help.template in configs/train.yaml)."""
    groups = [f.name for f in fields(RunConfig) if (CONFIG_DIR / f.name).is_dir()] + ["experiment", "local"]
    lines = ["python -m llmopt.train [group=option ...] [key=value ...]",
             "Trains one run (-m: a sweep). The configs are in configs/; --cfg job prints the composed config.",
             "", "== Groups (group=option) ==",
             *(textwrap.fill(", ".join(group_options(group)), width=118, initial_indent=f"  {group}: ",
                             subsequent_indent="      ") for group in groups),
             "", "== Settings (key=value), with their defaults ==", *_describe(RunConfig, ""),
             "", "optimizer, lookahead and schedule take the keys of their option's yaml "
                 "(configs/<group>/<name>.yaml)."]
    return "\n".join(lines).replace("$", "$$")   # Hydra fills the template with string.Template


OmegaConf.register_new_resolver("fraction_of_steps", fraction_of_steps, replace=True)
OmegaConf.register_new_resolver("llmopt_help", help_text, replace=True)
ConfigStore.instance().store(name=SCHEMA_NAME, node=RunConfig)
