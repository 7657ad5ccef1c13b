"""The fused LoRA path (methods/lora_kernels.py) against the general path it replaces.

The fused function computes the same maths in a different rounding order (the scaling multiplies the
r-wide product instead of the output; ``addmm_`` rounds ``out + s * A x B^T`` once), so agreement is
asserted at float32 rounding level (relative 1e-6, DoRA 1e-5; on these sizes LoRA is in fact bit-for-bit), and at
two bfloat16 ulps (2**-6 relative to the largest value) under bf16 autocast, where every rounding of
the bf16 intermediates counts. A different dropout mask would differ by O(1): the mask is tested too.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import peftkit
from peftkit.methods import lora_kernels

FP32_REL = 1e-6
BF16_REL = 2.0**-6


@pytest.fixture
def general(monkeypatch):
    """Run the body with the fused path switched off (the general path computes everything)."""

    def use_general():
        monkeypatch.setattr(lora_kernels, "fusable", lambda *a: False)

    return use_general


def _layer(kind: str, bias: bool) -> nn.Module:
    torch.manual_seed(0)
    if kind == "Linear":
        return nn.Linear(40, 24, bias=bias)
    layer = Conv1D(24, 40)  # GPT-2 layout, always with a bias
    nn.init.normal_(layer.weight, std=0.2)
    nn.init.normal_(layer.bias, std=0.2)
    return layer


def _adapted(kind: str, bias: bool, dropout: float, dora: bool = False) -> nn.Module:
    model = nn.Sequential(_layer(kind, bias))
    config = peftkit.LoraConfig(
        r=3,
        lora_alpha=5,
        target_modules=["0"],
        lora_dropout=dropout,
        init_lora_weights=False,
        use_dora=dora,
        bias="all" if bias or kind == "Conv1D" else "none",  # train the base bias too: its gradient is tested
    )
    peftkit.inject(model, config)
    if dora:  # move the magnitude away from ||W + sBA|| so that DoRA really rescales each row
        with torch.no_grad():
            model[0].adapters["default"].lora_magnitude_vector.mul_(torch.linspace(0.5, 1.5, 24))
    return model.train()


def _step(model: nn.Module, autocast: bool, seed: int = 2) -> dict[str, torch.Tensor]:
    """Output, input gradient and parameter gradients of one forward/backward with a fixed seed."""
    x = torch.randn(3, 7, 40, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
    torch.manual_seed(seed)  # the dropout mask
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = model(x)
    weights = torch.linspace(-1, 1, y.numel()).view_as(y)
    (y.float() * weights).sum().backward()
    out = {"y": y.detach(), "x.grad": x.grad}
    out.update({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    out["grad_fn"] = type(y.grad_fn).__name__
    return out


def _assert_agree(fast: dict, slow: dict, rel: float) -> None:
    assert fast.keys() == slow.keys()
    for key in fast:
        if key == "grad_fn":
            continue
        a, b = fast[key], slow[key]
        assert a.dtype == b.dtype and a.shape == b.shape, key
        scale = b.float().abs().max().item()
        diff = (a.float() - b.float()).abs().max().item()
        assert diff <= rel * scale, f"{key}: max abs diff {diff:.3e} > {rel:.1e} x {scale:.3e}"


@pytest.mark.parametrize("kind", ["Linear", "Conv1D"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_fused_matches_general(kind, bias, dropout, autocast, general):
    if kind == "Conv1D" and not bias:
        pytest.skip("GPT-2's Conv1D always has a bias")
    model = _adapted(kind, bias, dropout)
    twin = copy.deepcopy(model)
    before = dict(lora_kernels.calls)
    fast = _step(model, autocast)
    assert fast["grad_fn"] == "LoraLinearFunctionBackward"
    assert lora_kernels.calls["fused"] == before["fused"] + 1
    general()
    slow = _step(twin, autocast)
    assert slow["grad_fn"] != "LoraLinearFunctionBackward"
    assert "0.adapters.default.lora_A.weight" in fast and "0.base_layer.bias" in fast or not bias
    _assert_agree(fast, slow, BF16_REL if autocast else FP32_REL)


@pytest.mark.parametrize("kind", ["Linear", "Conv1D"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_fused_dora_matches_general(kind, bias, general):
    # DoRA's general path computes base + (scale - 1) * (base - b) + scale * s * BAx; the fused one
    # b + scale * (Wx + s BAx): the same value rounded differently, hence the float32 tolerance.
    if kind == "Conv1D" and not bias:
        pytest.skip("GPT-2's Conv1D always has a bias")
    model = _adapted(kind, bias, 0.0, dora=True)
    twin = copy.deepcopy(model)
    fast = _step(model, False)
    assert fast["grad_fn"] == "DoraLinearFunctionBackward"
    general()
    slow = _step(twin, False)
    assert "0.adapters.default.lora_magnitude_vector" in fast
    _assert_agree(fast, slow, 1e-5)


def test_same_seed_same_dropout_mask(general):
    # At p = 0.5 the output depends on the mask at O(1): agreement to rounding means the same mask,
    # and another seed on the same path shows the check can fail.
    model = _adapted("Linear", False, 0.5)
    twin = copy.deepcopy(model)
    fast = _step(model, False)
    other = _step(copy.deepcopy(twin), False, seed=3)
    general()
    slow = _step(twin, False)
    _assert_agree(fast, slow, FP32_REL)
    assert (other["y"] - slow["y"]).abs().max() > 1e-2


def test_gradcheck_float64():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 5, dtype=torch.float64)
    bias = torch.randn(4, dtype=torch.float64, requires_grad=True)
    a = torch.randn(2, 5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, 2, dtype=torch.float64, requires_grad=True)
    fn = lambda x, bias, a, b: lora_kernels.LoraLinearFunction.apply(x, w.t(), bias, a, b, 0.7, 0.0)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, bias, a, b))


def _tiny_bert() -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=24,
        max_position_embeddings=16,
        num_labels=2,
    )
    return BertForSequenceClassification(config)


def test_training_a_model_takes_the_fused_path_and_matches(general):
    """Whole-model check: three AdamW steps of a tiny BERT with LoRA on all linear layers and dropout
    give the same losses and adapter weights either way, and every adapted layer ran fused."""
    batch = {
        "input_ids": torch.randint(0, 50, (4, 9), generator=torch.Generator().manual_seed(0)),
        "labels": torch.tensor([0, 1, 1, 0]),
    }

    def train(model):
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        torch.manual_seed(5)
        losses = []
        for _ in range(3):
            loss = model(**batch).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        return losses, peftkit.adapter_state_dict(model)

    model = peftkit.inject(
        _tiny_bert(), peftkit.LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.1)
    )
    layers = sum(1 for m in model.modules() if isinstance(m, peftkit.core.layer.AdapterLayer))
    twin = copy.deepcopy(model)
    before = dict(lora_kernels.calls)
    fast_losses, fast_state = train(model.train())
    assert lora_kernels.calls["fused"] - before["fused"] == 3 * layers
    assert lora_kernels.calls["general"] == before["general"]
    general()
    slow_losses, slow_state = train(twin.train())
    assert fast_losses == pytest.approx(slow_losses, rel=1e-5)
    for key in slow_state:
        torch.testing.assert_close(fast_state[key], slow_state[key], rtol=1e-4, atol=1e-6)


def test_inference_runs_fused_without_a_graph():
    model = _adapted("Linear", True, 0.3).eval()
    x = torch.randn(2, 40)
    with torch.no_grad():
        y = model(x)
    assert y.grad_fn is None
    with peftkit.disable(model), torch.no_grad():
        base = model(x)
    adapter = model[0].adapters["default"]
    expected = base + adapter.scaling * adapter.lora_B(adapter.lora_A(x))  # eval: no dropout
    torch.testing.assert_close(y, expected, rtol=0, atol=1e-6)


def _falls_back(model: nn.Module, x: torch.Tensor) -> bool:
    before = dict(lora_kernels.calls)
    y = model(x)
    return (
        lora_kernels.calls["fused"] == before["fused"]
        and type(y.grad_fn).__name__ != "LoraLinearFunctionBackward"
    )


def test_general_path_where_fusing_would_change_the_maths():
    x = torch.randn(2, 40)
    dora = _adapted(
        "Linear", True, 0.1, dora=True
    )  # DoRA with dropout: the base term needs the dropped input
    assert _falls_back(dora, x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert _falls_back(_adapted("Linear", True, 0.0, dora=True), x)

    trained_base = _adapted("Linear", True, 0.0)
    trained_base[0].base_layer.weight.requires_grad_(True)  # a weight gradient: the fused path has none
    assert _falls_back(trained_base, x)

    half = peftkit.inject(
        nn.Sequential(_layer("Linear", True)).to(torch.bfloat16),
        peftkit.LoraConfig(r=2, target_modules=["0"]),
    )
    assert half[0].adapters["default"].lora_A.weight.dtype == torch.float32  # fp32 adapter over a bf16 base
    assert _falls_back(half, x.to(torch.bfloat16))

    hooked = _adapted("Linear", True, 0.0)
    seen = []
    hooked[0].base_layer.register_forward_hook(lambda *args: seen.append(1))
    assert _falls_back(hooked, x) and seen == [1]  # the hook still runs

    two = _adapted("Linear", True, 0.0)
    peftkit.inject(two, peftkit.LoraConfig(r=2, target_modules=["0"]), "other")
    peftkit.set_active(two, ["default", "other"])
    assert _falls_back(two, x)

    class Scaled(nn.Linear):  # a subclass with its own forward is run as itself
        def forward(self, x):
            return 2 * super().forward(x)

    torch.manual_seed(0)
    sub = peftkit.inject(nn.Sequential(Scaled(40, 24)), peftkit.LoraConfig(r=2, target_modules=["0"]))
    assert _falls_back(sub, x)


@pytest.mark.parametrize("tokens", [2, 64], ids=["low-rank-path", "merged-on-the-fly"])
def test_inference_paths_agree_with_general(tokens, general):
    """Without a graph, few tokens take the fused low-rank product and many tokens a transient merged
    weight (cheaper once tokens * (in + out) > in * out); both equal the general path to rounding."""
    model = _adapted("Linear", True, 0.0).eval()
    x = torch.randn(tokens, 40, generator=torch.Generator().manual_seed(8))
    weight = model[0].base_layer.weight.detach().clone()
    with torch.no_grad():
        fast = model(x)
        assert torch.equal(
            model[0].base_layer.weight, weight
        )  # the merge is transient: the base is unchanged
        general()
        slow = model(x)
    torch.testing.assert_close(fast, slow, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("tokens", [2, 64], ids=["low-rank-path", "merged-on-the-fly"])
def test_bf16_base_under_autocast(tokens, general):
    """A bf16 model with its fp32 adapter under bf16 autocast: fused (training and inference) agrees
    with the general path at bf16 resolution."""
    model = _adapted("Linear", True, 0.0).to(torch.bfloat16)
    adapter = model[0].adapters["default"]
    adapter.float()  # the adapter stays fp32 over the bf16 base, as inject makes it
    twin = copy.deepcopy(model)
    x = torch.randn(tokens, 40, generator=torch.Generator().manual_seed(9)).to(torch.bfloat16)
    outs = []
    for m in (model, twin):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            train = m.train()(x)
            with torch.no_grad():
                infer = m.eval()(x)
        outs.append((train, infer, type(train.grad_fn).__name__))
        general()
    assert outs[0][2] == "LoraLinearFunctionBackward" and outs[1][2] != outs[0][2]
    for fast, slow in zip(outs[0][:2], outs[1][:2]):
        assert fast.dtype == slow.dtype == torch.bfloat16
        assert (fast.float() - slow.float()).abs().max() <= BF16_REL * slow.float().abs().max()


def test_gradient_checkpointing_recomputes_the_same_mask():
    """Under gradient checkpointing the fused forward runs twice; the RNG state is restored for the
    recomputation, so the same dropout mask is drawn and the gradients equal those without it."""
    batch = {
        "input_ids": torch.randint(0, 50, (4, 9), generator=torch.Generator().manual_seed(0)),
        "labels": torch.tensor([0, 1, 1, 0]),
    }
    grads = []
    for checkpointing in (False, True):
        model = _tiny_bert()
        peftkit.inject(
            model,
            peftkit.LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.2, init_lora_weights=False),
        )
        if checkpointing:
            model.activation_checkpointing_enable({"use_reentrant": False})
        model.train()
        torch.manual_seed(11)
        before = lora_kernels.calls["fused"]
        model(**batch).loss.backward()
        fused_calls = lora_kernels.calls["fused"] - before
        if not checkpointing:
            plain_calls = fused_calls
        else:  # the encoder layers' forwards really ran twice
            assert fused_calls > plain_calls
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-7, msg=name)
