"""Several adapters and verbs in combination: the cases a single-adapter contract does not reach."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import peftkit
from peftkit.errors import (
    AdapterMismatchError,
    AdapterNameError,
    ConfigError,
    UnsafeMergeError,
    UnsupportedLayerError,
)


class M(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1, self.l2, self.head = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x):
        return self.head(torch.relu(self.l2(torch.relu(self.l1(x)))))


X = torch.randn(4, 8, generator=torch.Generator().manual_seed(3))


def mk() -> M:
    torch.manual_seed(0)
    return M()


def add(model, name, **kw):
    kw.setdefault("target_modules", ["l1"])
    peftkit.inject(model, peftkit.LoraConfig(r=2, init_lora_weights=False, **kw), name)
    if kw.get("use_dora"):
        with torch.no_grad():  # move the magnitude away from ||W|| so DoRA really rescales
            model.l1.adapters[name].lora_magnitude_vector.mul_(1.3)
    return model


def snapshot(model):
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        {n: type(m) for n, m in model.named_modules()},
        {n: p.requires_grad for n, p in model.named_parameters()},
    )


def same(model, snap) -> bool:
    state, types, grads = snap
    now = model.state_dict()
    exact = lambda a, b: torch.allclose(a, b, rtol=0, atol=0, equal_nan=True)  # noqa: E731
    return (
        state.keys() == now.keys()
        and all(exact(state[k], now[k]) for k in state)
        and types == {n: type(m) for n, m in model.named_modules()}
        and grads == {n: p.requires_grad for n, p in model.named_parameters()}
    )


def test_unmerging_one_of_several_merged_adapters_is_exact():
    model = add(add(add(mk(), "a"), "b"), "c")
    w0 = model.l1.base_layer.weight.detach().clone()
    peftkit.set_active(model, ["a", "b", "c"])
    everything = model(X).detach()
    peftkit.merge(model)
    peftkit.unmerge(model, "a")
    assert model.l1.merged == ["b", "c"]
    assert torch.allclose(model(X), everything, atol=1e-6)
    peftkit.unmerge(model)
    assert torch.allclose(model.l1.base_layer.weight, w0, atol=1e-6)


@pytest.mark.parametrize("order", [("lora", "dora"), ("dora", "lora"), ("dora", "dora")])
def test_dora_refuses_to_merge_beside_another_adapter(order):
    model = mk()
    for i, kind in enumerate(order):
        add(model, f"a{i}", use_dora=kind == "dora")
    peftkit.set_active(model, ["a0", "a1"])
    snap = snapshot(model)
    with pytest.raises(AdapterNameError, match="rescale the whole weight"):
        peftkit.merge(model)
    with pytest.raises(AdapterNameError, match="rescale the whole weight"):
        peftkit.merge(model, "a0")
    with pytest.raises(AdapterNameError, match="rescale the whole weight"):
        peftkit.unload(model, merge=True)
    assert same(model, snap) and model.l1.merged == []
    peftkit.set_active(model, "a1")  # alone it merges exactly
    alone = model(X).detach()
    peftkit.merge(model)
    assert torch.allclose(model(X), alone, atol=1e-5)


def test_failed_safe_merge_leaves_every_layer_unmerged():
    model = add(add(mk(), "a", target_modules=["l1", "l2"]), "b")
    with torch.no_grad():
        model.l1.adapters["b"].lora_A.weight[0, 0] = float("nan")
    peftkit.set_active(model, ["a", "b"])
    snap = snapshot(model)
    with pytest.raises(UnsafeMergeError, match="'b' into 'l1'"):
        peftkit.merge(model, safe=True)
    assert same(model, snap) and model.l1.merged == [] and model.l2.merged == []


def test_a_module_cannot_be_both_adapted_and_trained_in_full():
    model = add(mk(), "a", modules_to_save=["head"])
    snap = snapshot(model)
    with pytest.raises(AdapterNameError, match="'head' is already trained in full.*not changed"):
        add(model, "b", target_modules=["l2", "head"])
    assert same(model, snap)
    with pytest.raises(AdapterNameError, match="'l1' is already adapted"):
        add(model, "c", target_modules=["l2"], modules_to_save=["l1"])
    assert same(model, snap) and peftkit.adapter_names(model) == ["a"]


def test_saved_names_do_not_depend_on_other_adapters(tmp_path):
    model = add(mk(), "a", bias="all")
    alone = set(peftkit.adapter_state_dict(model, "a"))
    add(model, "b", target_modules=["l2"], modules_to_save=["head"])
    assert set(peftkit.adapter_state_dict(model, "a")) == alone
    assert "base_model.model.l1.base_layer.bias" in alone and "base_model.model.head.bias" in alone
    peftkit.save_adapter(model, tmp_path, "a")
    peftkit.load_adapter(mk(), tmp_path)


def test_trained_biases_come_back_on_unload_delete_and_failed_load(tmp_path):
    base = mk()
    base_out = base(X).detach()
    model = add(copy.deepcopy(base), "a", bias="all")
    with torch.no_grad():
        model.head.bias.add_(1.0)
        model.l1.base_layer.bias.add_(1.0)
    peftkit.save_adapter(model, tmp_path, "a")
    add(model, "b", target_modules=["l2"])
    peftkit.delete_adapter(model, "a")
    peftkit.set_active(model, "b")
    with peftkit.disable(model):
        assert torch.equal(model(X), base_out)
    peftkit.unload(model)
    assert torch.equal(model(X), base_out)

    tensors = load_file(tmp_path / "adapter_model.safetensors")
    save_file(
        tensors, tmp_path / "adapter_model.safetensors", metadata={"peftkit.base_fingerprint": "f" * 16}
    )
    fresh = copy.deepcopy(base)
    snap = snapshot(fresh)
    with pytest.raises(AdapterMismatchError, match="different base model"):
        peftkit.load_adapter(fresh, tmp_path)
    assert same(fresh, snap)


def test_multihead_attention_out_proj_is_skipped_not_silently_bypassed():
    # a method without a row for the attention module: its out_proj (read, never called) is reported
    torch.manual_seed(0)
    model = nn.Sequential(nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True))
    peftkit.inject(model, peftkit.IA3Config(target_modules="all-linear", init_ia3_weights=False))
    summary = peftkit.trainable_summary(model, show=False)
    assert sorted(n for n, *_ in summary.adapted) == ["0.linear1", "0.linear2"]
    assert summary.skipped[0][0] == "0.self_attn.out_proj" and "MultiheadAttention" in summary.skipped[0][2]
    x = torch.randn(2, 3, 8)
    unmerged = model(x).detach()
    peftkit.merge(model)
    assert torch.allclose(model(x), unmerged, atol=1e-5)


def test_a_module_shared_by_two_parents_is_refused():
    shared = nn.Linear(4, 4)
    model = nn.Sequential(nn.Sequential(shared), nn.Sequential(shared))
    with pytest.raises(UnsupportedLayerError, match="same module object as '0.0'"):
        peftkit.inject(model, peftkit.LoraConfig(target_modules=r"\d\.0"))


def test_nested_disable_keeps_the_outer_block_disabled():
    model = add(mk(), "a", modules_to_save=["head"])
    base = mk()(X)
    with peftkit.disable(model):
        with peftkit.disable(model):
            pass
        assert torch.equal(model(X), base)
    assert not torch.equal(model(X), base)


def test_set_active_leaves_parameters_the_user_unfroze():
    model = add(mk(), "a")
    model.l2.weight.requires_grad_(True)  # e.g. also fine-tune one base layer
    add(model, "b")
    peftkit.set_active(model, "a")
    assert model.l2.weight.requires_grad
    assert not model.l1.adapters["b"].lora_A.weight.requires_grad


def test_svd_init_limits_and_stacking():
    with pytest.raises(UnsupportedLayerError, match="l1: init_lora_weights='pissa' needs r <= min"):
        peftkit.inject(mk(), peftkit.LoraConfig(r=9, target_modules=["l1"], init_lora_weights="pissa"))
    model = peftkit.inject(
        mk(), peftkit.LoraConfig(r=2, target_modules=["l1"], init_lora_weights="pissa"), "a"
    )
    with pytest.raises(UnsupportedLayerError, match="second one would decompose"):
        peftkit.inject(model, peftkit.LoraConfig(r=2, target_modules=["l1"], init_lora_weights="olora"), "b")


def test_targeting_follows_the_reference_rules():
    names = lambda m: sorted(n for n, *_ in peftkit.trainable_summary(m, show=False).adapted)  # noqa: E731
    model = nn.ModuleDict(
        {
            "layers": nn.ModuleList(
                nn.ModuleDict({"a": nn.Linear(2, 2), "b": nn.Linear(2, 2)}) for _ in range(3)
            )
        }
    )
    peftkit.inject(
        model,
        peftkit.LoraConfig(
            target_modules=["layers.0.a", "b"], layers_to_transform=[2], layers_pattern="layers"
        ),
    )
    assert names(model) == ["layers.0.a", "layers.2.b"]  # a full name skips the layer filter
    peftkit.inject(model, peftkit.LoraConfig(target_modules=["a"], layers_to_transform=[]), "all")
    assert sorted(set(names(model))) == [
        "layers.0.a",
        "layers.1.a",
        "layers.2.a",
        "layers.2.b",
    ]  # [] = no filter
    assert peftkit.LoraConfig(target_modules="ALL-Linear").target_modules == "all-linear"
    with pytest.raises(ConfigError, match="not a regex"):
        peftkit.LoraConfig(target_modules=r".*q", layers_to_transform=[0])
    with pytest.raises(ConfigError, match="layers_pattern: only meaningful"):
        peftkit.LoraConfig(target_modules=["q"], layers_pattern="layers")


def test_modules_to_save_uses_the_reference_suffix_rule_and_init_only_values_load():
    model = nn.Sequential()
    model.add_module("pre_classifier", nn.Linear(4, 4))
    model.add_module("classifier", nn.Linear(4, 2))
    model.add_module("body", nn.Linear(4, 4))
    peftkit.inject(model, peftkit.LoraConfig(target_modules=["body"], modules_to_save=["classifier"]))
    saved = sorted(n for n, *_ in peftkit.trainable_summary(model, show=False).modules_to_save)
    assert saved == ["classifier", "pre_classifier"]  # as the reference library picks them
    data = peftkit.LoraConfig(target_modules=["q"]).to_dict()
    config = peftkit.AdapterConfig.from_dict({**data, "init_lora_weights": "orthogonal"})
    assert config.init_lora_weights is True
