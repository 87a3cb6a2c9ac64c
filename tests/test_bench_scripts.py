"""The benchmark scripts' own logic, on the CPU: bench_train's case syntax, bench_memory's accounting,
profile_step's kernel kinds."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
sys.path.insert(0, str(SCRIPTS))

import bench_memory  # noqa: E402
import bench_train  # noqa: E402
import profile_step  # noqa: E402


def test_bench_train_case_flags_become_overrides():
    overrides = bench_train.case_overrides("7b:scale:amp_bf16:ckpt:eager:mb=8:optimizer.lr=1e-4", "/d", 10, True)
    assert "model=7b" in overrides and "optimizer=scale" in overrides and "trainer.precision=amp_bf16" in overrides
    assert "trainer.micro_batch_size=8" in overrides and "trainer.global_batch_size=16" in overrides
    # flags come last, so they win over the defaults before them
    assert overrides.index("trainer.compile=false") > overrides.index("trainer.compile=true")
    assert overrides[-3:] == ["trainer.activation_checkpointing=true", "trainer.compile=false", "optimizer.lr=1e-4"]
    evaluation = bench_train.case_overrides("60m:adamw:bf16_pure:eval10m", "/d", 10, True)
    assert "data.eval_tokens=10000000" in evaluation and "trainer.eval_every=5" in evaluation
    chunked = bench_train.case_overrides("60m:adamw:bf16_pure:chunked_ce", "/d", 10, True)
    assert chunked[-1] == "trainer.loss_head=chunked"
    paper_batch = bench_train.case_overrides("1b:adamw:bf16_pure:mb=32:accum=16", "/d", 10, True)
    assert "trainer.micro_batch_size=32" in paper_batch and "trainer.global_batch_size=512" in paper_batch
    with pytest.raises(ValueError, match="unknown case flag 'fast'.*mb=N, accum=N or a Hydra override"):
        bench_train.case_overrides("60m:adamw:bf16_pure:fast", "/d", 10, True)


def test_bench_memory_measures_what_the_accounting_counts(tmp_path, capsys):
    out = tmp_path / "rows.jsonl"
    assert bench_memory.main(["--flavors", "micro", "--optimizers", "adamw", "scale", "ema+scale",
                              "--micro-batch", "2", "--seq-len", "16", "--out", str(out)]) == 0
    rows = {r["optimizer"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert set(rows) == {"adamw", "scale", "ema+scale"}
    weights = rows["adamw"]["weights_gb"]
    assert rows["adamw"]["grads_gb"] == weights
    kb = 1e-6  # in GB: torch's AdamW also keeps a 4-byte step counter per parameter
    assert rows["adamw"]["state_gb"] == pytest.approx(2 * weights, abs=kb)  # two moments, in the parameter dtype
    assert rows["ema+scale"]["state_gb"] == pytest.approx(rows["scale"]["state_gb"] + 2 * weights, abs=kb)
    # SCALE: the lm_head momentum (as the paper counts) plus the 1-D parameters' two moments
    assert rows["scale"]["paper_gb"] - weights < rows["scale"]["state_gb"] < 0.5 * rows["adamw"]["state_gb"]
    assert rows["adamw"]["paper_gb"] == pytest.approx(3 * weights)
    assert rows["adamw"]["estimate_gb"] == pytest.approx(4 * weights)
    assert "micro  scale" in capsys.readouterr().out


def test_profile_step_kernel_kinds_and_its_cuda_requirement(monkeypatch):
    kind = profile_step.kernel_kind
    assert kind("nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_NNT") == "matmul"
    assert kind("cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16_knob_26") == "attention"
    assert kind("triton_red_fused__log_softmax__to_copy_prepare_softmax_online_12") == "triton"
    assert kind("liger_cross_entropy_kernel") == "triton"
    assert kind("void at::native::multi_tensor_apply_kernel<FusedAdamMathFunctor>") == "optimizer"
    assert kind("void at::native::vectorized_elementwise_kernel<4, FillFunctor<float>>") == "other"
    monkeypatch.setattr(profile_step.torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="needs a CUDA device"):
        profile_step.main(["--flavor", "micro"])
