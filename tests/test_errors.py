"""Bad input: each error names what was wrong and the fix, and leaves the model (and files) intact."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import peftkit
from peftkit.errors import (
    AdapterFileError,
    AdapterMismatchError,
    AdapterNameError,
    BaseModelMismatchWarning,
    ConfigError,
    NoTargetMatchedError,
    UnsupportedLayerError,
)
from support.tiny import build


def _snapshot(model: nn.Module):
    return {n: type(m) for n, m in model.named_modules()}, {
        k: v.clone() for k, v in model.state_dict().items()
    }


def _same(model: nn.Module, snap) -> bool:
    types, state = snap
    now = model.state_dict()
    return (
        {n: type(m) for n, m in model.named_modules()} == types
        and state.keys() == now.keys()
        and all(torch.equal(state[k], now[k]) for k in state)
    )


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.query, self.value, self.norm = nn.Linear(4, 4), nn.Linear(4, 4), nn.LayerNorm(4)

    def forward(self, x):
        return self.norm(self.query(x) + self.value(x))


def _model():
    torch.manual_seed(0)
    return nn.Sequential(Block(), Block())


def test_target_matching_nothing_names_the_closest_modules():
    model = _model()
    snap = _snapshot(model)
    with pytest.raises(NoTargetMatchedError, match=r"target 'quer' matched 0 modules; closest: 'query'\."):
        peftkit.inject(model, peftkit.LoraConfig(target_modules=["quer", "value"]))
    assert _same(model, snap)
    with pytest.raises(NoTargetMatchedError, match="matched 0 modules"):
        peftkit.inject(model, peftkit.LoraConfig(target_modules=r".*\.nothing"))


def test_modules_to_save_matching_nothing_is_an_error():
    model = _model()
    with pytest.raises(
        NoTargetMatchedError, match=r"modules_to_save: target 'nrom' matched 0 modules; closest: 'norm'\."
    ):
        peftkit.inject(model, peftkit.LoraConfig(target_modules=["query"], modules_to_save=["nrom"]))


def test_unsupported_layer_type_names_the_supported_types():
    model = _model()
    snap = _snapshot(model)
    with pytest.raises(
        UnsupportedLayerError, match=r"0.norm \(LayerNorm.*Supported layer types: torch.nn.Linear"
    ):
        peftkit.inject(model, peftkit.LoraConfig(target_modules=["norm", "query"]))
    assert _same(model, snap)


def test_regex_matching_unsupported_modules_skips_and_reports_them():
    model = nn.Sequential(nn.MultiheadAttention(4, 2, kdim=2, vdim=2), nn.Conv2d(4, 4, 1))
    peftkit.inject(model, peftkit.LoraConfig(target_modules=r"\d"))
    summary = peftkit.trainable_summary(model, show=False)
    assert [a[0] for a in summary.adapted] == ["1"]
    assert summary.skipped[0][0] == "0" and "kdim=2" in summary.skipped[0][2]
    assert "matched but not adapted" in str(summary)
    with pytest.raises(UnsupportedLayerError, match="kdim=2"):
        peftkit.inject(copy.deepcopy(model), peftkit.LoraConfig(target_modules=["0"]), "other")


def test_svd_inits_refuse_non_matrix_layers_before_touching_the_model():
    model, _ = build("Conv2d")
    snap = _snapshot(model)
    with pytest.raises(UnsupportedLayerError, match="pissa"):
        peftkit.inject(model, peftkit.LoraConfig(target_modules=["layer"], init_lora_weights="pissa"))
    assert _same(model, snap)


@pytest.mark.parametrize("kind", ["Embedding", "Conv1d", "Conv2d", "Conv3d"])
@pytest.mark.parametrize(
    "init, error, match",
    [
        ("lora_ga", ConfigError, r"targets no nn.Linear \(or GPT-2 Conv1D\) layer"),
        ("eva", UnsupportedLayerError, r"not linear layers: layer \("),
        ("corda", UnsupportedLayerError, r"not linear layers: layer \("),
    ],
)
def test_data_inits_refuse_non_matrix_layers_before_touching_the_model(kind, init, error, match):
    # they read a weight matrix and its gradient or inputs: the contract rows run them on the matrix kinds
    model, x = build(kind)
    snap = _snapshot(model)
    config = peftkit.LoraConfig(target_modules=["layer"], init_lora_weights=init)
    with pytest.raises(error, match=match):  # through the hooks a run calls
        if config.needs_init_data():
            config.init_from_data(model, lambda: model(x).float().pow(2).mean().backward())
        config.inject_from_data(model, [x], lambda m, batch: m(batch))
    assert _same(model, snap)
    assert all(p.requires_grad and p.grad is None for p in model.parameters())


@pytest.mark.parametrize(
    "kind, match", [("Conv1D", "quantizes nn.Linear weights"), ("Conv2d", "linear weight matrix")]
)
def test_loftq_refuses_layers_it_cannot_quantize_before_touching_the_model(kind, match):
    pytest.importorskip("bitsandbytes")
    model, _ = build(kind)
    snap = _snapshot(model)
    config = peftkit.LoraConfig(
        target_modules=["layer"], init_lora_weights="loftq", loftq_config={"loftq_bits": 8, "loftq_iter": 1}
    )
    with pytest.raises(UnsupportedLayerError, match=match):
        peftkit.inject(model, config)
    assert _same(model, snap)


def test_duplicate_adapter_name_is_refused_and_model_unchanged():
    model = _model()
    peftkit.inject(model, peftkit.LoraConfig(target_modules=["query"]), "a")
    snap = _snapshot(model)
    with pytest.raises(AdapterNameError, match="already exists.*not changed"):
        peftkit.inject(model, peftkit.LoraConfig(target_modules=["value"]), "a")
    assert _same(model, snap)
    assert peftkit.adapter_names(model) == ["a"]


@pytest.mark.parametrize("bad", [{"r": 0}, {"r": -3}, {"r": 2.5}])
def test_non_positive_rank_is_a_config_error(bad):
    with pytest.raises(ConfigError, match="r: must be a positive integer"):
        peftkit.LoraConfig(target_modules=["q"], **bad)


def test_config_reports_every_problem_at_once():
    with pytest.raises(ConfigError) as info:
        peftkit.LoraConfig(r=0, lora_dropout=1.5, bias="some", init_lora_weights="svd", target_modules="(")
    assert len(info.value.problems) == 5
    text = str(info.value)
    for field in ("r:", "lora_dropout:", "bias:", "init_lora_weights:", "target_modules:"):
        assert field in text


def test_unknown_config_key_warns_and_unsupported_reference_feature_raises():
    data = peftkit.LoraConfig(target_modules=["q"]).to_dict()
    with pytest.warns(UserWarning, match="future_option"):
        peftkit.AdapterConfig.from_dict({**data, "future_option": 1})
    with pytest.raises(ConfigError, match="use_qalora=True"):
        peftkit.AdapterConfig.from_dict({**data, "use_qalora": True})


def test_deleting_the_active_adapter_is_refused():
    model = _model()
    peftkit.inject(model, peftkit.LoraConfig(target_modules=["query"]), "a")
    peftkit.inject(model, peftkit.LoraConfig(target_modules=["value"]), "b")
    with pytest.raises(AdapterNameError, match=r"'b' is active.*set_active\(model, 'a'\)"):
        peftkit.delete_adapter(model, "b")
    peftkit.set_active(model, "a")
    peftkit.delete_adapter(model, "b")
    assert peftkit.adapter_names(model) == ["a"]
    assert isinstance(model[0].value, nn.Linear)  # the wrapper went with its last adapter
    with pytest.raises(AdapterNameError, match="unload"):
        peftkit.delete_adapter(model, "a")


def _saved(tmp_path, model=None):
    model = model or _model()
    peftkit.inject(model, peftkit.LoraConfig(target_modules=["query", "value"], init_lora_weights=False))
    peftkit.save_adapter(model, tmp_path / "a")
    return tmp_path / "a"


def test_loading_onto_a_differently_shaped_model_names_module_and_shapes(tmp_path):
    path = _saved(tmp_path)
    other = nn.Sequential(Block(), Block())
    other[1].query = nn.Linear(4, 6)
    snap = _snapshot(other)
    with pytest.raises(
        AdapterMismatchError, match=r"1.query: saved \(4, 8\) vs model \(6, 8\) \(lora_B.weight\)"
    ):
        peftkit.load_adapter(other, path)
    assert _same(other, snap) and peftkit.adapter_names(other) == []


def test_loading_with_missing_keys_lists_them(tmp_path):
    path = _saved(tmp_path)
    tensors = load_file(path / "adapter_model.safetensors")
    del tensors["base_model.model.1.value.lora_A.weight"]
    save_file(tensors, path / "adapter_model.safetensors")
    model = _model()
    with pytest.raises(
        AdapterMismatchError, match=r"1 missing key\(s\) \[base_model.model.1.value.lora_A.weight\]"
    ):
        peftkit.load_adapter(model, path)
    with pytest.warns(UserWarning, match="1 missing"):
        peftkit.load_adapter(model, path, strict=False)


def test_truncated_safetensors_file_is_refused(tmp_path):
    path = _saved(tmp_path)
    weights = path / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-37])
    model = _model()
    snap = _snapshot(model)
    with pytest.raises(AdapterFileError, match="truncated or corrupt"):
        peftkit.load_adapter(model, path)
    assert _same(model, snap)


def test_non_finite_tensor_in_file_is_refused(tmp_path):
    path = _saved(tmp_path)
    tensors = load_file(path / "adapter_model.safetensors")
    key = sorted(tensors)[0]
    tensors[key][0, 0] = float("inf")
    save_file(tensors, path / "adapter_model.safetensors")
    with pytest.raises(AdapterFileError, match="non-finite"):
        peftkit.load_adapter(_model(), path)


def test_pickle_file_needs_allow_pickle(tmp_path):
    path = _saved(tmp_path)
    tensors = load_file(path / "adapter_model.safetensors")
    os.remove(path / "adapter_model.safetensors")
    torch.save(tensors, path / "adapter_model.bin")
    with pytest.raises(AdapterFileError, match="allow_pickle=True"):
        peftkit.load_adapter(_model(), path)
    model = peftkit.load_adapter(_model(), path, allow_pickle=True)
    assert peftkit.adapter_names(model) == ["default"]


def test_pickle_with_code_is_refused_even_when_allowed(tmp_path):
    path = _saved(tmp_path)
    os.remove(path / "adapter_model.safetensors")

    class Evil:
        def __reduce__(self):
            return (os.system, ("true",))

    torch.save({"x": Evil()}, path / "adapter_model.bin")
    with pytest.raises(AdapterFileError, match="weights_only"):
        peftkit.load_adapter(_model(), path, allow_pickle=True)


def test_fingerprint_mismatch_raises_when_strict_and_warns_otherwise(tmp_path):
    path = _saved(tmp_path)
    tensors = load_file(path / "adapter_model.safetensors")
    save_file(
        tensors,
        path / "adapter_model.safetensors",
        metadata={"format": "pt", "peftkit.base_fingerprint": "0" * 16},
    )
    with pytest.raises(AdapterMismatchError, match="different base model"):
        peftkit.load_adapter(_model(), path)
    with pytest.warns(BaseModelMismatchWarning):
        peftkit.load_adapter(_model(), path, strict=False)


def test_interrupted_save_keeps_the_previous_adapter(tmp_path, monkeypatch):
    path = _saved(tmp_path)
    good = {name: (path / name).read_bytes() for name in ("adapter_model.safetensors", "adapter_config.json")}
    model = _model()
    peftkit.inject(model, peftkit.LoraConfig(target_modules=["query"], r=2))

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as handle:
            handle.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr("peftkit.core.io.save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        peftkit.save_adapter(model, path)
    assert {name: (path / name).read_bytes() for name in good} == good
    assert sorted(os.listdir(path)) == ["adapter_config.json", "adapter_model.safetensors"]


def test_saving_a_diverged_adapter_is_refused_and_files_kept(tmp_path):
    path = _saved(tmp_path)
    before = (path / "adapter_model.safetensors").read_bytes()
    model = _model()
    peftkit.inject(model, peftkit.LoraConfig(target_modules=["query"]))
    with torch.no_grad():
        model[0].query.adapters["default"].lora_B.weight.fill_(float("nan"))
    with pytest.raises(AdapterFileError, match="not saved"):
        peftkit.save_adapter(model, path)
    assert (path / "adapter_model.safetensors").read_bytes() == before


def test_missing_or_corrupt_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        peftkit.load_adapter(_model(), tmp_path)
    path = _saved(tmp_path)
    (path / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterFileError, match="not valid JSON"):
        peftkit.load_adapter(_model(), path)
    (path / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "r": 0, "target_modules": ["query"]})
    )
    with pytest.raises(ConfigError, match="r: must be"):
        peftkit.load_adapter(_model(), path)


def test_bad_adapter_names():
    model = _model()
    with pytest.raises(AdapterNameError, match="without '.'"):
        peftkit.inject(model, peftkit.LoraConfig(target_modules=["query"]), "a.b")
    peftkit.inject(model, peftkit.LoraConfig(target_modules=["query"]))
    with pytest.raises(AdapterNameError, match="adapters on this model"):
        peftkit.set_active(model, "nope")
    with pytest.raises(AdapterNameError, match="no peftkit adapters"):
        peftkit.merge(_model())


def test_saved_files_get_ordinary_permissions(tmp_path):
    path = _saved(tmp_path)
    umask = os.umask(0)
    os.umask(umask)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (path / name).stat().st_mode & 0o777 == 0o666 & ~umask
