"""Property tests: merge then unmerge is an identity, and merged equals unmerged, for random shapes."""

from __future__ import annotations

import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch import nn

import peftkit


def _randomise_adapter(model: nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".adapters." in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5 + (1.0 if "magnitude" in name else 0.0))


def _dora_condition(layer: nn.Module, weight: torch.Tensor) -> float:
    """How much DoRA's row normalisation m / ||W + dW|| amplifies rounding: large when a row of
    W + dW nearly cancels (e.g. one input feature), where merged and unmerged must differ more."""
    adapter = layer.adapters["default"]
    with torch.no_grad():
        lora = adapter.scaling * adapter.lora_rows()
        rows = (weight.norm(dim=1) + lora.norm(dim=1)) / (weight + lora).norm(dim=1)
    return max(1.0, rows.max().item())


@settings(max_examples=40, deadline=None)
@example(d_in=21, d_out=24, r=1, alpha=48.5, rslora=False, dora=True, seed=24)  # a delta 460x the weight
@given(
    d_in=st.integers(1, 24),
    d_out=st.integers(1, 24),
    r=st.integers(1, 8),
    alpha=st.floats(0.5, 64),
    rslora=st.booleans(),
    dora=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_linear_merge_unmerge_roundtrip(d_in, d_out, r, alpha, rslora, dora, seed):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(d_in, d_out))
    x = torch.randn(3, d_in)
    weight = model[0].weight.detach().clone()
    peftkit.inject(
        model,
        peftkit.LoraConfig(r=r, lora_alpha=alpha, use_rslora=rslora, use_dora=dora, target_modules=["0"]),
    )
    _randomise_adapter(model, seed)
    with torch.no_grad():
        unmerged = model(x)
        peftkit.merge(model, safe=True)
        merged = model(x)
        peftkit.unmerge(model)
    tol = 1e-5 * max(1.0, unmerged.abs().max().item()) * (_dora_condition(model[0], weight) if dora else 1.0)
    assert (merged - unmerged).abs().max() <= tol
    # unmerging subtracts the delta again: float32 rounding scales with the larger of |W| and |delta W|
    with torch.no_grad():
        adapter = model[0].adapters["default"]
        delta = (adapter.scaling * adapter.lora_rows()).abs().max().item()
    assert (model[0].base_layer.weight - weight).abs().max() <= 1e-5 * max(
        1.0, weight.abs().max().item(), delta
    )


@settings(max_examples=25, deadline=None)
@given(
    c_in=st.integers(1, 5),
    c_out=st.integers(1, 5),
    k=st.integers(1, 3),
    stride=st.integers(1, 2),
    dilation=st.integers(1, 2),
    r=st.integers(1, 4),
    dora=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_conv2d_merge_matches_unmerged(c_in, c_out, k, stride, dilation, r, dora, seed):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(c_in, c_out, k, stride=stride, dilation=dilation, padding=k // 2))
    x = torch.randn(2, c_in, 7, 7)
    peftkit.inject(model, peftkit.LoraConfig(r=r, lora_alpha=2 * r, use_dora=dora, target_modules=["0"]))
    _randomise_adapter(model, seed)
    with torch.no_grad():
        unmerged = model(x)
        peftkit.merge(model)
        merged = model(x)
    assert (merged - unmerged).abs().max() <= 1e-4 * max(1.0, unmerged.abs().max().item())


@settings(max_examples=20, deadline=None)
@given(n_adapters=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_active_adapters_sum_their_deltas(n_adapters, seed):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 4))
    x = torch.randn(2, 5)
    base = model(x).detach()
    deltas = []
    for i in range(n_adapters):
        peftkit.inject(model, peftkit.LoraConfig(r=2, target_modules=["0"], init_lora_weights=False), f"a{i}")
        deltas.append(model(x).detach() - base)
    peftkit.set_active(model, [f"a{i}" for i in range(n_adapters)])
    with torch.no_grad():
        assert torch.allclose(model(x), base + sum(deltas), atol=1e-5)
