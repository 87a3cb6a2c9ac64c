"""trainer.deterministic (llmopt.train.reproducible), the ordered embedding gradient it uses, and
scripts/repeat_run.py. Whether GPU runs then repeat bit for bit is measured on the GPU (benchmarks/RESULTS.md):
on a CPU every run repeats, with or without the mode."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch

from llmopt.model.embedding import OrderedEmbedding, use_ordered_embedding
from llmopt.train.reproducible import CUBLAS_WORKSPACE, deterministic_mode
from tests.helpers.models import micro_model
from tests.helpers.train import C4_SMALL, ROOT, compose_config, metrics, run_in_process

sys.path.insert(0, str(ROOT / "scripts"))
import repeat_run  # noqa: E402


def mode_state():
    from torch._inductor import config as inductor_config
    return (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic,
            torch.backends.cudnn.benchmark, os.environ.get("CUBLAS_WORKSPACE_CONFIG"), inductor_config.deterministic,
            torch.utils.deterministic.fill_uninitialized_memory)


def test_deterministic_mode_sets_everything_and_puts_it_back(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    before = mode_state()
    assert before[0] is False and before[3] is None
    with deterministic_mode(False):
        assert mode_state() == before
    with deterministic_mode(True):
        assert mode_state() == (True, True, False, CUBLAS_WORKSPACE, True, False)
    assert mode_state() == before
    with pytest.raises(RuntimeError, match="inside"):  # also after an error
        with deterministic_mode(True):
            raise RuntimeError("inside")
    assert mode_state() == before
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")  # a user's own setting is kept
    with deterministic_mode(True):
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"
    try:  # a mode the process had already set (here: warn-only) is what comes back
        torch.use_deterministic_algorithms(True, warn_only=True)
        with deterministic_mode(True):
            assert not torch.is_deterministic_algorithms_warn_only_enabled()
        assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
    finally:
        torch.use_deterministic_algorithms(False)


def embedding_case(dtype, id_dtype, padding_idx):
    """An embedding, ids that repeat (one id fills a whole row of the batch; the padding id and the last id occur)
    and a gradient for its output."""
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(50, 8, generator=g).to(dtype)
    ids = torch.randint(0, 50, (4, 33), generator=g)
    ids[0, :5] = 0 if padding_idx is None else padding_idx % 50
    ids[1] = 7
    ids[2, :3] = 49
    return weight, ids.to(id_dtype), torch.randn(4, 33, 8, generator=g).to(dtype)


@pytest.mark.parametrize("device", ["cpu", *(["cuda"] if torch.cuda.is_available() else [])])
@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("dtype, id_dtype, padding_idx", [(torch.float64, torch.int64, 0),
                                                          (torch.float64, torch.int64, None),
                                                          (torch.bfloat16, torch.int32, -1)])
def test_ordered_embedding_matches_nn_embedding(compiled, dtype, id_dtype, padding_idx, device):
    """Output and weight gradient equal nn.Embedding's (float64 and bf16; the padding row's gradient zero), eager
    and under torch.compile, where inductor calls the custom op instead of decomposing the backward into a
    scatter-add (which plain nn.Embedding compiles to: atomic_add). On a GPU also inside the deterministic mode,
    which refuses nondeterministic kernels."""
    from torch._inductor.utils import run_and_get_code

    weight, ids, grad = (t.to(device) for t in embedding_case(dtype, id_dtype, padding_idx))
    reference = torch.nn.Embedding(50, 8, padding_idx=padding_idx, _weight=weight.clone())
    reference(ids).backward(grad)
    ordered = OrderedEmbedding(50, 8, padding_idx=padding_idx, _weight=weight.clone())

    def forward_backward(module):
        out = (torch.compile(module) if compiled else module)(ids)
        out.backward(grad)
        return out
    if compiled:
        torch._dynamo.reset()
        out, code = run_and_get_code(forward_backward, ordered)
        assert any("llmopt.embedding_backward" in c for c in code), "the custom op is not called"
        # calls (tl.atomic_add(, atomic_add_vec<...>(), not names: inductor's Triton metadata holds 'atomic_add_found'
        atomic_call = re.compile(r"atomic_add[\w<>, ]*\(")
        assert not any(atomic_call.search(c) or "index_put" in c for c in code), "the backward was decomposed"
        torch._dynamo.reset()
        _, plain_code = run_and_get_code(forward_backward, torch.nn.Embedding(50, 8, _weight=weight.clone()))
        assert any(atomic_call.search(c) for c in plain_code)  # what the check above would catch
    else:
        out = forward_backward(ordered)
    assert torch.equal(out, reference(ids))
    assert torch.equal(ordered.weight.grad, reference.weight.grad)
    if device == "cuda":  # the mode refuses nondeterministic kernels: the op must not be one of them
        again = OrderedEmbedding(50, 8, padding_idx=padding_idx, _weight=weight.clone())
        with deterministic_mode(True):
            torch._dynamo.reset()
            assert torch.equal(forward_backward(again), out)
        torch._dynamo.reset()
        assert torch.equal(again.weight.grad, reference.weight.grad)
    assert ordered.weight.grad[7].abs().max() > 0
    if padding_idx is None:  # aten reads -1 as "no padding": the last row keeps its gradient
        assert ordered.weight.grad[49].abs().max() > 0
    else:
        assert ordered.weight.grad[padding_idx].abs().max() == 0


def test_embedding_backward_op_passes_torch_opcheck():
    from llmopt.model.embedding import embedding_backward
    weight, ids, grad = embedding_case(torch.float32, torch.int64, 0)
    torch.library.opcheck(embedding_backward, (grad, ids, 50, 0))


def test_ordered_embedding_refuses_what_it_does_not_compute():
    for option in ({"max_norm": 1.0}, {"scale_grad_by_freq": True}, {"sparse": True}):
        with pytest.raises(ValueError, match="plain lookup"):
            OrderedEmbedding(50, 8, **option)


def test_use_ordered_embedding_keeps_the_parameter_and_its_name():
    model = micro_model()
    weight = model.get_input_embeddings().weight
    names = [name for name, _ in model.named_parameters()]
    use_ordered_embedding(model)
    assert type(model.get_input_embeddings()) is OrderedEmbedding
    assert model.get_input_embeddings().weight is weight
    assert [name for name, _ in model.named_parameters()] == names
    tokens = torch.randint(0, 128, (2, 12))
    model(input_ids=tokens, labels=tokens).loss.backward()
    assert weight.grad is not None and weight.grad.abs().sum() > 0


def test_deterministic_run_trains_exactly_as_the_default_on_cpu(tmp_path, monkeypatch):
    """trainer.deterministic=true: the mode is on while the run trains (and off after), the model's embedding is
    the ordered one, and on the CPU the losses are those of the default run, bit for bit."""
    from llmopt.train.run import ModelCache, run
    from llmopt.train.trainer import Trainer

    seen = []
    fit = Trainer.fit

    def spy(self, loggers):
        seen.append(torch.are_deterministic_algorithms_enabled())
        return fit(self, loggers)
    monkeypatch.setattr(Trainer, "fit", spy)
    base = [*C4_SMALL, "trainer.steps=3", "optimizer=scale", "schedule=constant"]
    models = ModelCache()
    _, default_dir = run_in_process(tmp_path, base, name="default")
    cfg = compose_config([f"checkpoint.dir={tmp_path / 'ckpt'}", *base, "trainer.deterministic=true"])
    run(cfg, tmp_path / "deterministic", models=models)
    assert seen == [False, True] and not torch.are_deterministic_algorithms_enabled()
    ((model, *_), _), = models._entries.values()   # (what build() returned, the initial weights)
    assert type(model.get_input_embeddings()) is OrderedEmbedding
    losses = [[r["train/loss"] for r in metrics(d) if "train/loss" in r] for d in (default_dir,
                                                                                   tmp_path / "deterministic")]
    assert len(losses[0]) == 3 and losses[0] == losses[1]


def test_repeat_run_compares_losses_exactly():
    same = repeat_run.compare([{1: 2.5, 2: 2.25}, {1: 2.5, 2: 2.25}])
    assert same["identical"] and same["first_difference"] is None and same["max_spread"] == 0 and same["steps"] == 2
    differ = repeat_run.compare([{1: 2.5, 2: 2.25, 3: 2.0}, {1: 2.5, 2: 2.25 + 1e-7, 3: 2.5}, {1: 2.5, 2: 2.25}])
    assert not differ["identical"] and differ["first_difference"] == 2 and differ["steps"] == 2
    assert differ["spread"] == {1: 0.0, 2: pytest.approx(1e-7)} and differ["missing"] == [3]
    stopped_early = repeat_run.compare([{1: 2.5, 2: 2.25}, {1: 2.5}])
    assert not stopped_early["identical"] and stopped_early["first_difference"] is None
    assert stopped_early["missing"] == [2]
    with pytest.raises(ValueError, match="at least two runs"):
        repeat_run.compare([{1: 2.5}])
    with pytest.raises(ValueError, match="no common step"):
        repeat_run.compare([{1: 2.5}, {2: 2.5}])


def repeat_cli(*args: str) -> subprocess.CompletedProcess:
    """scripts/repeat_run.py ARGS as a user runs it, in its own process."""
    return subprocess.run([sys.executable, "scripts/repeat_run.py", *args], cwd=ROOT, capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)


def test_repeat_run_cli_on_the_offline_default(tmp_path):
    """Two fresh-process runs of the main job repeat on a CPU (exit 0, every step's loss identical); a run that
    fails is reported with its error (exit 3)."""
    out = tmp_path / "result.jsonl"
    done = repeat_cli("--out", str(out), "--", "trainer.steps=3", "trainer.deterministic=true")
    assert done.returncode == 0, done.stderr
    assert "2 runs of 1 process(es), 3 steps: losses identical at every step" in done.stdout
    row = json.loads(out.read_text())
    assert row["identical"] and len(row["losses"]) == 2 and row["losses"][0] == row["losses"][1]
    assert row["processes"] == [1, 1] and row["launcher"] is None
    failed = repeat_cli("--", "optimizer=nonexistent")
    assert failed.returncode == repeat_run.RUN_FAILED
    assert "run 1 failed" in failed.stderr and "nonexistent" in failed.stderr


def test_repeat_run_launches_ddp_runs(tmp_path, capsys):
    """--launcher starts each run through a launcher: here torchrun with 2 CPU processes (gloo); both runs train
    as 2 processes and repeat bit for bit. An empty launcher is refused before anything runs."""
    out = tmp_path / "result.jsonl"
    launcher = f"{sys.executable} -m torch.distributed.run --standalone --nproc_per_node 2"
    done = repeat_cli("--launcher", launcher, "--out", str(out), "--", "trainer.steps=3", "trainer.device=cpu")
    assert done.returncode == 0, done.stderr
    assert "2 runs of 2 process(es), 3 steps: losses identical at every step" in done.stdout
    row = json.loads(out.read_text())
    assert row["processes"] == [2, 2] and row["launcher"] == launcher and len(row["losses"][0]) == 3
    with pytest.raises(SystemExit) as refused:
        repeat_run.main(["--launcher", "", "--", "trainer.steps=1"])
    assert refused.value.code == 2 and "--launcher is empty" in capsys.readouterr().err
