"""The main job end to end, on the real C4 sample and the offline corpus."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from llmopt.model import build_model, llama_config
from tests.helpers.train import C4_SMALL, compose_config, metrics, run_cli, run_in_process

# (optimizer overrides, lookahead) for a few-step run each; learning rates that move a micro model quickly
RUNS = {
    "adamw": ["optimizer=adamw", "optimizer.lr=3e-3"],
    "adam": ["optimizer=adam", "optimizer.lr=3e-3"],
    "sgd": ["optimizer=sgd", "optimizer.lr=0.5"],
    "muon": ["optimizer=muon", "optimizer.adam_lr=3e-3"],
    "sgd_ll": ["optimizer=sgd_ll", "optimizer.lr=100", "optimizer.tau=5e-4"],
    "scale": ["optimizer=scale", "optimizer.lr=3e-3", "optimizer.adam_lr=3e-3"],
    "galore": ["optimizer=galore", "optimizer.rank=8", "optimizer.update_proj_gap=5"],
    "fira": ["optimizer=fira", "optimizer.rank=8", "optimizer.update_proj_gap=5"],
    "apollo": ["optimizer=apollo", "optimizer.rank=8", "optimizer.update_proj_gap=5"],
    "apollo_mini": ["optimizer=apollo_mini", "optimizer.update_proj_gap=5"],
    "ema_nesterov+adamw": ["optimizer=adamw", "optimizer.lr=3e-3", "lookahead=ema_nesterov"],
    "ema_nesterov+muon": ["optimizer=muon", "optimizer.adam_lr=3e-3", "lookahead=ema_nesterov"],
    "ema_nesterov+scale": ["optimizer=scale", "optimizer.lr=3e-3", "optimizer.adam_lr=3e-3", "lookahead=ema_nesterov"],
}


@pytest.mark.parametrize("name", sorted(RUNS))
def test_every_optimizer_trains_on_real_c4(tmp_path, name):
    summary, run_dir = run_in_process(tmp_path, [*C4_SMALL, "trainer.steps=8", "schedule=constant", *RUNS[name]])
    losses = [m["train/loss"] for m in metrics(run_dir) if "train/loss" in m]
    assert len(losses) == 8 and all(math.isfinite(v) for v in losses)
    assert sum(losses[-3:]) / 3 < losses[0] - 0.05, losses   # learning, not just moving
    assert summary["step"] == 8 and summary["eval/tokens"] > 3000  # targets: non-pad tokens less one per sequence


def test_cli_default_style_run_writes_its_outputs(tmp_path):
    """The real CLI on the offline corpus: run directory, resolved config, metrics, summary, HF export."""
    out = run_cli(["trainer.steps=12", "trainer.eval_every=6", "trainer.log_every=3", "data.eval_tokens=5000",
                   f"output_root={tmp_path}", "run_name=cli"], cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    run_dirs = list(tmp_path.glob("*/*_cli"))
    assert len(run_dirs) == 1
    run_dir = run_dirs[0]
    assert str(run_dir) in out.stdout and "eval loss (token-weighted)" in out.stdout
    assert "eval loss (paper-compatible)" in out.stdout
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["step"] == 12 and summary["optimizer"] == "adamw"
    cfg = (run_dir / "config.yaml").read_text()
    assert "flavor: tiny" in cfg and "name: offline" in cfg
    records = metrics(run_dir)
    assert [r["step"] for r in records if "train/loss" in r] == [3, 6, 9, 12]
    assert [r["step"] for r in records if "eval/loss" in r] == [6, 12]
    from transformers import LlamaForCausalLM
    model = LlamaForCausalLM.from_pretrained(run_dir / "hf_model")
    assert model.config.vocab_size == 512 and not model.config.tie_word_embeddings


def test_metrics_keys(tmp_path):
    _, run_dir = run_in_process(tmp_path, [*C4_SMALL, "trainer.steps=3", "trainer.eval_every=3"])
    records = metrics(run_dir)
    first = records[0]
    for key in ("train/loss", "train/lr", "train/grad_norm", "train/tokens", "perf/token_slots_per_s",
                "perf/step_time_s", "perf/data_wait_frac", "perf/peak_memory_gb", "model/params",
                "memory/paper_gb", "memory/llmopt_gb", "memory/optimizer_state_gb"):
        assert key in first, key
    assert first["step"] == 1 and first["model/params"] > 0
    params = first["model/params"]
    assert first["memory/optimizer_state_gb"] == pytest.approx(2 * params * 4 / 1e9, rel=0.01)  # AdamW, fp32
    assert records[-1]["eval/loss"] > 0 and records[-1]["eval/tokens"] > 3000
    tokens = [r["train/tokens"] for r in records]
    assert tokens == sorted(tokens) and tokens[0] > 0
    assert "perf/mfu" not in first  # no known accelerator peak on a CPU


def test_micro_batch_mean_weighting_is_the_reference_loops_update(tmp_path):
    """trainer.loss_weighting=micro_batch_mean: the gradient of the mean of the micro-batches' HF mean losses (the
    reference loop's loss / accumulation steps), checked by hand with plain SGD at lr 1; the default weighting
    (every token alike) gives another update on truncate+pad batches."""
    from omegaconf import OmegaConf

    from llmopt.data import build_data

    base = [*C4_SMALL, "trainer.steps=1", "schedule=constant", "optimizer=sgd", "optimizer.lr=1.0",
            "optimizer.momentum=0.0", "trainer.micro_batch_size=2", "checkpoint.export_hf=true"]
    run_in_process(tmp_path, [*base, "trainer.loss_weighting=micro_batch_mean"], name="mean")
    run_in_process(tmp_path, base, name="tokens")
    from transformers import LlamaForCausalLM
    got = {n: LlamaForCausalLM.from_pretrained(tmp_path / n / "hf_model").state_dict() for n in ("mean", "tokens")}

    cfg = compose_config(base)
    model = build_model(llama_config("micro", vocab_size=32000, max_seq_len=2048), seed=cfg.seed)
    data = build_data(OmegaConf.to_container(cfg.data, resolve=True), micro_batch_size=2, seed=cfg.seed)
    stream = iter(data.train)
    micro = [next(stream) for _ in range(4)]
    data.close()
    assert len({int((b["labels"][:, 1:] != -100).sum()) for b in micro}) > 1  # the weightings differ here
    loss = sum(model(input_ids=b["input_ids"], labels=b["labels"]).loss for b in micro) / len(micro)
    loss.backward()
    for name, p in model.named_parameters():
        expected = (p - p.grad).detach()
        torch.testing.assert_close(got["mean"][name], expected, rtol=1e-5, atol=1e-7, msg=name)
    assert not torch.allclose(got["tokens"]["lm_head.weight"], got["mean"]["lm_head.weight"], rtol=1e-5, atol=1e-7)


def test_perf_records_exclude_evaluation_and_count_non_pad_tokens(tmp_path, monkeypatch):
    """A clock that jumps 1000 s in every evaluation: the step times logged after one do not hold it. MFU is
    token slots/s x FLOPs per token / peak (a peak given on the CPU). train/tokens is the non-pad input tokens of
    the batches trained on, counted here from the same data stream."""
    from types import SimpleNamespace

    from omegaconf import OmegaConf

    from llmopt.data import build_data
    from llmopt.model import flops_per_token
    from llmopt.train import run as run_module
    from llmopt.train import trainer as trainer_module

    jumped = [0.0]
    real_clock = trainer_module.time.perf_counter
    monkeypatch.setattr(trainer_module, "time", SimpleNamespace(perf_counter=lambda: real_clock() + jumped[0]))
    real_evaluate = trainer_module.Trainer.evaluate

    def slow_evaluate(self):
        jumped[0] += 1000.0
        return real_evaluate(self)

    monkeypatch.setattr(trainer_module.Trainer, "evaluate", slow_evaluate)
    monkeypatch.setattr(run_module, "peak_flops", lambda device: 1e12)
    overrides = [*C4_SMALL, "trainer.steps=6", "trainer.log_every=2", "trainer.eval_every=2", "schedule=constant"]
    _, run_dir = run_in_process(tmp_path, overrides)
    records = [r for r in metrics(run_dir) if "train/loss" in r]
    assert [r["step"] for r in records] == [2, 4, 6] and jumped[0] == 3000.0
    assert all(r["perf/step_time_s"] < 100 for r in records), [r["perf/step_time_s"] for r in records]

    cfg = compose_config(overrides)
    per_token = flops_per_token(llama_config("micro", vocab_size=32000), 64)
    for r in records:
        assert r["perf/mfu"] == pytest.approx(r["perf/token_slots_per_s"] * per_token / 1e12, rel=1e-9)
    data = build_data(OmegaConf.to_container(cfg.data, resolve=True), micro_batch_size=4, seed=cfg.seed)
    stream = iter(data.train)
    seen = 0
    for r in records:  # 2 micro-batches of 4 per step, 2 steps per record
        seen += sum(int(next(stream)["attention_mask"].sum()) for _ in range(4))
        assert r["train/tokens"] == seen
    assert seen < 6 * 8 * 64  # padding is not counted
    data.close()


@pytest.mark.parametrize("micro, accumulation", [(2, 4), (8, 1)])
def test_accumulation_gives_the_same_update(tmp_path, micro, accumulation):
    """global batch 8 as 4 x 2 (the reference), 2 x 4 or 8 x 1: the same parameters after 2 steps.

    Plain SGD at lr 1 makes the update the gradient itself (Adam would magnify float rounding in
    embedding rows whose gradient is ~0 into lr-sized differences)."""
    base = [*C4_SMALL, "trainer.steps=2", "schedule=constant", "optimizer=sgd", "optimizer.lr=1.0",
            "optimizer.momentum=0.0", "data.shuffle_seed=7"]

    def final_params(name, extra):
        run_in_process(tmp_path, [*base, *extra, "checkpoint.export_hf=true"], name=name)
        from transformers import LlamaForCausalLM
        return LlamaForCausalLM.from_pretrained(tmp_path / name / "hf_model").state_dict()

    ref = final_params("ref", ["trainer.micro_batch_size=4"])
    other = final_params("other", [f"trainer.micro_batch_size={micro}"])
    assert accumulation * micro == 8
    for key in ref:
        torch.testing.assert_close(other[key], ref[key], rtol=1e-5, atol=1e-7, msg=key)


def count_calls(monkeypatch, module_class) -> dict:
    """{"n": calls of module_class.forward}, counted while the test runs."""
    calls = {"n": 0}
    original = module_class.forward

    def counting(self, *args, **kwargs):
        calls["n"] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(module_class, "forward", counting)
    return calls


def test_activation_checkpointing_recomputes_and_changes_no_number(tmp_path, monkeypatch):
    """trainer.activation_checkpointing=true runs every decoder layer again in the backward pass, and the
    parameters after 2 AdamW steps are those of the run without it."""
    from transformers import LlamaForCausalLM
    from transformers.models.llama import modeling_llama

    # count the MLPs inside the layers (the layers' own forward is what transformers wraps to checkpoint)
    calls = count_calls(monkeypatch, modeling_llama.LlamaMLP)
    base = [*C4_SMALL, "trainer.steps=2", "schedule=constant", "optimizer=adamw", "optimizer.lr=1e-2",
            "trainer.eval_every=1000", "checkpoint.export_hf=true"]
    layer_calls, params = {}, {}
    for flag in ("false", "true"):
        calls["n"] = 0
        run_in_process(tmp_path, [*base, f"trainer.activation_checkpointing={flag}"], name=flag)
        layer_calls[flag] = calls["n"]
        params[flag] = LlamaForCausalLM.from_pretrained(tmp_path / flag / "hf_model").state_dict()
    # training: 2 steps x 2 micro-batches x every layer, run twice with checkpointing (eval is the same in both)
    n_layers = llama_config("micro", vocab_size=32000).num_hidden_layers
    assert layer_calls["true"] - layer_calls["false"] == 2 * 2 * n_layers
    for key in params["false"]:
        torch.testing.assert_close(params["true"][key], params["false"][key], rtol=1e-6, atol=1e-7, msg=key)
    initial = build_model(llama_config("micro", vocab_size=32000), seed=0, device="cpu", dtype=torch.float32)
    assert not torch.equal(initial.state_dict()["model.layers.0.mlp.up_proj.weight"],
                           params["true"]["model.layers.0.mlp.up_proj.weight"])  # the runs did train


def test_loss_heads_train_as_the_plain_loss(tmp_path):
    """trainer.loss_head=one_pass (llmopt's kernel) and =chunked (liger-kernel), Triton's interpreter on CPU: the
    same losses and parameters after 3 SGD steps (linear in the gradients) as the plain lm_head + cross-entropy.
    The offline corpus."""
    from transformers import LlamaForCausalLM

    base = ["model=tiny", "data.seq_len=32", "data.eval_tokens=2000", "trainer.global_batch_size=8",
            "trainer.micro_batch_size=4", "trainer.steps=3", "trainer.log_every=1", "trainer.eval_every=1000",
            "schedule=constant", "optimizer=sgd", "optimizer.lr=0.5", "checkpoint.export_hf=true"]
    params, losses = {}, {}
    for head in ("plain", "one_pass", "chunked"):
        run_in_process(tmp_path, [*base, f"trainer.loss_head={head}"], name=head)
        params[head] = LlamaForCausalLM.from_pretrained(tmp_path / head / "hf_model").state_dict()
        losses[head] = [r["train/loss"] for r in metrics(tmp_path / head) if "train/loss" in r]
    initial = build_model(llama_config("tiny"), seed=0)
    for head in ("one_pass", "chunked"):
        assert len(losses[head]) == 3 and losses[head][-1] < losses[head][0]
        assert losses[head] == pytest.approx(losses["plain"], rel=1e-5), head
        for key in params["plain"]:
            torch.testing.assert_close(params[head][key], params["plain"][key], rtol=1e-4, atol=1e-6, msg=key)
        assert not torch.equal(initial.lm_head.weight, params[head]["lm_head.weight"])  # the runs did train


def test_unknown_attention_is_refused_before_anything_is_written(tmp_path):
    with pytest.raises(ValueError, match=r"unknown attention 'flash' \(trainer.attention\)"):
        run_in_process(tmp_path, [*C4_SMALL, "trainer.steps=1", "trainer.attention=flash"])
    assert not (tmp_path / "run").exists()


def test_unknown_compile_option_is_refused_before_anything_is_written(tmp_path):
    with pytest.raises(ValueError, match=r"trainer.compile_options: unknown inductor options \['no_such_option'\]"):
        run_in_process(tmp_path, [*C4_SMALL, "trainer.steps=1", "trainer.compile=true",
                                  "+trainer.compile_options.no_such_option=true"])
    assert not (tmp_path / "run").exists()


def test_compile_options_reach_torch_compile(tmp_path, monkeypatch):
    """trainer.compile_options (nested as Hydra writes them) reach torch.compile as inductor's flat names; without
    any, torch.compile gets none. (torch.compile is spied on and the model left eager: inductor's CPU compile is
    too slow for this suite; the options' effect is measured on the GPU, benchmarks/RESULTS.md.)"""
    calls = []

    def spy(model, **kwargs):
        calls.append(kwargs)
        return model
    monkeypatch.setattr(torch, "compile", spy)
    base = [*C4_SMALL, "trainer.steps=1", "trainer.compile=true"]
    run_in_process(tmp_path, base, name="plain")
    run_in_process(tmp_path, [*base, "+trainer.compile_options.coordinate_descent_tuning=true",
                              "+trainer.compile_options.triton.enable_pdl=true"], name="tuned")
    assert calls == [{"options": None}, {"options": {"coordinate_descent_tuning": True, "triton.enable_pdl": True}}]


def test_attention_choices_train_alike(tmp_path):
    """trainer.attention=sdpa (the default; is_causal) and =transformers (its own mask): the same losses and
    parameters after 2 AdamW steps, fp32 on CPU."""
    from transformers import LlamaForCausalLM

    base = [*C4_SMALL, "trainer.steps=2", "schedule=constant", "optimizer=adamw", "optimizer.lr=1e-2",
            "checkpoint.export_hf=true"]
    assert compose_config(base).trainer.attention == "sdpa"
    params, losses = {}, {}
    for attention in ("sdpa", "transformers"):
        run_in_process(tmp_path, [*base, f"trainer.attention={attention}"], name=attention)
        params[attention] = LlamaForCausalLM.from_pretrained(tmp_path / attention / "hf_model").state_dict()
        losses[attention] = [r["train/loss"] for r in metrics(tmp_path / attention) if "train/loss" in r]
    assert len(losses["sdpa"]) == 2 and losses["sdpa"] == pytest.approx(losses["transformers"], rel=1e-5)
    for key, value in params["transformers"].items():
        torch.testing.assert_close(params["sdpa"][key], value, rtol=1e-4, atol=1e-5, msg=key)


def test_sdpa_backend_holds_in_every_attention_call_of_a_run(tmp_path, monkeypatch):
    """trainer.sdpa_backend=math_bf16: inside each attention call of the run, training and evaluation alike, SDPA may
    only take the math kernel, reducing in bf16; torch's own choice is back after the run."""
    import transformers.integrations.sdpa_attention as hf_sdpa
    seen = []
    original = hf_sdpa.sdpa_attention_forward

    def spy(*args, **kwargs):
        backends = torch.backends.cuda
        seen.append((torch.is_grad_enabled(), backends.flash_sdp_enabled(), backends.mem_efficient_sdp_enabled(),
                     backends.cudnn_sdp_enabled(), backends.math_sdp_enabled(),
                     backends.fp16_bf16_reduction_math_sdp_allowed()))
        return original(*args, **kwargs)

    monkeypatch.setattr(hf_sdpa, "sdpa_attention_forward", spy)
    run_in_process(tmp_path, [*C4_SMALL, "trainer.steps=2", "trainer.precision=bf16_pure",
                              "trainer.sdpa_backend=math_bf16"])
    assert {grad for grad, *_ in seen} == {True, False}  # training and evaluation passes
    assert {tuple(flags) for _, *flags in seen} == {(False, False, False, True, True)}
    assert torch.backends.cuda.flash_sdp_enabled() and not torch.backends.cuda.fp16_bf16_reduction_math_sdp_allowed()


def test_rotary_table_trains_exactly_as_transformers_rotary_module(tmp_path, monkeypatch):
    """trainer.rotary_table=true (the default) never calls transformers' rotary module, and 2 AdamW steps give
    the same losses and parameters, bit for bit, as the run with it."""
    from transformers import LlamaForCausalLM
    from transformers.models.llama import modeling_llama

    calls = count_calls(monkeypatch, modeling_llama.LlamaRotaryEmbedding)
    base = [*C4_SMALL, "trainer.steps=2", "schedule=constant", "optimizer=adamw", "optimizer.lr=1e-2",
            "checkpoint.export_hf=true"]
    assert compose_config(base).trainer.rotary_table is True
    params, losses, hf_calls = {}, {}, {}
    for flag in ("false", "true"):
        calls["n"] = 0
        run_in_process(tmp_path, [*base, f"trainer.rotary_table={flag}"], name=flag)
        hf_calls[flag] = calls["n"]
        params[flag] = LlamaForCausalLM.from_pretrained(tmp_path / flag / "hf_model").state_dict()
        losses[flag] = [r["train/loss"] for r in metrics(tmp_path / flag) if "train/loss" in r]
    assert hf_calls["true"] == 0 and hf_calls["false"] >= 4  # 2 steps x 2 micro-batches, and eval
    assert len(losses["true"]) == 2 and losses["true"] == losses["false"]
    assert params["true"].keys() == params["false"].keys()
    for key in params["false"]:
        assert torch.equal(params["true"][key], params["false"][key]), key


def test_eval_losses_against_a_hand_computation(tmp_path):
    """token-weighted: sum of token losses / tokens; paper-compatible: sum of batch means / (batches + 1)."""
    from llmopt.train.run import run  # noqa: F401  (same code path as the trainer)
    summary, run_dir = run_in_process(tmp_path, [*C4_SMALL, "trainer.steps=1", "trainer.eval_batch_size=3",
                                                 "checkpoint.export_hf=true"])
    from omegaconf import OmegaConf
    from transformers import LlamaForCausalLM

    from llmopt.data import build_data
    model = LlamaForCausalLM.from_pretrained(run_dir / "hf_model").eval()
    cfg = compose_config(C4_SMALL)
    data = build_data(OmegaConf.to_container(cfg.data, resolve=True), micro_batch_size=4)
    loss_sum, tokens, means = 0.0, 0, []
    with torch.no_grad():
        for batch in data.eval_batches(3):
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
            n = int((batch["labels"][:, 1:] != -100).sum())
            loss_sum += out.loss.item() * n
            tokens += n
            means.append(out.loss.item())
    assert summary["eval/tokens"] == tokens
    assert summary["eval/loss"] == pytest.approx(loss_sum / tokens, rel=1e-5)
    assert summary["eval/paper_loss"] == pytest.approx(sum(means) / (len(means) + 1), rel=1e-5)
    assert summary["eval/paper_loss"] < summary["eval/loss"]  # the (n + 1) divisor biases it low
    assert summary["eval/ppl"] == pytest.approx(math.exp(summary["eval/loss"]))
    # the pass is timed (perf/eval_s), and the per-set timers are folded into it, not logged
    assert 0 < summary["perf/eval_s"] < 600
    assert not [k for k in summary if k.endswith("_seconds")]


def test_wandb_offline_writes_a_run(tmp_path, monkeypatch):
    """logger=wandb (mode online in the file) follows WANDB_MODE=offline and writes under WANDB_DIR."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_dir"))
    (tmp_path / "wandb_dir").mkdir()
    _, run_dir = run_in_process(tmp_path, [*C4_SMALL, "trainer.steps=2", "logger=wandb", "logger.wandb.group=tests"])
    runs = list((tmp_path / "wandb_dir" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))


def test_logged_lr_is_the_updates_own(tmp_path):
    """train/lr at step s is the lr that update s ran at: with the reference quirks the first is 0 and the extra
    last one 1e-7 x peak (schedule.py), not the next update's."""
    _, run_dir = run_in_process(tmp_path, [*C4_SMALL, "trainer.steps=4", "optimizer=sgd", "optimizer.lr=0.1",
                                           "schedule=cosine", "schedule.warmup_ratio=0.5",
                                           "schedule.reference_quirks=true"])
    lrs = [r["train/lr"] for r in metrics(run_dir) if "train/lr" in r]
    assert lrs == pytest.approx([0.0, 0.05, 0.1, 0.055, 1e-8], abs=1e-12)


@pytest.mark.parametrize("args, message", [
    (["optimizer=adamx"], "Could not find 'optimizer/adamx'"),
    (["trainer.global_batch_size=10", "trainer.micro_batch_size=4"], "global_batch_size=10 is not divisible"),
    (["trainer.eval_every=0"], "eval_every must be > 0"),
    (["trainer.precision=fp16"], "unknown precision 'fp16'"),
    (["model=7b", "optimizer=adamw", "trainer.device=cpu"], "need about .* GB .* but the device has"),
    (["optimizer.lr=-1"], "lr must be >= 0"),
    (["data.eval_tokens=100000000"], "fewer than data.eval_tokens=100000000"),  # before the first step
    ([f"checkpoint.dir={Path(__file__)}/ckpt"], "cannot write in the checkpoint directory"),
    (["data=c4_local", "data.train.files=[c4/nope.jsonl.gz]", "model.vocab_size=32000"], "nope.jsonl.gz"),
])
def test_bad_input_one_clear_error_nothing_written(tmp_path, args, message):
    import re
    out = run_cli([*args, f"output_root={tmp_path}"], cwd=tmp_path, timeout=300)
    assert out.returncode != 0
    assert re.search(message, out.stderr), out.stderr[-2000:]
    if "Could not find" in message:
        assert "Available options" in out.stderr and "scale" in out.stderr
    else:
        assert "Traceback" not in out.stderr
    leftovers = list(tmp_path.rglob("*"))  # not even the date directory Hydra made for the run
    assert leftovers == [], leftovers


@pytest.mark.parametrize("args, message", [
    (["trainer.grad_clip=-1"], r"trainer.grad_clip must be >= 0"),
    (["trainer.eval_batch_size=4", "trainer.eval_global_batch_size=8"], "set one of trainer.eval_batch_size"),
    (["lookahead=ema_nesterov", "+lookahead.window=5"], r"unknown lookahead keys \['window'\]"),
    (["lookahead=ema_nesterov", "lookahead.start_step=400", "lookahead.end_step=null"],
     r"lookahead window .* is empty in a run of trainer.steps=300"),
    (["trainer.eval_precision=fp23"], r"trainer.eval_precision must be one of \['train', 'fp32'\], got 'fp23'"),
    (["schedule=wsd", "schedule.decay_type=exp"], r"unknown schedule.decay_type 'exp'"),
    (["+schedule.decay_type=exponential"], r"schedule.decay_type is the wsd decay's shape; schedule=cosine has none"),
    (["+schedule.decay_steps=5"], r"unknown schedule keys \['decay_steps'\]"),
    (["trainer.loss_dtype=bf16"], r"unknown trainer.loss_dtype 'bf16'; choose one of \['float32', 'logits'\]"),
    (["trainer.loss_dtype=logits", "trainer.loss_head=one_pass"],
     r"loss_dtype=logits .*trainer.loss_head=one_pass takes the softmax in fp32"),
    (["trainer.sdpa_backend=flash3"], r"unknown trainer.sdpa_backend 'flash3'; choose one of \['auto', 'math'"),
    (["trainer.sdpa_backend=cudnn", "trainer.deterministic=true"],
     r"sdpa_backend=cudnn contradicts trainer.deterministic=true"),
    (["trainer.sdpa_backend=efficient", "trainer.device=cpu"], r"sdpa_backend=efficient runs on CUDA only"),
])
def test_bad_settings_refused_before_anything_is_built(tmp_path, monkeypatch, args, message):
    """(The CLI turns these ValueErrors into one line and exit 2, as the test above shows.)"""
    def no_model(*args, **kwargs):
        raise AssertionError("the model was built before the settings were checked")
    monkeypatch.setattr("llmopt.train.build.build_model", no_model)
    with pytest.raises(ValueError, match=message):
        run_in_process(tmp_path, args)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("args, message", [
    (["+trainer.stepz=5"], "Key 'stepz' not in 'TrainerConfig'"),
    (["+sead=3"], "Key 'sead' not in 'RunConfig'"),
    (["+checkpoint.evry=3"], "Key 'evry' not in 'CheckpointConfig'"),
])
def test_appended_unknown_keys_refused_before_anything_is_built(tmp_path, monkeypatch, args, message):
    """Hydra adds a `+key` even to a typed group; run() holds the config to the schema first."""
    from omegaconf.errors import ConfigKeyError

    def no_model(*args, **kwargs):
        raise AssertionError("the model was built before the settings were checked")
    monkeypatch.setattr("llmopt.train.build.build_model", no_model)
    with pytest.raises(ConfigKeyError, match=message):
        run_in_process(tmp_path, args)
    assert not (tmp_path / "run").exists()


def _hf_weights(run_dir):
    from transformers import LlamaForCausalLM
    return LlamaForCausalLM.from_pretrained(run_dir / "hf_model").state_dict()


@pytest.mark.parametrize("precision", ["bf16_pure", "amp_bf16"])
def test_fp32_evaluation_is_the_fp32_models_loss_of_the_same_weights(tmp_path, precision):
    """trainer.eval_precision=fp32: the evaluation of a bf16_pure (amp_bf16) run equals the loss of its weights
    in an fp32 model built as an fp32 run builds it, and differs from the evaluation in the training precision;
    the evaluations (after every step) leave training exactly as it is without them."""
    from omegaconf import OmegaConf

    from llmopt.data import build_data
    from llmopt.model import use_rotary_table
    from llmopt.model.attention import use_attention
    from llmopt.model.loss import CausalLMLoss

    common = [*C4_SMALL, "trainer.steps=3", "trainer.eval_every=1", "optimizer=adamw", "optimizer.lr=3e-2",
              f"trainer.precision={precision}", "checkpoint.final=false", "checkpoint.export_hf=true"]
    fp32_eval, fp32_dir = run_in_process(tmp_path, [*common, "trainer.eval_precision=fp32"], "fp32")
    train_eval, train_dir = run_in_process(tmp_path, [*common, "trainer.eval_precision=train"], "train")

    trained = _hf_weights(fp32_dir)
    for name, weight in _hf_weights(train_dir).items():   # bit for bit: the fp32 copy never wrote back
        assert torch.equal(trained[name], weight), name
    assert [r["train/loss"] for r in metrics(fp32_dir)] == [r["train/loss"] for r in metrics(train_dir)]
    assert len([r for r in metrics(fp32_dir) if "eval/loss" in r]) == 3

    cfg = compose_config(common)
    model = build_model(llama_config("micro", vocab_size=32000, max_seq_len=2048), seed=0, dtype=torch.float32)
    use_rotary_table(model)
    use_attention(model, "sdpa")
    model.load_state_dict(trained)            # upcast from the run's dtype
    loss_model = CausalLMLoss(model, head="plain").eval()
    data = build_data(OmegaConf.to_container(cfg.data, resolve=True), micro_batch_size=4, rank=0, world_size=1,
                      seed=cfg.seed)
    try:
        with torch.no_grad():
            sums = [loss_model(b["input_ids"], b["labels"]) for b in data.eval_batches(4)]
    finally:
        data.close()
    reference = sum(float(loss) for loss, _ in sums) / sum(int(count) for _, count in sums)
    assert fp32_eval["eval/loss"] == pytest.approx(reference, rel=1e-7)
    assert abs(train_eval["eval/loss"] - reference) > 1e-5     # the bf16 evaluation: another number (here ~5e-5)


def test_tiny_model_learns_the_offline_corpus_towards_its_entropy(tmp_path):
    """The offline corpus has a known loss floor (its entropy per token): a short run gets most of the way
    from the uniform loss ln(512) = 6.24 towards it, and never below it."""
    from omegaconf import OmegaConf

    from llmopt.data.synthetic import entropy_per_token
    summary, _ = run_in_process(tmp_path, ["trainer.steps=150", "optimizer.lr=1e-2", "trainer.micro_batch_size=32",
                                           "trainer.eval_every=150", "trainer.log_every=50", "data.eval_tokens=20000",
                                           "checkpoint.final=false", "checkpoint.export_hf=false"])
    floor = entropy_per_token(OmegaConf.to_container(compose_config([]).data, resolve=True))
    assert 3.8 < floor < 4.0
    assert floor - 0.02 < summary["eval/loss"] < floor + 0.6, (summary["eval/loss"], floor)


@pytest.mark.parametrize("device", ["cpu", *(["cuda"] if torch.cuda.is_available() else [])])
def test_batches_reach_the_device_unchanged(device):
    """to_device: on CUDA through a pinned copy made by numpy (asynchronous), elsewhere a plain copy."""
    from llmopt.train.trainer import to_device

    batch = {"input_ids": torch.randint(0, 32000, (4, 9)), "labels": torch.full((4, 9), -100),
             "attention_mask": torch.ones(4, 9, dtype=torch.int64)}
    moved = to_device(batch, torch.device(device))
    for key, value in batch.items():
        assert moved[key].device.type == device and moved[key].dtype == value.dtype
        assert torch.equal(moved[key].cpu(), value), key


def test_peak_flops_by_device_name():
    """The H100's PCIe and NVL cards are not the SXM's 989 TFLOP/s (MFU would read low)."""
    from llmopt.metrics.throughput import peak_flops_of
    assert peak_flops_of("NVIDIA H100 80GB HBM3") == 989e12 and peak_flops_of("NVIDIA H200") == 989e12
    assert peak_flops_of("NVIDIA H100 PCIe") == 756e12 and peak_flops_of("NVIDIA H100 NVL") == 835e12
    assert peak_flops_of("Tesla T4") is None


def test_eval_global_batch_is_split_over_the_ranks():
    """trainer.eval_global_batch_size: the reference's evaluation batch over all GPUs, the same per-rank batch
    count (paper_loss's divisor) on any number of processes."""
    from llmopt.train.trainer import TrainerConfig
    assert TrainerConfig(micro_batch_size=8).eval_batch(4) == 8
    assert TrainerConfig(eval_batch_size=3).eval_batch(4) == 3
    assert [TrainerConfig(eval_global_batch_size=512).eval_batch(w) for w in (1, 2, 8)] == [512, 256, 64]
    with pytest.raises(ValueError, match="positive multiple of the number of processes"):
        TrainerConfig(eval_global_batch_size=512).eval_batch(3)


def test_removing_a_run_directory_takes_its_empty_date_directory(tmp_path):
    """remove_if_empty (another rank's unused directory) and remove_if_unstarted (a run that failed before its first
    step) leave no empty date directory behind, and keep one that holds other runs."""
    from llmopt.train.rundir import remove_if_empty, remove_if_unstarted

    (tmp_path / "day1" / "run").mkdir(parents=True)
    remove_if_empty(tmp_path / "day1" / "run")
    (tmp_path / "day2" / "run").mkdir(parents=True)
    (tmp_path / "day2" / "run" / "config.yaml").write_text("seed: 0\n")
    (tmp_path / "day2" / "other").mkdir()
    remove_if_unstarted(tmp_path / "day2" / "run")
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["day2", "other"]


def test_an_output_root_that_cannot_be_created_is_one_line(tmp_path):
    blocker = tmp_path / "a_file"  # root ignores permissions: a file where a directory must go fails for everyone
    blocker.write_text("")
    out = run_cli([f"output_root={blocker}/out"], cwd=tmp_path, timeout=300)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "llmopt: error: cannot create the run directory" in out.stderr and "set output_root" in out.stderr
