import pytest
import torch

from llmopt.accounting import llmopt_memory_gb, paper_memory_gb, state_elements
from llmopt.model import llama_config, param_counts
from llmopt.optim import build_optimizer, state_bytes
from tests.helpers.models import lm_loss, micro_model, random_batches

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


def test_llmopt_accounting_beside_the_papers_at_1b():
    """The paper counts one Muon state per parameter (5.356 GB at 1B); llmopt's Muon keeps one per attention/MLP
    matrix element and AdamW's two on the embedding, lm_head and norms. Counts from the 1B config's shapes."""
    hidden, intermediate, layers, vocab = 2048, 5461, 24, 32000
    matrices = layers * (4 * hidden * hidden + 3 * hidden * intermediate)
    embedding = output = vocab * hidden
    norms = (2 * layers + 1) * hidden
    total = matrices + embedding + output + norms
    assert total == 1_339_082_752
    assert paper_memory_gb("1b", "muon") == pytest.approx(2 * (total + total) / 1e9)
    assert round(paper_memory_gb("1b", "muon"), 3) == 5.356
    llmopt_muon = 2 * (total + matrices + 2 * (embedding + output + norms)) / 1e9
    assert llmopt_memory_gb("1b", "muon") == pytest.approx(llmopt_muon)
    assert round(llmopt_muon, 3) == 5.619
    # Adam: the same states both ways; SCALE: llmopt also keeps the norms' two AdamW moments
    assert llmopt_memory_gb("1b", "adam") == pytest.approx(paper_memory_gb("1b", "adam"))
    assert llmopt_memory_gb("1b", "scale") == pytest.approx(paper_memory_gb("1b", "scale") + 2 * 2 * norms / 1e9)
    assert llmopt_memory_gb("1b", "muon", "ema_nesterov") == pytest.approx(llmopt_muon + 2 * 2 * total / 1e9)


def test_llmopt_accounting_is_what_muon_holds():
    model = micro_model(torch.bfloat16)
    opt = build_optimizer(model, "muon")
    lm_loss(model, random_batches(1)[0]).backward()
    opt.step()
    adamw_params = [p for n, p in model.named_parameters() if p.ndim == 1 or "embed" in n or "lm_head" in n]
    # one state per parameter (Muon's momentum, AdamW's first moment), a second for AdamW's parameters
    elements = sum(p.numel() for p in model.parameters()) + sum(p.numel() for p in adamw_params)
    counts = param_counts(llama_config("micro"))
    assert state_elements(counts, "muon", accounting="llmopt") == elements
    assert state_bytes(opt) == 2 * elements + 4 * len(adamw_params)           # + AdamW's float32 step counters
