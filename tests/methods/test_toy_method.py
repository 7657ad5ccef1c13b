"""A new method touches only its own files: a toy method defined outside peftkit (``toy_method.py`` next
to this file) registers itself and is then a method like the built-in ones, through ``peftkit.inject``
and the verbs, the interchange files, a YAML run config (``adapter.method: toy``) and the package root
(``peftkit.ToyConfig``), without any edit to peftkit.
"""

from __future__ import annotations

import copy
import importlib
import json
import sys
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import peftkit
from peftkit.core import registry
from peftkit.errors import ConfigError
from peftkit.run.config import load_config


@pytest.fixture
def toy(monkeypatch):
    """The ``toy_method`` module, imported (so registered) for one test only."""
    registry.registered_methods()  # the built-in methods register in the real table first
    # The toy registers in a copy of the table, which is dropped after the test with the toy in it.
    monkeypatch.setattr(registry, "_METHODS", dict(registry._METHODS))
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    sys.modules.pop("toy_method", None)
    yield importlib.import_module("toy_method")
    sys.modules.pop("toy_method", None)


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(OrderedDict(layer=nn.Linear(4, 3), act=nn.Tanh(), head=nn.Linear(3, 2)))


def _train(model: nn.Module, x: torch.Tensor, steps: int = 3) -> None:
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(steps):
        optimizer.zero_grad()
        model(x).pow(2).sum().backward()
        optimizer.step()


def test_the_root_exports_a_method_as_soon_as_it_registers(toy):
    assert "TOY" in registry.registered_methods()
    assert peftkit.ToyConfig is toy.ToyConfig
    assert "ToyConfig" in peftkit.__all__ and "ToyConfig" in dir(peftkit)
    assert type(peftkit.make_config("toy", scale=2.0)) is toy.ToyConfig


def test_no_other_test_sees_the_toy():
    assert "TOY" not in registry.registered_methods()
    assert "ToyConfig" not in peftkit.__all__
    with pytest.raises(AttributeError):
        peftkit.ToyConfig  # noqa: B018


def test_the_toy_goes_through_the_verbs(toy):
    model, x = _net(), torch.randn(5, 4)
    with torch.no_grad():
        base = model(x)
    peftkit.inject(model, peftkit.make_config("toy", target_modules=["layer"]))
    assert torch.equal(model(x), base), "a fresh adapter starts at the base model"
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"layer.adapters.default.toy_a", "layer.adapters.default.toy_b"}

    _train(model, x)
    with torch.no_grad():
        trained = model(x)
        assert not torch.allclose(trained, base)
        with peftkit.disable(model):
            assert torch.equal(model(x), base)
        peftkit.merge(model, safe=True)  # core/layer.py merges through the toy's delta_weight
        torch.testing.assert_close(model(x), trained)
        peftkit.unmerge(model)
        torch.testing.assert_close(model(x), trained)
    peftkit.unload(model)
    assert type(model.layer) is nn.Linear
    torch.testing.assert_close(model(x), base, rtol=0, atol=1e-6)


def test_the_toy_saves_and_loads_in_the_interchange_files(toy, tmp_path):
    model, x = _net(), torch.randn(5, 4)
    fresh = copy.deepcopy(model)
    peftkit.inject(model, toy.ToyConfig(target_modules=["layer"], scale=2.0))
    _train(model, x)
    peftkit.save_adapter(model, tmp_path)

    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "TOY" and saved["scale"] == 2.0
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert set(tensors) == {"base_model.model.layer.toy_a", "base_model.model.layer.toy_b"}

    loaded = peftkit.load_adapter(fresh, tmp_path)
    assert type(peftkit.adapter_config(loaded)) is toy.ToyConfig
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_a_run_config_names_the_toy_method(toy, tiny_model_dir, reviews_csv, tmp_path):
    recipe = tmp_path / "toy.yaml"

    def write(adapter: str) -> Path:
        recipe.write_text(
            "task: text-classification\n"
            f"model: {{name_or_path: {tiny_model_dir}}}\n"
            f"data: {{files: {reviews_csv}, columns: {{text: review, label: sentiment}}}}\n"
            f"adapter: {adapter}\n"
        )
        return recipe

    config = load_config(write("{method: toy, scale: 0.5, target_modules: [query, value]}"))
    assert config.adapter == {"method": "toy", "scale": 0.5, "target_modules": ["query", "value"]}
    fields = {k: v for k, v in config.adapter.items() if k != "method"}
    adapter = peftkit.make_config(config.adapter["method"], **fields)  # what the runner does
    assert type(adapter) is toy.ToyConfig and adapter.scale == 0.5

    from transformers import AutoModel

    model = peftkit.inject(AutoModel.from_pretrained(tiny_model_dir), adapter)
    adapted = [name for name, _ in model.named_modules() if name.endswith(("query", "value"))]
    assert len(adapted) == 4 and all(type(model.get_submodule(n)).__name__ == "AdapterLayer" for n in adapted)

    # the recipe is checked against the toy's own fields and their types, each problem under its path
    with pytest.raises(ConfigError) as err:
        load_config(write("{method: toy, scle: 2, target_modules: [query]}"))
    assert "adapter.scle: ToyConfig has no field 'scle'; did you mean 'scale'?" in str(err.value)
    with pytest.raises(ConfigError, match=r"adapter\.scale: expected a number, got .big."):
        load_config(write("{method: toy, scale: big, target_modules: [query]}"))
