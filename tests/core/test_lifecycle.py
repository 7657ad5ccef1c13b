"""Several adapters on one model: activation, disabling, merging, deleting, saving, LoRA+ and biases."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import peftkit
from peftkit.core.layer import AdapterLayer


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.proj = nn.Linear(8, 8)
        self.out = nn.Linear(8, 2)

    def forward(self, ids):
        return self.out(torch.relu(self.proj(self.emb(ids)))).mean(1)


@pytest.fixture
def model():
    torch.manual_seed(0)
    return Tiny()


IDS = torch.tensor([[1, 2, 3], [4, 5, 6]])


def _add(model, name, targets=("proj",), **kw):
    return peftkit.inject(
        model, peftkit.LoraConfig(r=2, target_modules=list(targets), init_lora_weights=False, **kw), name
    )


def test_set_active_switches_outputs_and_trainability(model):
    base = model(IDS).detach()
    _add(model, "a")
    out_a = model(IDS).detach()
    _add(model, "b", targets=("proj", "emb"))
    out_b = model(IDS).detach()
    assert peftkit.active_adapters(model) == ["b"]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".adapters.b." in n for n in trainable)
    peftkit.set_active(model, "a")
    assert torch.equal(model(IDS), out_a) and not torch.equal(out_a, out_b) and not torch.equal(out_a, base)
    peftkit.set_active(model, ["a", "b"])
    assert {n.split(".adapters.")[1][0] for n, p in model.named_parameters() if p.requires_grad} == {"a", "b"}


def test_disable_gives_the_base_output_even_when_merged(model):
    base = model(IDS).detach()
    _add(model, "a")
    adapted = model(IDS).detach()
    peftkit.merge(model)
    with peftkit.disable(model):
        assert torch.allclose(model(IDS), base, atol=1e-6)
    assert model.proj.merged == ["a"]
    assert torch.allclose(model(IDS), adapted, atol=1e-6)


def test_merge_named_adapter_only(model):
    _add(model, "a")
    _add(model, "b")
    peftkit.set_active(model, ["a", "b"])
    both = model(IDS).detach()
    peftkit.merge(model, "a")
    assert model.proj.merged == ["a"]
    assert torch.allclose(model(IDS), both, atol=1e-6)  # a merged + b unmerged = both active
    peftkit.set_active(model, "b")
    with pytest.raises(peftkit.errors.AdapterNameError, match="merged into the base weights; unmerge"):
        peftkit.delete_adapter(model, "a")


def test_delete_adapter_restores_plain_modules(model):
    _add(model, "a")
    _add(model, "b", targets=("emb",))
    peftkit.delete_adapter(model, "a")
    assert isinstance(model.proj, nn.Linear) and isinstance(model.emb, AdapterLayer)
    assert peftkit.adapter_names(model) == ["b"]


def test_unload_with_merge_returns_plain_model_with_adapted_function(model):
    _add(model, "a", targets=("proj", "emb"))
    adapted = model(IDS).detach()
    plain = peftkit.unload(model, merge=True)
    assert plain is model and type(model.proj) is nn.Linear and type(model.emb) is nn.Embedding
    assert torch.allclose(model(IDS), adapted, atol=1e-6)
    assert "_peftkit" not in model.__dict__


def test_two_adapters_save_and_load_under_new_names(model, tmp_path):
    original = copy.deepcopy(model)
    _add(model, "a")
    _add(model, "b", targets=("emb",))
    outs = {}
    for name in ("a", "b"):
        peftkit.set_active(model, name)
        with torch.no_grad():  # inference, as the loaded adapters below run: the same arithmetic, bit for bit
            outs[name] = model(IDS)
        peftkit.save_adapter(model, tmp_path / name, adapter_name=name)
    peftkit.load_adapter(original, tmp_path / "a", adapter_name="x")
    peftkit.load_adapter(original, tmp_path / "b", adapter_name="y")
    assert peftkit.active_adapters(original) == ["y"]
    assert torch.equal(original(IDS), outs["b"])
    peftkit.set_active(original, "x")
    assert torch.equal(original(IDS), outs["a"])
    assert not any(p.requires_grad for p in original.parameters())  # loaded for inference by default


def test_loaded_adapter_can_be_trainable(model, tmp_path):
    original = copy.deepcopy(model)
    _add(model, "a")
    peftkit.save_adapter(model, tmp_path / "a", adapter_name="a")
    peftkit.load_adapter(original, tmp_path / "a", is_trainable=True)
    assert {n for n, p in original.named_parameters() if p.requires_grad} == {
        "proj.adapters.default.lora_A.weight",
        "proj.adapters.default.lora_B.weight",
    }
    saved = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert saved["inference_mode"] is True and saved["peft_type"] == "LORA"


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_bias_training_is_saved_under_reference_names(model, tmp_path, bias):
    _add(model, "default", targets=("proj",), bias=bias)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected_bias = {"proj.base_layer.bias"} | ({"out.bias"} if bias == "all" else set())
    assert expected_bias <= trainable
    peftkit.save_adapter(model, tmp_path / "a")
    keys = set(load_file(tmp_path / "a" / "adapter_model.safetensors"))
    assert {"base_model.model." + b for b in expected_bias} <= keys
    with torch.no_grad():
        model.proj.base_layer.bias.add_(1.0)  # as training would
        trained = model(IDS)  # inference, as the loaded adapter runs
    peftkit.save_adapter(model, tmp_path / "b")
    torch.manual_seed(0)
    fresh = Tiny()  # the same base weights as the fixture's
    peftkit.load_adapter(fresh, tmp_path / "b")
    assert torch.equal(fresh(IDS), trained)  # the trained bias came back with the adapter


def test_lora_plus_groups_give_b_a_larger_learning_rate(model):
    _add(model, "a", targets=("proj", "emb"), modules_to_save=["out"])
    groups = {g["name"]: g for g in peftkit.lora_plus_param_groups(model, lr=1e-3, lr_ratio=16)}
    assert groups["lora_plus_A"]["lr"] == 1e-3 and groups["lora_plus_B"]["lr"] == 16e-3
    assert groups["lora_plus_embedding"]["lr"] == 1e-6
    ids = lambda g: {id(p) for p in g["params"]}  # noqa: E731
    assert ids(groups["lora_plus_A"]) == {id(model.proj.adapters["a"].lora_A.weight)}
    assert ids(groups["lora_plus_B"]) == {id(model.proj.adapters["a"].lora_B.weight)}
    assert len(groups["lora_plus_other"]["params"]) == 2  # the head copy's weight and bias
    everything = set().union(*(ids(g) for g in groups.values()))
    assert everything == {id(p) for p in model.parameters() if p.requires_grad}
    torch.optim.AdamW(list(groups.values()))  # accepted as-is


def test_adapter_state_dict_keys_follow_the_interchange_format(model):
    _add(model, "a", targets=("proj", "emb"), use_dora=True)
    keys = sorted(peftkit.adapter_state_dict(model, "a"))
    assert keys == [
        "base_model.model.emb.lora_embedding_A",
        "base_model.model.emb.lora_embedding_B",
        "base_model.model.emb.lora_magnitude_vector",
        "base_model.model.proj.lora_A.weight",
        "base_model.model.proj.lora_B.weight",
        "base_model.model.proj.lora_magnitude_vector",
    ]


def test_pissa_adapter_reloads_onto_the_original_base(model, tmp_path):
    original = copy.deepcopy(model)
    base_out = model(IDS).detach()
    peftkit.inject(model, peftkit.LoraConfig(r=2, target_modules=["proj"], init_lora_weights="pissa"))
    assert torch.allclose(model(IDS), base_out, atol=1e-5)
    with torch.no_grad():
        model.proj.adapters["default"].lora_B.weight.mul_(1.5)
        trained = model(IDS)  # inference, as the loaded adapter runs
    peftkit.save_adapter(model, tmp_path / "p")
    peftkit.load_adapter(original, tmp_path / "p")
    assert torch.equal(original(IDS), trained)
    peftkit.unload(original)
    assert torch.allclose(original(IDS), base_out, atol=1e-5)


def test_summary_counts_and_prints(model, capsys):
    _add(model, "a", targets=("proj",), modules_to_save=["out"])
    summary = peftkit.trainable_summary(model)
    printed = capsys.readouterr().out
    assert summary.trainable == 2 * 8 + 8 * 2 + (8 * 2 + 2)
    assert summary.total == sum(p.numel() for p in model.parameters())
    assert "proj" in printed and "full copy" in printed and "trainable%" in printed


def test_full_base_weight_saved_beside_an_embedding_adapter_is_applied(model, tmp_path):
    # The reference library saves "<embedding>.base_layer.weight" with embedding adapters (for resized
    # vocabularies); equal weights are skipped quietly, different ones replace the model's, with a warning.
    from safetensors.torch import save_file

    original = copy.deepcopy(model)
    _add(model, "default", targets=("emb",))
    peftkit.save_adapter(model, tmp_path / "a")
    tensors = load_file(tmp_path / "a" / "adapter_model.safetensors")
    tensors["base_model.model.emb.base_layer.weight"] = model.emb.base_layer.weight.detach().clone()
    save_file(tensors, tmp_path / "a" / "adapter_model.safetensors")
    peftkit.load_adapter(copy.deepcopy(original), tmp_path / "a")  # no warning: same weight
    tensors["base_model.model.emb.base_layer.weight"] += 1.0
    save_file(tensors, tmp_path / "a" / "adapter_model.safetensors")
    with pytest.warns(UserWarning, match="replaces the model's weight"):
        peftkit.load_adapter(original, tmp_path / "a")
    assert torch.equal(original.emb.base_layer.weight, tensors["base_model.model.emb.base_layer.weight"])
