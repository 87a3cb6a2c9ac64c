"""GaLore / Fira / APOLLO / APOLLO-Mini through llmopt.optim.lowrank (the authors' packages)."""

from __future__ import annotations

import copy
import io
import sys

import pytest
import torch

from llmopt.model import build_model, llama_config
from llmopt.optim.lowrank import LOWRANK_METHODS, LowRankAdamW, build_lowrank, lowrank_state_elements
from llmopt.optim.roles import classify_parameters

PLAIN_ROLES = ("embedding", "output", "vector")
# rank and gap below the micro model's matrices ([32, 32], [64, 32], [32, 64]) so the projection is real
SMALL = {"rank": 4, "update_proj_gap": 3}


def _model(seed=0, dtype=torch.float32):
    return build_model(llama_config("micro"), seed=seed, dtype=dtype)


def _batch(i: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 + i)
    return torch.randint(0, 128, (2, 16), generator=g)


def _backward(model, x) -> float:
    loss = model(input_ids=x, labels=x).loss
    loss.backward()
    return loss.item()


def _plain_params(roles):
    return [p for r in PLAIN_ROLES for p in roles.params(r)]


@pytest.mark.parametrize("method", LOWRANK_METHODS)
def test_groups_roles_and_protocol_defaults(method):
    model = _model()
    opt = build_lowrank(method, classify_parameters(model))
    assert isinstance(opt, torch.optim.Optimizer) and isinstance(opt, LowRankAdamW)
    assert [g["role"] for g in opt.param_groups] == ["matrix", *PLAIN_ROLES]
    low = opt.param_groups[0]
    assert low is opt.lowrank.param_groups[0]  # the same dict: schedulers reach the package optimizer
    assert low["lr"] == 0.01 and low["update_proj_gap"] == 200 and low["proj_type"] == "std"
    expected = {
        "galore": {"rank": 128, "scale": 0.25},
        "fira": {"rank": 128, "alpha": 0.25},
        "apollo": {"rank": 128, "scale": 1.0, "scale_type": "channel", "proj": "random"},
        "apollo_mini": {"rank": 1, "scale": 128.0, "scale_type": "tensor", "proj": "random"},
    }[method]
    assert {k: low[k] for k in expected} == expected
    for key in {"scale", "alpha", "scale_type", "proj"} - set(expected):
        assert key not in low
    assert "scale_front" not in low  # APOLLO's is a constructor argument, default False (the package's)
    assert getattr(opt.lowrank, "scale_front", None) is (False if method.startswith("apollo") else None)
    for g in opt.param_groups[1:]:
        assert "rank" not in g and g["lr"] == 0.01 and g["eps"] == 1e-6
    assert opt.adamw is not None
    roles = classify_parameters(model)
    names = [g["param_names"] for g in opt.state_dict()["param_groups"]]
    assert names == [roles.names(r) for r in ("matrix", *PLAIN_ROLES)]
    assert [id(g) for g in opt.param_groups] == [id(g) for g in opt.lowrank.param_groups + opt.adamw.param_groups]


@pytest.mark.parametrize("method", LOWRANK_METHODS)
def test_steps_change_params_and_loss_decreases(method):
    model = _model()
    roles = classify_parameters(model)
    opt = build_lowrank(method, roles, **SMALL)
    before = [p.detach().clone() for p in model.parameters()]
    x = _batch(0)
    losses = []
    for _ in range(20):
        losses.append(_backward(model, x))
        opt.step()
        opt.zero_grad()
    for p0, p in zip(before, model.parameters(), strict=True):
        assert torch.isfinite(p).all()
        assert not torch.equal(p0, p)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.8 * losses[0], losses


