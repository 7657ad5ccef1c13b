"""The optimizer groups of ``peftkit.train``: LoRA+ groups come from the adapters' methods.

``train/`` knows the core and no method: with ``lora_plus_ratio`` it asks each method on the model for
its groups (``AdapterConfig.param_groups``, which LoRA implements in ``methods/lora.py``).
"""

from __future__ import annotations

import pytest
import torch
from test_fit import tiny_bert

import peftkit
from peftkit.core.config import AdapterConfig
from peftkit.errors import ConfigError
from peftkit.methods.lora import LoraConfig
from peftkit.train import param_groups


def test_a_method_asks_for_no_groups_of_its_own_by_default():
    model = tiny_bert()
    assert AdapterConfig.param_groups(LoraConfig(), model, 1e-3, 16) is None
    assert peftkit.make_config("ia3").param_groups(model, 1e-3, 16) is None


def test_the_groups_are_the_methods_and_each_method_is_asked_once(monkeypatch):
    model = tiny_bert()
    peftkit.inject(model, peftkit.make_config("lora", r=2, target_modules=["key"]), "second")
    asked = []

    def groups(self, model, lr, lr_ratio, weight_decay=0.0):
        asked.append((type(self).__name__, lr, lr_ratio, weight_decay))
        trainable = [p for p in model.parameters() if p.requires_grad]
        return [{"params": trainable, "lr": lr * lr_ratio, "weight_decay": weight_decay, "name": "own"}]

    monkeypatch.setattr(LoraConfig, "param_groups", groups)
    out = param_groups(model, lr=1e-3, weight_decay=0.1, lora_plus_ratio=4)
    assert asked == [("LoraConfig", 1e-3, 4, 0.1)]  # two LoRA adapters, one question: groups cover the model
    assert [g["name"] for g in out] == ["own_decay", "own_no_decay"]
    assert all(g["lr"] == pytest.approx(4e-3) for g in out)
    assert sum(len(g["params"]) for g in out) == sum(p.requires_grad for p in model.parameters())


def test_lora_plus_without_a_method_that_defines_groups_is_refused_with_the_fix():
    model = tiny_bert(lora=False)
    peftkit.inject(model, peftkit.make_config("ia3"))
    with pytest.raises(
        ConfigError, match=r"needs trainable LoRA B matrices.*set train.lora_plus_ratio to null"
    ):
        param_groups(model, lr=1e-3, lora_plus_ratio=16)
    with pytest.raises(ConfigError, match=r"needs a LoRA-family adapter on the model.*full fine-tuning"):
        param_groups(tiny_bert(lora=False), lr=1e-3, lora_plus_ratio=16)


def test_an_optimizer_a_method_registers_is_built_by_name_and_others_are_refused(monkeypatch):
    from peftkit.core import registry
    from peftkit.train import make_optimizer
    from peftkit.train.runtime import train_config_problems
    from support.training import quiet

    built = []

    def build(model, lr, weight_decay):
        built.append((lr, weight_decay))
        return torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)

    monkeypatch.setitem(registry._OPTIMIZERS, "toy_sgd", build)
    model = tiny_bert()
    assert isinstance(make_optimizer(model, 1e-3, 0.1, optimizer="toy_sgd"), torch.optim.SGD)
    assert built == [(1e-3, 0.1)]
    assert isinstance(make_optimizer(model, 1e-3), torch.optim.AdamW)
    with pytest.raises(
        ConfigError, match=r"'nadam' is not an optimizer peftkit knows; choose one of adamw, "
    ):
        make_optimizer(model, 1e-3, optimizer="nadam")
    with pytest.raises(ConfigError, match="lora_plus_ratio=16 sets AdamW's groups"):
        make_optimizer(model, 1e-3, lora_plus_ratio=16, optimizer="toy_sgd")
    assert any(
        p.startswith("train.optimizer: expected one of adamw")
        for p in train_config_problems(quiet(optimizer="x"))
    )
    assert any(
        p.startswith("train.lora_plus_ratio:")
        for p in train_config_problems(quiet(optimizer="toy_sgd", lora_plus_ratio=16))
    )
    assert train_config_problems(quiet(optimizer="toy_sgd")) == []
