import pytest
import torch

from llmopt.model import FLAVORS, build_model, flops_per_token, llama_config, param_counts
from llmopt.model.attention import causal_rows, use_attention
from llmopt.model.loss import CausalLMLoss
from llmopt.model.rotary import RotaryTable, use_rotary_table

# docs/protocol.md section 1: total and attention+MLP parameters of the config files
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


@pytest.mark.parametrize("padding_idx, frozen_row", [(0, 0), (-1, 127), (1, 1)])
def test_padding_row_is_zero_and_never_trains(padding_idx, frozen_row):
    """transformers zeroes the embedding's padding row and gives it no gradient: t5's pad (0) by default, the last
    row (vocab - 1) with GaLore's and APOLLO's pad_token_id -1, t5's EOS (1) with the SCALE, SGD-LL and
    EMA-Nesterov configs' pad_token_id 1 (`model.padding_idx=1`), even where that token is in the batch."""
    model = build_model(llama_config("micro", padding_idx=padding_idx), seed=0)
    weight = model.model.embed_tokens.weight
    special = (0, 1, 127)  # t5's pad, t5's EOS, the last row
    assert [torch.count_nonzero(weight[r]) == 0 for r in special] == [r == frozen_row for r in special]
    tokens = torch.tensor([[5, 127, 0, 9, 1, 127, 3, 0, 1, 2]])
    model(input_ids=tokens, labels=tokens).loss.backward()
    # the other special rows are ordinary, trained ones
    assert [torch.count_nonzero(weight.grad[r]) == 0 for r in special] == [r == frozen_row for r in special]


def test_eos_row_reaches_the_loss_only_when_packed():
    """model.padding_idx=1 (t5's EOS, the SCALE/SGD-LL/EMA-Nesterov configs') trains as 0 does in truncate_pad mode,
    where only pads (label -100) follow EOS; packed, tokens after EOS see it, so 1 freezes a row in use."""
    def grads(padding_idx, tokens, labels):
        # the same seed: the same weights but for rows 0 and 1 (the padding row is zeroed)
        model = build_model(llama_config("micro", padding_idx=padding_idx), seed=0)
        loss_sum, count = CausalLMLoss(model, head="plain")(tokens, labels)
        (loss_sum / count).backward()
        return {n: p.grad for n, p in model.named_parameters()}

    truncate_pad = torch.tensor([[5, 9, 3, 1, 0, 0]])   # a document, its EOS, padding
    labels = torch.where(truncate_pad == 0, -100, truncate_pad)
    pad_frozen, eos_frozen = grads(0, truncate_pad, labels), grads(1, truncate_pad, labels)
    assert torch.count_nonzero(pad_frozen["model.embed_tokens.weight"][1]) == 0   # EOS: no loss after it
    for name, grad in pad_frozen.items():   # rows 0 and 1 differ, yet every gradient is the same
        assert torch.equal(grad, eos_frozen[name]), name
    packed = torch.tensor([[5, 9, 1, 7, 3, 1]])         # EOS between two documents
    assert torch.count_nonzero(grads(0, packed, packed)["model.embed_tokens.weight"][1]) > 0


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


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # Triton kernels: the GPU, or Triton's interpreter on CPU