@pytest.mark.parametrize("method", LOWRANK_METHODS)
def test_plain_params_get_exactly_torch_adamw_and_matrices_do_not(method):
    hp = {"lr": 3e-3, "betas": (0.8, 0.95), "eps": 1e-7, "weight_decay": 0.1}
    model = _model()
    roles = classify_parameters(model)
    opt = build_lowrank(method, roles, **SMALL, **hp)
    plain, matrices = _plain_params(roles), roles.params("matrix")
    ref_plain = [torch.nn.Parameter(p.detach().clone()) for p in plain]
    ref_matrix = [torch.nn.Parameter(p.detach().clone()) for p in matrices]
    ref_opt = torch.optim.AdamW(ref_plain + ref_matrix, **hp)
    for step in range(5):
        _backward(model, _batch(step))
        for ref, p in zip(ref_plain + ref_matrix, plain + matrices, strict=True):
            ref.grad = p.grad.clone()
        if step > 0:  # from the second step on, feed AdamW the real matrices again
            for ref, p in zip(ref_matrix, matrices, strict=True):
                ref.data.copy_(p.detach())
        start = [p.detach().clone() for p in matrices]
        opt.step()
        ref_opt.step()
        opt.zero_grad()
        for ref, p in zip(ref_plain, plain, strict=True):
            assert torch.equal(ref, p)
        for p0, ref, p in zip(start, ref_matrix, matrices, strict=True):
            assert not torch.allclose(p - p0, ref.detach() - p0, rtol=1e-2, atol=1e-6)


def _train(model, opt, steps):
    for i in steps:
        _backward(model, _batch(i))
        opt.step()
        opt.zero_grad()


ROUNDTRIP_CASES = [(m, {}) for m in LOWRANK_METHODS] + [
    ("apollo", {"proj": "svd"}), ("galore", {"proj_type": "full"}), ("fira", {"proj_type": "reverse_std"})]


@pytest.mark.parametrize(("method", "extra"), ROUNDTRIP_CASES,
                         ids=[m + "".join(f"-{v}" for v in e.values()) for m, e in ROUNDTRIP_CASES])
def test_state_dict_roundtrip_is_exact(method, extra):
    hp = {**SMALL, **extra}  # gap 3: projectors are refreshed before and after the save at step 4
    model_a = _model()
    opt_a = build_lowrank(method, classify_parameters(model_a), **hp)
    _train(model_a, opt_a, range(8))

    model_b = _model()
    opt_b = build_lowrank(method, classify_parameters(model_b), **hp)
    _train(model_b, opt_b, range(4))
    buf = io.BytesIO()
    torch.save({"model": model_b.state_dict(), "optim": opt_b.state_dict()}, buf)
    assert all(not isinstance(st.get("projector", None), dict) for st in opt_b.state.values())
    del model_b, opt_b

    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)  # the state dict holds tensors, ints and strings only
    model_c = _model(seed=123)
    model_c.load_state_dict(ckpt["model"])
    opt_c = build_lowrank(method, classify_parameters(model_c), **hp)
    opt_c.load_state_dict(ckpt["optim"])
    _train(model_c, opt_c, range(4, 8))
    for (name, pa), pc in zip(model_a.named_parameters(), model_c.parameters(), strict=True):
        assert torch.equal(pa, pc), name


def test_load_state_dict_keeps_groups_shared_with_inner_optimizers():
    model = _model()
    opt = build_lowrank("galore", classify_parameters(model), **SMALL)
    _train(model, opt, range(2))
    opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    for group in opt.param_groups:
        group["lr"] = 0.0  # what an LR scheduler does
    before = [p.detach().clone() for p in model.parameters()]
    _train(model, opt, range(2, 3))
    assert all(torch.equal(p0, p) for p0, p in zip(before, model.parameters(), strict=True))
    with pytest.raises(ValueError, match="'galore' optimizer, not 'fira'"):
        build_lowrank("fira", classify_parameters(model), **SMALL).load_state_dict(opt.state_dict())


@pytest.mark.parametrize("method", ["apollo", "apollo_mini"])
def test_apollo_random_projection_does_not_use_global_rng(method):
    model = _model()
    opt = build_lowrank(method, classify_parameters(model), rank=4, update_proj_gap=1)
    _backward(model, _batch(0))
    rng = torch.random.get_rng_state()
    opt.step()
    assert torch.equal(rng, torch.random.get_rng_state())
    seeds = {st["projector"].seed for st in opt.state.values() if "projector" in st}
    assert len(seeds) == len(opt.param_groups[0]["params"])  # one independent stream per matrix


