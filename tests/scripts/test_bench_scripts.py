"""The benchmark scripts' own logic, on the CPU: bench_train's case syntax, bench_memory's accounting,
profile_step's kernel kinds and matrix-product shapes, bench_optim's launch-shape sweeps, bench_loss_head's floor."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"
sys.path.insert(0, str(SCRIPTS))

import bench_loss_head  # noqa: E402
import bench_memory  # noqa: E402
import bench_optim  # noqa: E402
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
    assert bench_train.case_overrides("60m:scale:bf16_pure:deterministic", "/d", 10, True)[-1] == \
        "trainer.deterministic=true"
    papers_numerics = bench_train.case_overrides("60m:scale:bf16_pure:bf16_ce:math_bf16_sdpa", "/d", 10, True)
    assert papers_numerics[-2:] == ["trainer.loss_dtype=logits", "trainer.sdpa_backend=math_bf16"]
    paper_batch = bench_train.case_overrides("1b:adamw:bf16_pure:mb=32:accum=16", "/d", 10, True)
    assert "trainer.micro_batch_size=32" in paper_batch and "trainer.global_batch_size=512" in paper_batch
    with pytest.raises(ValueError, match="unknown case flag 'fast'.*mb=N, accum=N or a Hydra override"):
        bench_train.case_overrides("60m:adamw:bf16_pure:fast", "/d", 10, True)


def test_bench_train_ratios_against_the_reference_at_the_same_and_at_the_papers_micro_batch():
    rows = [{"case": "350m:reference_eager", "micro_batch": 128, "tok_s": 100.0},
            {"case": "350m:reference_eager", "micro_batch": 256, "tok_s": 110.0},
            {"case": "350m:adamw:bf16_pure:accum=4", "micro_batch": 128, "tok_s": 200.0},
            {"case": "350m:adamw:bf16_pure:mb=256:accum=2", "micro_batch": 256, "tok_s": 220.0},
            {"case": "350m:adamw:bf16_pure:mb=64:accum=8", "micro_batch": 64, "tok_s": 150.0},
            {"case": "60m:adamw:bf16_pure", "micro_batch": 256, "tok_s": 900.0},
            {"case": "1b:adamw:bf16_pure", "error": "OutOfMemoryError", "wall_s": 1.0}]
    assert bench_train.ratios_to_reference(rows) == [
        (None, None), (None, None),  # the references themselves
        (2.0, 2.0),                  # at the papers' micro-batch both ratios are one
        (2.0, 2.2),                  # 256 against the loop at 256, and against the papers' loop at 128
        (None, 1.5),                 # no reference at 64
        (None, None),                # no 60M reference run
        (None, None)]                # a failed case


def test_bench_train_says_when_the_eval_time_holds_compilation():
    row = {"eval_tokens": 149240, "eval_s": 35.9, "compile": True, "eval_passes": 1}
    assert bench_train.eval_summary(row) == "  eval 149,240 tokens in 35.9 s (the only pass: with compilation)"
    assert bench_train.eval_summary({**row, "eval_passes": 2}) == "  eval 149,240 tokens in 35.9 s"
    assert bench_train.eval_summary({**row, "compile": False}) == "  eval 149,240 tokens in 35.9 s"
    assert bench_train.eval_summary({"eval_tokens": None}) == ""


def test_bench_memory_measures_what_the_accounting_counts(tmp_path, capsys):
    out = tmp_path / "rows.jsonl"
    assert bench_memory.main(["--flavors", "micro", "--optimizers", "adamw", "muon", "scale", "ema+scale",
                              "--micro-batch", "2", "--seq-len", "16", "--out", str(out)]) == 0
    rows = {r["optimizer"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert set(rows) == {"adamw", "muon", "scale", "ema+scale"}
    weights = rows["adamw"]["weights_gb"]
    assert rows["adamw"]["grads_gb"] == weights
    kb = 1e-6  # in GB: torch's AdamW also keeps a 4-byte step counter per parameter
    assert rows["adamw"]["state_gb"] == pytest.approx(2 * weights, abs=kb)  # two moments, in the parameter dtype
    # EMA-Nesterov: prev in bf16 and m in fp32 (3 x the bf16 weights)
    assert rows["ema+scale"]["state_gb"] == pytest.approx(rows["scale"]["state_gb"] + 3 * weights, abs=kb)
    # SCALE: the lm_head momentum (as the paper counts) plus the 1-D parameters' two moments
    assert rows["scale"]["paper_gb"] - weights < rows["scale"]["state_gb"] < 0.5 * rows["adamw"]["state_gb"]
    assert rows["adamw"]["paper_gb"] == pytest.approx(3 * weights)
    # llmopt's accounting is the state its optimizers hold (Muon: AdamW's two moments beside the matrices' one)
    for name in ("adamw", "muon", "scale"):
        assert rows[name]["llmopt_gb"] - weights == pytest.approx(rows[name]["state_gb"], abs=kb), name
    assert rows["muon"]["llmopt_gb"] > rows["muon"]["paper_gb"]
    assert rows["adamw"]["estimate_gb"] == pytest.approx(4 * weights)
    assert "micro  scale" in capsys.readouterr().out


def test_bench_loss_head_floor_and_its_cuda_requirement(monkeypatch):
    # the 350M micro-batch's logits, bf16: read once, the gradient written once in their place
    assert bench_loss_head.floor_bytes(32768, 32000, 2) == 2 * 32768 * 32000 * 2
    monkeypatch.setattr(bench_loss_head.torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="needs a CUDA device"):
        bench_loss_head.main(["--tokens", "8"])


def test_loss_head_warps_override_changes_the_launch_not_the_result(monkeypatch):
    """The sweep's launch (cross_entropy._launch with warps) gives the default launch's losses and gradient."""
    from llmopt.model import cross_entropy

    launches = []
    kernel = cross_entropy._cross_entropy_rows

    class Recorder:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: (launches.append(kwargs["num_warps"]), kernel[grid](*args, **kwargs))

    monkeypatch.setattr(cross_entropy, "_cross_entropy_rows", Recorder())
    logits = torch.randn(6, 1000)
    targets = torch.tensor([3, -100, 999, 0, 17, 500])
    results = [(cross_entropy._launch(x, targets, write_grad=True, warps=w), x)
               for w, x in ((None, logits.clone()), (8, logits.clone()))]
    assert launches == [4, 8]  # 1024 padded entries: one warp per 1024, at least 4
    torch.testing.assert_close(results[1][0], results[0][0], rtol=0, atol=0)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=0, atol=0)


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


def test_profile_step_matmul_shapes_from_a_real_profile():
    from torch.profiler import ProfilerActivity, profile

    a, b, bias = torch.randn(64, 32), torch.randn(32, 16), torch.randn(16)
    batched_a, batched_b = torch.randn(3, 8, 4), torch.randn(3, 4, 5)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(2):  # two "steps"
            for _ in range(3):
                torch.mm(a, b)
            torch.addmm(bias, a, b)
            torch.bmm(batched_a, batched_b)
            torch.mm(a[:16], b)  # another shape: its own row
    rows = profile_step.matmul_shapes(prof.key_averages(group_by_input_shape=True), steps=2, on_device=False)
    by_key = {(r["op"], str(r["shapes"])): r for r in rows}
    mm = by_key[("aten::mm", "[[64, 32], [32, 16]]")]
    assert mm["per_step"] == 3 and mm["ms"] > 0
    assert mm["tflop_s"] == pytest.approx(2 * 64 * 32 * 16 * 6 / (mm["ms"] * 2e-3) / 1e12, rel=0.01)
    assert by_key[("aten::mm", "[[16, 32], [32, 16]]")]["per_step"] == 1
    assert by_key[("aten::addmm", "[[16], [64, 32], [32, 16]]")]["per_step"] == 1
    assert by_key[("aten::bmm", "[[3, 8, 4], [3, 4, 5]]")]["per_step"] == 1
    assert [r["ms"] for r in rows] == sorted((r["ms"] for r in rows), reverse=True)
    # the FLOPs of each product kind, as written in the inductor's out= form too (the output's shape last)
    flops = profile_step.matmul_flops
    assert flops("aten::mm", [[32768, 1024], [1024, 2736], [32768, 2736]]) == 2 * 32768 * 1024 * 2736
    assert flops("aten::addmm", [[16], [64, 32], [32, 16]]) == 2 * 64 * 32 * 16
    assert flops("aten::bmm", [[3, 8, 4], [3, 4, 5]]) == 2 * 3 * 8 * 4 * 5
    assert flops("aten::baddbmm", [[3, 8, 5], [3, 8, 4], [3, 4, 5]]) == 2 * 3 * 8 * 4 * 5


def test_bench_optim_floors():
    """The bytes each step must move, per case (b = 2, bf16): AdamW 7 per element; SCALE 3, plus 2 per lm_head
    element (its momentum) and 1 per embedding element (a second read of its gradient for the column RMS);
    SGD-LL 6; none for the others."""
    n, n_head, n_embed = 1000, 100, 50
    assert bench_optim.floor_bytes("adamw_fused", n, n_head, n_embed, 2) == 14000
    assert bench_optim.floor_bytes("scale", n, n_head, n_embed, 2) == 6000 + 400 + 100
    assert bench_optim.floor_bytes("scale_eager", n, n_head, n_embed, 4) == 12000 + 800 + 200
    assert bench_optim.floor_bytes("sgd_ll", n, n_head, n_embed, 2) == 12000
    assert bench_optim.floor_bytes("muon", n, n_head, n_embed, 2) is None


def test_bench_optim_launch_shapes_change_the_launch_not_the_result():
    """A sweep is only a fair comparison if the optimizer computes the same thing under every launch shape:
    SCALE + EMA-Nesterov and SGD-LL (every Triton kernel they use) with tiny blocks and one warp equal the
    default shapes' results up to fp32 summation order, and the module's constants come back afterwards."""
    from llmopt.kernels import common
    from llmopt.model import build_model, llama_config
    from llmopt.optim import build_optimizer

    assert common.available([torch.zeros(1)]), "the kernels must run here (TRITON_INTERPRET=1 on CPU: conftest.py)"
    shapes = bench_optim.parse_launch("ROW_ELEMENTS_PER_PROGRAM=64,ROW_WARPS=1,LONG_ROW=16,LONG_ROW_WARPS=2,"
                                      "ELEMENTS_PER_PROGRAM=128,ELEMENT_WARPS=1,EMA_ELEMENTS_PER_PROGRAM=64,"
                                      "EMA_ELEMENT_WARPS=1")
    def current():
        return common.launch_shape(torch.device("cpu"))
    defaults = current()
    assert set(defaults) == set(common.LAUNCH_CONSTANTS)
    assert all(defaults[name] != value for name, value in shapes.items())  # every constant really changes

    def train(name, **hparams):
        model = build_model(llama_config("micro"), seed=0)
        opt = build_optimizer(model, name, fused=True, **hparams)
        for t in range(3):
            if hasattr(opt, "pre_forward"):
                opt.pre_forward()
            gen = torch.Generator().manual_seed(t)
            for p in model.parameters():
                p.grad = torch.randn(p.shape, generator=gen) * 1e-2
            opt.step()
        return [p.detach().clone() for p in model.parameters()]

    cases = [("scale", {"lr": 1e-2, "adam_lr": 1e-2, "lookahead": {"beta": 0.5, "gamma": 0.9, "fused": True}}),
             ("sgd_ll", {"lr": 100.0})]
    for name, hparams in cases:
        start = [p.detach().clone() for p in build_model(llama_config("micro"), seed=0).parameters()]
        default = train(name, **hparams)
        with bench_optim.launch_shapes(shapes):
            assert {n: current()[n] for n in shapes} == shapes
            swept = train(name, **hparams)
        assert current() == defaults
        for a, b in zip(default, swept):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)
        assert any(not torch.equal(a, p0) for a, p0 in zip(default, start)), f"{name} did not move"

    with pytest.raises(RuntimeError, match="inside"):  # restored when the timed block fails too
        with bench_optim.launch_shapes(shapes):
            raise RuntimeError("inside")
    assert current() == defaults and common.launch_overrides == {}


def test_bench_optim_row_shapes(capsys, tmp_path, monkeypatch):
    """--row-shapes: SCALE's row kernel alone, a row per weight shape of the model (all 2-D weights but the
    embedding, lm_head with its momentum) for the default launch and each --launch, and torch's in-place add over
    the same bytes beside each shape without momentum (default launch only); no ratios to AdamW."""
    from llmopt.kernels import common
    from llmopt.model import build_model, llama_config

    model = build_model(llama_config("micro"))
    counts = {}
    for name, p in model.named_parameters():
        if p.dim() == 2 and "embed" not in name and "lm_head" not in name:
            counts[tuple(p.shape)] = counts.get(tuple(p.shape), 0) + 1
    shapes = [f"scale rows {'x'.join(map(str, s))} x{n}" for s, n in counts.items()]
    references = [[f"add_ {'x'.join(map(str, s))} x{n}", f"add_ flat {s[0] * s[1] * n}"] for s, n in counts.items()]
    head = f"scale rows {'x'.join(map(str, model.lm_head.weight.shape))} x1 +momentum"
    out = tmp_path / "optim.json"
    assert bench_optim.main(["--flavor", "micro", "--dtypes", "fp32", "--cases", "scale", "--steps", "1",
                             "--row-shapes", "--launch", "ROW_WARPS=8", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert len(counts) == 3  # attention, gate/up and down projections of the micro flavor
    with_references = [case for shape, refs in zip(shapes, references) for case in (shape, *refs)]
    assert [r["case"] for r in rows] == ["scale", "scale[ROW_WARPS=8]", *with_references, head,
                                         *(f"{c} [ROW_WARPS=8]" for c in [*shapes, head])]
    for r in rows[2:]:
        assert r["step_ms"] > 0 and r["x_fused_adamw"] is None and r["dtype"] == "fp32"
    assert head in capsys.readouterr().out
    monkeypatch.setattr(common, "available", lambda tensors: False)  # e.g. a CPU without the interpreter
    for argv in (["--row-shapes"], ["--row-shapes", "--cases", "adamw_fused"]):
        with pytest.raises(SystemExit) as exit_info:
            bench_optim.main(["--flavor", "micro", *argv])
        assert exit_info.value.code == 2
        assert "--row-shapes times SCALE's Triton row kernel" in capsys.readouterr().err


def test_bench_optim_launch_rows_and_bad_launch_input(capsys, tmp_path):
    out = tmp_path / "optim.json"
    assert bench_optim.main(["--flavor", "micro", "--dtypes", "fp32", "--cases", "adamw_fused", "scale", "--steps",
                             "1", "--launch", "ROW_WARPS=8", "--out", str(out)]) == 0
    cases = [r["case"] for r in json.loads(out.read_text())["rows"]]
    assert cases == ["adamw_fused", "adamw_fused[ROW_WARPS=8]", "scale", "scale[ROW_WARPS=8]"]
    assert "scale[ROW_WARPS=8]" in capsys.readouterr().out
    unknown = r"--launch 'ROW_WARP=8': unknown launch constants \['ROW_WARP'\]; known: ELEMENTS_PER_PROGRAM"
    for bad, message in (("ROW_WARP=8", unknown),
                         ("ROW_WARPS=6", "ROW_WARPS must be a power of two, got '6'")):
        with pytest.raises(SystemExit) as exit_info:
            bench_optim.main(["--flavor", "micro", "--launch", bad])
        assert exit_info.value.code == 2
        assert re.search(message, capsys.readouterr().err)
