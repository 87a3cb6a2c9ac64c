import pytest
import torch

from llmopt.model import llama_config, param_counts
from llmopt.optim import build_optimizer, paper_memory_gb, state_bytes
from tests.conftest import lm_loss, micro_model, random_batches

# SCALE paper, headline table: weights + optimizer state, GB, bf16
PUBLISHED = {"adam": [0.35, 0.81, 2.21, 8.04], "muon": [0.23, 0.54, 1.47, 5.36],
             "scale": [0.15, 0.32, 0.80, 2.81]}


@pytest.mark.parametrize("optimizer", sorted(PUBLISHED))
def test_paper_accounting_reproduces_the_published_table(optimizer):
    got = [paper_memory_gb(f, optimizer, as_printed=True) for f in ("60m", "130m", "350m", "1b")]
    assert got == PUBLISHED[optimizer]


def test_paper_accounting_at_7b_and_exact_values():
    assert paper_memory_gb("7b", "scale", as_printed=True) == 13.74
    assert paper_memory_gb("7b", "muon", as_printed=True) == 26.95
    n = param_counts(llama_config("1b"))["total"]
    assert paper_memory_gb("1b", "adam") == pytest.approx(6 * n / 1e9)
    assert paper_memory_gb("1b", "adam", lookahead="ema_nesterov") == pytest.approx(10 * n / 1e9)
    with pytest.raises(ValueError, match="defined here for"):
        paper_memory_gb("60m", "galore")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_measured_state_bytes(dtype):
    model = micro_model(dtype)
    n = sum(p.numel() for p in model.parameters())
    size = torch.tensor([], dtype=dtype).element_size()
    expected = {"adamw": 2 * n * size, "sgd_ll": n * size,
                "scale": model.lm_head.weight.numel() * size}
    for name, want in expected.items():
        m = micro_model(dtype)
        opt = build_optimizer(m, name)
        lm_loss(m, random_batches(1)[0]).backward()
        opt.step()
        got = state_bytes(opt)
        if name == "adamw":       # + one 4-byte step counter per tensor
            want += 4 * len(list(m.parameters()))
        if name == "scale":       # + the 1-D parameters' Adam moments (the paper ignores them)
            vec = sum(p.numel() for p in m.parameters() if p.ndim == 1)
            want += 2 * vec * size
        if name == "sgd_ll":      # + two float32 clip counters per tensor, + lm_head's row-clip share
            want += 8 * len(list(m.parameters())) + 4
        assert got == want, name