@pytest.mark.parametrize("method", LOWRANK_METHODS)
def test_bf16_params_step(method):
    model = _model(dtype=torch.bfloat16)
    opt = build_lowrank(method, classify_parameters(model), **SMALL)
    before = [p.detach().clone() for p in model.parameters()]
    _train(model, opt, range(4))
    for p0, p in zip(before, model.parameters(), strict=True):
        assert p.dtype == torch.bfloat16 and torch.isfinite(p).all() and not torch.equal(p0, p)


@pytest.mark.parametrize("method", LOWRANK_METHODS)
@pytest.mark.parametrize("rank", [4, 40])  # 40 > 32: SVD projectors truncate, random ones do not
def test_state_elements_match_real_state(method, rank):
    model = _model()
    roles = classify_parameters(model)
    opt = build_lowrank(method, roles, rank=rank, update_proj_gap=3)
    _train(model, opt, range(1))
    counted = 0
    for st in opt.state.values():
        for key, value in st.items():
            if torch.is_tensor(value) and key != "step":
                counted += value.numel()
        if "projector" in st:
            counted += st["projector"].ortho_matrix.numel()
    shapes = [p.shape for p in roles.params("matrix")]
    n_other = sum(p.numel() for p in _plain_params(roles))
    assert lowrank_state_elements(method, shapes, n_other, rank) == counted


def test_state_elements_known_values():
    # GaLore, one [512, 1376] matrix, r=128: moments 2*128*1376, projector 128*512
    assert lowrank_state_elements("galore", [(512, 1376)], 0, 128) == 2 * 128 * 1376 + 128 * 512
    # APOLLO-Mini default rank 1 and its limiter scalar; 10 other params -> 20 Adam moments
    assert lowrank_state_elements("apollo_mini", [(1376, 512)], 10) == 2 * 1376 + 512 + 1 + 20


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"method": "lora"}, r"unknown low-rank method 'lora'.*galore.*fira.*apollo.*apollo_mini"),
    ({"method": "galore", "alpha": 0.25}, r"alpha=0.25 does not apply to 'galore'"),
    ({"method": "galore", "scale_type": "tensor"}, r"scale_type='tensor' does not apply to 'galore'"),
    ({"method": "galore", "proj": "svd"}, r"proj='svd' does not apply to 'galore'"),
    ({"method": "fira", "scale": 0.25}, r"scale=0.25 does not apply to 'fira'"),
    ({"method": "apollo", "alpha": 0.25}, r"alpha=0.25 does not apply to 'apollo'"),
    ({"method": "galore", "rank": 0}, r"rank must be >= 1"),
    ({"method": "apollo_mini", "rank": -1}, r"rank must be >= 1"),
    ({"method": "fira", "lr": -0.01}, r"lr must be >= 0"),
    ({"method": "galore", "update_proj_gap": 0}, r"update_proj_gap must be an int >= 1"),
    ({"method": "apollo", "scale_type": "row"}, r"scale_type must be"),
    ({"method": "apollo", "proj_type": "full"}, r"proj_type 'full' is not valid for 'apollo'"),
    ({"method": "galore", "scale_front": True}, r"scale_front=True does not apply to 'galore'"),
    ({"method": "apollo_mini", "scale_front": "yes"}, r"scale_front must be true or false"),
])
def test_bad_inputs(kwargs, match):
    roles = classify_parameters(_model())
    method = kwargs.pop("method")
    with pytest.raises(ValueError, match=match):
        build_lowrank(method, roles, **kwargs)


@pytest.mark.parametrize(("method", "module"), [("galore", "galore_torch"), ("fira", "fira"),
                                                ("apollo_mini", "apollo_torch")])