@pytest.mark.parametrize("head", ["one_pass", "chunked"])
def test_loss_heads_match_the_plain_loss_and_gradients(head):
    """llmopt's one-pass kernel and liger-kernel's chunked head against the plain head and the float64 formula."""
    torch.manual_seed(0)
    model = build_model(llama_config("micro"), dtype=torch.float32, device=DEVICE)
    input_ids = torch.randint(0, 128, (3, 40), device=DEVICE)
    labels = input_ids.clone()
    labels[0, 25:] = -100  # right padding is ignored
    labels[2, :7] = -100
    plain = _loss_and_grads(CausalLMLoss(model, head="plain"), model, input_ids, labels)
    other = _loss_and_grads(CausalLMLoss(model, head=head), model, input_ids, labels)
    # the float64 formula: sum over target tokens of logsumexp(logits) - logit of the target
    with torch.no_grad():
        logits = model.double()(input_ids=input_ids).logits[:, :-1]
        model.float()
    targets = labels[:, 1:]
    mask = targets != -100
    nll = torch.logsumexp(logits, -1) - logits.gather(-1, targets.clamp_min(0)[..., None])[..., 0]
    expected = nll[mask].sum()
    assert plain[1] == other[1] == mask.sum()
    torch.testing.assert_close(other[0].double(), expected, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(plain[0].double(), expected, rtol=1e-5, atol=1e-4)
    for name, grad in plain[2].items():
        torch.testing.assert_close(other[2][name], grad, rtol=1e-4, atol=1e-5, msg=name)
    with torch.no_grad():  # evaluation: the loss alone (no gradient written)
        torch.testing.assert_close(CausalLMLoss(model, head=head)(input_ids, labels)[0], other[0])


def _float64_cross_entropy(hidden, weight, targets, scale):
    h, w = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    loss = torch.nn.functional.cross_entropy(h @ w.t(), targets, ignore_index=-100, reduction="sum")
    return (loss.detach(), *torch.autograd.grad(loss * scale, (h, w)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", ["one_block", "loop"])
def test_linear_cross_entropy_matches_the_float64_formula(dtype, rows, monkeypatch):
    """The kernel's loss and gradients (with the loss scaled, as the trainer scales it) against float64; in bf16
    no further from it than the plain bf16 head (lm_head, then cross-entropy on the upcast logits)."""
    from llmopt.model import cross_entropy

    if rows == "loop":  # rows longer than one block: online max and sum over 128-wide blocks, then a second pass
        monkeypatch.setattr(cross_entropy, "ONE_BLOCK_MAX", 64)
        monkeypatch.setattr(cross_entropy, "LOOP_BLOCK", 128)
    torch.manual_seed(0)
    hidden = torch.randn(37, 24, device=DEVICE).to(dtype).requires_grad_()
    weight = (torch.randn(1000, 24, device=DEVICE) * 0.3).to(dtype).requires_grad_()
    targets = torch.randint(0, 1000, (37,), device=DEVICE)
    targets[[3, 20, 21]] = -100
    scale = torch.tensor(0.37, device=DEVICE)
    expected = _float64_cross_entropy(hidden, weight, targets, 0.37)
    loss = cross_entropy.linear_cross_entropy(hidden, weight, targets)
    got = (loss.detach(), *torch.autograd.grad(loss * scale, (hidden, weight)))
    assert loss.dtype == torch.float32
    if dtype == torch.float32:
        for a, b in zip(got, expected):
            torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5)
    else:
        plain = torch.nn.functional.cross_entropy((hidden @ weight.t()).float(), targets, reduction="sum")
        baseline = (plain.detach(), *torch.autograd.grad(plain * scale, (hidden, weight)))
        for a, b, ref in zip(got, baseline, expected):
            error, plain_error = (a.double() - ref).norm(), (b.double() - ref).norm()
            assert error <= 1.5 * plain_error + 1e-6 * ref.norm(), (error, plain_error)
    with torch.no_grad():
        assert torch.equal(cross_entropy.linear_cross_entropy(hidden, weight, targets), loss.detach())


def test_loss_heads_refused_where_they_cannot_run(monkeypatch):
    model = build_model(llama_config("micro"))
    assert CausalLMLoss(model).head == "plain"  # auto: the kernel on CUDA only, even under the interpreter
    with pytest.raises(ValueError, match="unknown loss head 'fused'.*one_pass"):
        CausalLMLoss(model, head="fused")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr("llmopt.model.cross_entropy.INTERPRET", False)
    for head in ("one_pass", "chunked"):
        with pytest.raises(ValueError, match=f"loss_head={head} runs Triton kernels.*CUDA.*loss_head=plain"):
            CausalLMLoss(model, head=head)
    from llmopt.model.cross_entropy import linear_cross_entropy
    with pytest.raises(ValueError, match="cast both"):
        linear_cross_entropy(torch.zeros(2, 4), torch.zeros(3, 4, dtype=torch.bfloat16), torch.zeros(2).long())
    with pytest.raises(ValueError, match="fp32, bf16 or fp16 tensors, not torch.float64"):
        linear_cross_entropy(torch.zeros(2, 4).double(), torch.zeros(3, 4).double(), torch.zeros(2).long())


def test_loss_dtype_logits_is_cross_entropy_on_the_bf16_logits():
    """trainer.loss_dtype=logits: each token's loss from F.cross_entropy on the bf16 logits, as the papers' modeling
    file computes it (its mean over non-ignored tokens is loss_sum / count), summed in fp32; the float32 default
    differs. Under autocast torch takes the cross-entropy in fp32 either way."""
    import torch.nn.functional as F
    config = llama_config("tiny")
    model = build_model(config, seed=1, dtype=torch.bfloat16)
    input_ids = torch.randint(2, config.vocab_size, (3, 40), generator=torch.Generator().manual_seed(0))
    labels = input_ids.clone()
    labels[0, 30:] = -100
    loss_sum, count = CausalLMLoss(model, head="plain", loss_dtype="logits")(input_ids, labels)
    logits = model(input_ids=input_ids).logits[:, :-1].flatten(0, 1)
    targets = labels[:, 1:].flatten()
    assert logits.dtype == torch.bfloat16 and count == (targets != -100).sum()
    per_token = F.cross_entropy(logits, targets, ignore_index=-100, reduction="none")
    assert per_token.dtype == torch.bfloat16
    assert loss_sum.dtype == torch.float32 and torch.equal(loss_sum, per_token.float().sum())
    assert (loss_sum / count).bfloat16() == F.cross_entropy(logits, targets, ignore_index=-100)  # the papers' mean
    fp32_sum, _ = CausalLMLoss(model, head="plain")(input_ids, labels)
    assert torch.equal(fp32_sum, F.cross_entropy(logits.float(), targets, reduction="sum"))
    assert abs(loss_sum - fp32_sum) > 1e-5 * fp32_sum  # well beyond an fp32 sum's rounding
    amp_model = build_model(config, seed=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        sums = [CausalLMLoss(amp_model, head="plain", loss_dtype=dtype)(input_ids, labels)[0]
                for dtype in ("logits", "float32")]
    # equal up to the fp32 sum's order (torch 2.14 sums the per-token losses in another order than nll_loss):
    # 1e-6 is a tenth of the bf16 form's difference asserted above
    torch.testing.assert_close(sums[0], sums[1], rtol=1e-6, atol=0)


def test_loss_dtype_refused_unknown_or_with_an_fp32_softmax_head():
    model = build_model(llama_config("micro"))
    with pytest.raises(ValueError, match=r"unknown trainer.loss_dtype 'bf16'.*\['float32', 'logits'\]"):
        CausalLMLoss(model, loss_dtype="bf16")
    for head in ("one_pass", "chunked"):
        with pytest.raises(ValueError, match=f"loss_dtype=logits.*loss_head={head} takes the softmax in fp32"):
            CausalLMLoss(model, head=head, loss_dtype="logits")
    assert CausalLMLoss(model, head="auto", loss_dtype="logits").head == "plain"


@pytest.mark.parametrize("device", ["cpu", *(["cuda"] if torch.cuda.is_available() else [])])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_table_gives_transformers_outputs_and_gradients_bit_for_bit(dtype, device):
    # build_model keeps RoPE's frequencies in fp32 in a bf16 model; transformers' module uses them, so does the table
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


def _fp32_rope_tables(head_dim: int, positions: int, rounded_frequencies: bool = False):
    """cos/sin as the papers' modeling file caches them: 1 / 10000^(2i/d) and the angles in fp32 (with
    `rounded_frequencies`, from bf16-rounded frequencies instead, as a model cast with .to(bfloat16) has them)."""
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    if rounded_frequencies:
        inv_freq = inv_freq.bfloat16().float()
    angles = torch.arange(positions, dtype=torch.float32)[:, None] * inv_freq
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos(), angles.sin()


@pytest.mark.parametrize("rotary_table", [True, False])
def test_rope_in_bf16_is_the_fp32_table_rounded_to_bf16(rotary_table):
    """In a bf16 model (trainer.precision=bf16_pure) both RoPE paths hand attention the fp32 cos/sin rounded to bf16,
    as the papers' code does, not the cos/sin of bf16-rounded frequencies (transformers' module after .to(bf16))."""
    config = llama_config("tiny", max_seq_len=256)
    model = build_model(config, seed=0, dtype=torch.bfloat16)
    if rotary_table:
        use_rotary_table(model)
    assert isinstance(model.model.rotary_emb, RotaryTable) == rotary_table
    x = torch.zeros(1, 256, config.hidden_size, dtype=torch.bfloat16)
    cos, sin = model.model.rotary_emb(x, torch.arange(256)[None])
    assert cos.dtype == sin.dtype == torch.bfloat16
    head_dim = config.hidden_size // config.num_attention_heads
    fp32_cos, fp32_sin = _fp32_rope_tables(head_dim, 256)
    assert torch.equal(cos[0], fp32_cos.bfloat16()) and torch.equal(sin[0], fp32_sin.bfloat16())
    rounded_cos, rounded_sin = _fp32_rope_tables(head_dim, 256, rounded_frequencies=True)
    assert not torch.equal(cos[0], rounded_cos.bfloat16()) and not torch.equal(sin[0], rounded_sin.bfloat16())


def test_rotary_table_refuses_rounded_frequencies():
    model = build_model(llama_config("micro")).to(torch.bfloat16)  # .to() rounds inv_freq: not the papers' RoPE
    with pytest.raises(ValueError, match="inv_freq is torch.bfloat16.*cast_model"):
        use_rotary_table(model)


def test_rotary_table_leaves_scaled_rope_types_to_transformers():
    config = llama_config("micro")
    config.rope_parameters = {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}
    model = build_model(config)
    rotary = model.model.rotary_emb
    assert use_rotary_table(model).model.rotary_emb is rotary


def _compiled_sdpa_calls(model, input_ids):
    """The loss of CausalLMLoss run through torch.compile (dynamo, as in training), and (mask tensor given?,
    is_causal) for each SDPA call in the traced graph."""
    calls = []

    def backend(graph_module, example_inputs):
        for node in graph_module.graph.nodes:
            if node.target is torch.nn.functional.scaled_dot_product_attention:
                mask = node.kwargs.get("attn_mask", node.args[3] if len(node.args) > 3 else None)
                calls.append((mask is not None, node.kwargs.get("is_causal")))
        return graph_module

    torch._dynamo.reset()
    loss_sum, _ = torch.compile(CausalLMLoss(model, head="plain"), backend=backend)(input_ids, input_ids)
    return loss_sum, calls


def test_sdpa_attention_stays_causal_without_a_mask_tensor_under_compile():
    """transformers materializes the causal mask while torch.compile traces it; trainer.attention=sdpa (the
    default) keeps SDPA on is_causal there, and the loss is the same."""
    config = llama_config("tiny", vocab_size=300)
    input_ids = torch.randint(0, 300, (2, 24))
    losses = {}
    for attention in ("transformers", "sdpa"):
        model = use_attention(build_model(config, seed=1), attention)
        losses[attention], calls = _compiled_sdpa_calls(model, input_ids)
        if attention == "sdpa":
            assert calls == [(False, True)] * config.num_hidden_layers
            assert model.config._attn_implementation == "llmopt_sdpa"
        else:
            assert causal_rows(model, input_ids) is None and model.config._attn_implementation == "sdpa"
    torch.testing.assert_close(losses["sdpa"], losses["transformers"], rtol=1e-5, atol=0)


def test_sdpa_attention_gives_transformers_outputs_and_gradients():
    """The trainer's causal rows, and a padded batch (transformers' own mask path), as transformers computes them."""
    config = llama_config("tiny", vocab_size=300)
    input_ids = torch.randint(0, 300, (3, 20))
    padding = torch.ones_like(input_ids)
    padding[0, 15:] = 0
    results = {}
    for attention in ("transformers", "sdpa"):
        model = use_attention(build_model(config, seed=1), attention)
        loss_sum, _ = CausalLMLoss(model, head="plain")(input_ids, input_ids)
        loss_sum.backward()
        padded = model(input_ids=input_ids, attention_mask=padding).logits
        results[attention] = (loss_sum, {n: p.grad for n, p in model.named_parameters()}, padded)
    (loss, grads, padded), (ref_loss, ref_grads, ref_padded) = results["sdpa"], results["transformers"]
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=0)
    for name, grad in ref_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)
    torch.testing.assert_close(padded, ref_padded, rtol=1e-5, atol=1e-6)
    # the padding mask was applied, not dropped: it changes the padded positions of the first row only
    with torch.no_grad():
        unpadded = use_attention(build_model(config, seed=1), "sdpa")(input_ids=input_ids).logits
    assert not torch.allclose(padded[0, 15:], unpadded[0, 15:], atol=1e-3)
    torch.testing.assert_close(padded[1:], unpadded[1:], rtol=1e-5, atol=1e-6)


def test_unknown_attention_is_refused_with_the_choices():
    with pytest.raises(ValueError, match=r"unknown attention 'flash' \(trainer.attention\).*'sdpa', 'transformers'"):
        use_attention(build_model(llama_config("micro")), "flash")


class _AtenOps(torch.utils._python_dispatch.TorchDispatchMode):
    """The names of the aten ops run inside the block (eager)."""

    def __init__(self):
        super().__init__()
        self.names = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def _compiled_aten_ops(loss_model, input_ids) -> set:
    """The aten ops of the forward and backward graphs torch.compile traces for `loss_model` (AOTAutograd, as
    inductor receives them)."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd
    names = set()

    def record(graph_module, example_inputs):
        names.update(str(node.target) for node in graph_module.graph.nodes if node.op == "call_function")
        return make_boxed_func(graph_module.forward)

    torch._dynamo.reset()
    loss_sum, _ = torch.compile(loss_model, backend=aot_autograd(fw_compiler=record, bw_compiler=record))(
        input_ids, input_ids)
    loss_sum.backward()
    return names


def test_sdpa_backend_math_replaces_the_fused_kernel_eager_and_compiled():
    """On the CPU torch's own choice (auto) is its fused flash kernel; trainer.sdpa_backend=math runs the math
    kernel instead, eager and in the graphs torch.compile traces, for the same loss up to rounding."""
    from llmopt.model.attention import sdpa_backend
    config = llama_config("tiny", vocab_size=300)
    input_ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    fused = "_scaled_dot_product_flash_attention_for_cpu"
    losses = {}
    for backend in ("auto", "math"):
        loss_model = CausalLMLoss(use_attention(build_model(config, seed=1), "sdpa"), head="plain")
        with sdpa_backend(backend):
            with _AtenOps() as ops:
                losses[backend], _ = loss_model(input_ids, input_ids)
                losses[backend].backward()
            compiled = _compiled_aten_ops(loss_model, input_ids)
        assert (fused in ops.names) == (backend == "auto"), backend
        assert any(fused in name for name in compiled) == (backend == "auto"), backend
    torch.testing.assert_close(losses["math"], losses["auto"], rtol=1e-6, atol=0)


def test_sdpa_backend_math_bf16_reduces_in_bf16_and_puts_torchs_choice_back():
    """math: torch's math kernel, which computes bf16 inputs in fp32 (torch >= 2.5); math_bf16: the same kernel with
    bf16 intermediates, as torch 2.4's math kernel (the papers' environment) computed them."""
    from llmopt.model.attention import sdpa_backend
    g = torch.Generator().manual_seed(0)
    q, k, v = [(torch.randn(2, 4, 64, 16, generator=g) * 2).bfloat16() for _ in range(3)]
    attend = lambda *t: torch.nn.functional.scaled_dot_product_attention(*t, is_causal=True)  # noqa: E731
    scores = (q @ k.transpose(-1, -2)) * 16 ** -0.5 + torch.full((64, 64), float("-inf")).triu(1).bfloat16()
    in_bf16 = scores.softmax(-1) @ v  # every intermediate rounded to bf16
    with sdpa_backend("math"):
        math = attend(q, k, v)
    with sdpa_backend("math_bf16"):
        assert not torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.math_sdp_enabled()
        math_bf16 = attend(q, k, v)
    assert torch.equal(math, attend(q.float(), k.float(), v.float()).bfloat16())
    assert torch.equal(math_bf16, in_bf16) and not torch.equal(math_bf16, math)
    assert torch.backends.cuda.flash_sdp_enabled() and not torch.backends.cuda.fp16_bf16_reduction_math_sdp_allowed()


def test_sdpa_backend_refused_where_it_cannot_run():
    from llmopt.model.attention import check_sdpa_backend, sdpa_backend
    with pytest.raises(ValueError, match=r"unknown trainer.sdpa_backend 'fa3'"):
        with sdpa_backend("fa3"):
            pass
    with pytest.raises(ValueError, match="contradicts trainer.deterministic=true"):
        check_sdpa_backend("cudnn", deterministic=True)
    for backend in ("efficient", "cudnn"):
        with pytest.raises(ValueError, match=f"sdpa_backend={backend} runs on CUDA only"):
            check_sdpa_backend(backend, deterministic=False, device_type="cpu")
    for backend in ("flash", "cudnn"):
        with pytest.raises(ValueError, match=f"sdpa_backend={backend} takes bf16/fp16 inputs only"):
            check_sdpa_backend(backend, deterministic=False, device_type="cuda", precision="fp32")
    for backend in ("auto", "math", "math_bf16", "flash", "efficient"):  # deterministic kernels, or torch's choice
        check_sdpa_backend(backend, deterministic=True, device_type="cuda", precision="bf16_pure")
    check_sdpa_backend("flash", deterministic=False, device_type="cpu", precision="fp32")  # the CPU's flash kernel
