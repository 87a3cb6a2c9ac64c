import pytest
import torch

from llmopt.model import FLAVORS, build_model, llama_config
from llmopt.optim import classify_parameters


@pytest.mark.parametrize("flavor", sorted(FLAVORS))
def test_every_parameter_gets_exactly_one_role(flavor):
    config = llama_config(flavor)
    model = build_model(config, device="meta")
    roles = classify_parameters(model)
    n_layers = config.num_hidden_layers
    assert roles.names("embedding") == ["model.embed_tokens.weight"]
    assert roles.names("output") == ["lm_head.weight"]
    assert len(roles.names("matrix")) == 7 * n_layers
    assert len(roles.names("vector")) == 2 * n_layers + 1
    every = [n for r in roles.by_role for n in roles.names(r)]
    assert sorted(every) == sorted(n for n, _ in model.named_parameters())


def test_unmatched_parameter_is_refused_with_a_fix():
    model = build_model(llama_config("micro"))
    model.extra = torch.nn.Linear(4, 4, bias=False)
    with pytest.raises(ValueError, match=r"no role matches 1 parameter.*extra\.weight.*patterns"):
        classify_parameters(model)
    roles = classify_parameters(model, {"matrix": r"(\.layers\.\d+\.(self_attn|mlp)\.\w+|extra)\.weight$"})
    assert "extra.weight" in roles.names("matrix")


def test_ambiguous_patterns_are_refused():
    model = build_model(llama_config("micro"))
    with pytest.raises(ValueError, match="several roles match"):
        classify_parameters(model, {"output": r"weight$"})


def test_unknown_role_in_patterns():
    with pytest.raises(ValueError, match="unknown role"):
        classify_parameters(build_model(llama_config("micro")), {"head": "x"})


def test_frozen_parameters_are_left_out():
    model = build_model(llama_config("micro"))
    model.model.embed_tokens.weight.requires_grad_(False)
    assert classify_parameters(model).names("embedding") == []