def test_missing_package_says_how_to_install(method, module, monkeypatch):
    roles = classify_parameters(_model())
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` raise ImportError
    with pytest.raises(ImportError, match=r"pip install 'llmopt\[baselines\]'"):
        build_lowrank(method, roles)


def test_non_int_rank_is_a_type_error():
    with pytest.raises(TypeError, match="rank must be an int"):
        build_lowrank("galore", classify_parameters(_model()), rank=1.5)


def test_state_elements_bad_inputs():
    with pytest.raises(ValueError, match="unknown low-rank method"):
        lowrank_state_elements("adam", [(4, 4)], 0, 1)
    with pytest.raises(ValueError, match="rank must be"):
        lowrank_state_elements("galore", [(4, 4)], 0, 0)


@pytest.mark.parametrize("method, key", [("galore", "scale"), ("fira", "alpha")])
def test_matrices_step_as_the_package_in_the_reference_scripts(method, key):
    """The reference scripts' construction: ONE package optimizer over every parameter, the regular ones first,
    the attention/MLP matrices in a group with the projection keys. Fed the same gradients, llmopt's optimizer
    gives the matrices exactly the package's values, across a projector refresh (gap 3, 5 steps)."""
    from llmopt.optim.lowrank import _import_optimizer_class

    model = _model()
    ref_model = copy.deepcopy(model)
    opt = build_lowrank(method, classify_parameters(model), lr=0.01, rank=4, update_proj_gap=3, **{key: 0.25})
    roles = classify_parameters(ref_model)
    ref = _import_optimizer_class(method)(
        [{"params": _plain_params(roles)},
         {"params": roles.params("matrix"), "rank": 4, "update_proj_gap": 3, key: 0.25, "proj_type": "std"}],
        lr=0.01, weight_decay=0.0, no_deprecation_warning=True)  # betas, eps: the package defaults, as the scripts
    names = [n for n, p in model.named_parameters()]
    matrices = {n for n, _ in classify_parameters(model).by_role["matrix"]}
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    for step in range(5):
        gen = torch.Generator().manual_seed(step)
        for p, q in zip(model.parameters(), ref_model.parameters()):
            p.grad = torch.randn(p.shape, generator=gen) * 0.1
            q.grad = p.grad.clone()
        opt.step()
        ref.step()
        for (n, p), q in zip(model.named_parameters(), ref_model.parameters()):
            if n in matrices:
                assert torch.equal(p, q), f"step {step}: {n} differs from the package's"
    moved = [n for n in names if n in matrices and not torch.equal(dict(model.named_parameters())[n], start[n])]
    assert len(moved) == len(matrices)


def _apollo_mini_update_norms(scale_front: bool, grad_sizes, eps: float) -> list[torch.Tensor]:
    """Per-matrix norms of each step's update, fed the same seeded gradients of the given sizes (float64)."""
    model = _model(dtype=torch.float64)
    opt = build_lowrank("apollo_mini", classify_parameters(model), scale_front=scale_front, eps=eps)
    assert opt.lowrank.scale_front is scale_front  # reaches apollo_torch.APOLLOAdamW
    matrices = opt.param_groups[0]["params"]
    norms = []
    for step, size in enumerate(grad_sizes):
        gen = torch.Generator().manual_seed(step)
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=gen, dtype=torch.float64) * size
        before = [p.detach().clone() for p in matrices]
        opt.step()
        norms.append(torch.stack([(p.detach() - b).norm() for p, b in zip(matrices, before, strict=True)]))
    return norms


def test_apollo_scale_front_moves_sqrt_scale_before_the_norm_growth_limiter():
    """scale_front=True (the APOLLO-Mini 60M/130M scripts' --scale_front) scales by sqrt(scale) before the limiter.
    The limiter's ratio of successive norms ignores a constant factor, so ordinary gradients step the same;
    where the limiter's +1e-8 matters (scaled-gradient norms near 1e-8: tiny gradients, eps 1 so that Adam's
    normalization keeps them tiny), the 100x growth at step 2 is limited far more with the factor in front."""
    plain, front = (_apollo_mini_update_norms(f, [0.1, 1.0], eps=1e-6) for f in (False, True))
    for a, b in zip(plain, front, strict=True):
        assert torch.allclose(a, b, rtol=1e-9)
    plain, front = (_apollo_mini_update_norms(f, [1e-10, 1e-6], eps=1.0) for f in (False, True))
    assert torch.allclose(plain[0], front[0], rtol=1e-9)  # the first step has no limiter yet
    assert (front[1] < 0.2 * plain[1]).all(), front[1] / plain[1]
