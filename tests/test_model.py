import pytest
import torch

from llmopt.model import FLAVORS, build_model, flops_per_token, llama_config, param_counts
from llmopt.model.loss import CausalLMLoss
from llmopt.model.rotary import RotaryTable, use_rotary_table

# protocol.md section 1: total and attention+MLP parameters of the config files
PUBLISHED = {"60m": (58.07, 25.30), "130m": (134.11, 84.93), "350m": (367.97, 302.38),
             "1b": (1339.08, 1207.91), "7b": (6738.42, 6476.01)}


@pytest.mark.parametrize("flavor", sorted(PUBLISHED))
def test_parameter_counts_match_the_protocol(flavor):
    counts = param_counts(llama_config(flavor))  # meta device: nothing allocated
    total, attn_mlp = PUBLISHED[flavor]
    assert round(counts["total"] / 1e6, 2) == total
    assert round(counts["attn_mlp"] / 1e6, 2) == attn_mlp
    assert counts["embedding"] == counts["output"] == 32000 * FLAVORS[flavor].hidden


def test_config_is_the_protocols_llama():
    c = llama_config("1b")
    assert (c.hidden_size, c.intermediate_size, c.num_attention_heads, c.num_hidden_layers) == (2048, 5461, 32, 24)
    assert c.tie_word_embeddings is False and c.rms_norm_eps == 1e-6 and c.initializer_range == 0.02
    assert c.vocab_size == 32000 and c.hidden_act == "silu" and not c.attention_bias and not c.mlp_bias
    assert c.rope_parameters["rope_theta"] == 10000.0


def test_build_model_is_seeded_and_untied():
    a = build_model(llama_config("micro"), seed=3)
    b = build_model(llama_config("micro"), seed=3)
    c = build_model(llama_config("micro"), seed=4)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not torch.equal(a.lm_head.weight, c.lm_head.weight)
    assert a.lm_head.weight.data_ptr() != a.model.embed_tokens.weight.data_ptr()
    assert abs(a.model.layers[0].mlp.up_proj.weight.std().item() - 0.02) < 0.004


def test_flops_per_token_follows_the_protocol_formula():
    c = llama_config("60m")
    n = param_counts(c)
    expected = 6 * (n["total"] - n["embedding"]) + 6 * 8 * 8 * 64 * 256
    assert flops_per_token(c, 256) == expected


def test_unknown_flavor_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="unknown model flavor '3b'.*60m"):
        llama_config("3b")


def _loss_and_grads(loss_model, model, input_ids, labels):
    model.zero_grad(set_to_none=True)
    loss_sum, count = loss_model(input_ids, labels)
    loss_sum.backward()
    return loss_sum.detach(), count, {n: p.grad.clone() for n, p in model.named_parameters()}


def test_fused_cross_entropy_matches_the_plain_loss_and_gradients():
    # liger-kernel's Triton kernels: on the GPU, or on CPU through Triton's interpreter (tests/conftest.py)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    model = build_model(llama_config("micro"), dtype=torch.float32, device=device)
    input_ids = torch.randint(0, 128, (3, 40), device=device)
    labels = input_ids.clone()
    labels[0, 25:] = -100  # right padding is ignored
    labels[2, :7] = -100
    plain = _loss_and_grads(CausalLMLoss(model), model, input_ids, labels)
    fused = _loss_and_grads(CausalLMLoss(model, fused_ce=True), model, input_ids, labels)
    # the float64 formula: sum over target tokens of logsumexp(logits) - logit of the target
    with torch.no_grad():
        logits = model.double()(input_ids=input_ids).logits[:, :-1]
        model.float()
    targets = labels[:, 1:]
    mask = targets != -100
    nll = torch.logsumexp(logits, -1) - logits.gather(-1, targets.clamp_min(0)[..., None])[..., 0]
    expected = nll[mask].sum()
    assert plain[1] == fused[1] == mask.sum()
    torch.testing.assert_close(fused[0].double(), expected, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(plain[0].double(), expected, rtol=1e-5, atol=1e-4)
    for name, grad in plain[2].items():
        torch.testing.assert_close(fused[2][name], grad, rtol=1e-4, atol=1e-5, msg=name)


def test_fused_cross_entropy_is_refused_on_cpu_without_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    model = build_model(llama_config("micro"))
    with pytest.raises(ValueError, match="need a CUDA device.*trainer.fused_ce=false"):
        CausalLMLoss(model, fused_ce=True)


@pytest.mark.parametrize("device", ["cpu", *(["cuda"] if torch.cuda.is_available() else [])])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_table_gives_transformers_outputs_and_gradients_bit_for_bit(dtype, device):
    # a bf16 model holds a bf16-rounded inv_freq, which transformers then uses: the table must too
    config = llama_config("micro")
    reference = build_model(config, seed=1, dtype=dtype, device=device)
    tabled = use_rotary_table(build_model(config, seed=1, dtype=dtype, device=device))
    assert isinstance(tabled.model.rotary_emb, RotaryTable)
    assert not isinstance(reference.model.rotary_emb, RotaryTable)
    input_ids = torch.randint(0, config.vocab_size, (3, 40), device=device)
    for position_ids in (None, torch.arange(100, 140, device=device).expand(3, 40)):  # default and shifted
        outputs = []
        for model in (reference, tabled):
            model.zero_grad(set_to_none=True)
            logits = model(input_ids=input_ids, position_ids=position_ids).logits
            logits.float().square().mean().backward()
            outputs.append((logits, {n: p.grad for n, p in model.named_parameters()}))
        assert torch.equal(outputs[0][0], outputs[1][0])
        for name, grad in outputs[0][1].items():
            assert torch.equal(grad, outputs[1][1][name]), name
    # the tables are not state: checkpoints and exported models are transformers' own
    assert reference.state_dict().keys() == tabled.state_dict().keys()
    assert use_rotary_table(tabled).model.rotary_emb is tabled.model.rotary_emb  # applied once


def test_rotary_table_leaves_scaled_rope_types_to_transformers():
    config = llama_config("micro")
    config.rope_parameters = {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}
    model = build_model(config)
    rotary = model.model.rotary_emb
    assert use_rotary_table(model).model.rotary_emb is rotary
