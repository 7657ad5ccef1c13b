"""Method facts are declared on the config class (core/config.py) and read from the registry, so the
rules that depend on them never test a method's name."""

from __future__ import annotations

import pytest

import peftkit
from peftkit.core import registry
from peftkit.core.config import AdapterConfig


def test_the_registry_lists_the_methods_that_declare_a_capability():
    assert registry.methods_with("selectable") == ["lora"]
    assert registry.methods_with("quantizable") == sorted(registry.methods_with("quantizable"))
    assert {"lora", "ia3"} <= set(registry.methods_with("quantizable"))
    assert not {"loha", "lokr", "vera", "oft"} & set(registry.methods_with("quantizable"))


def test_a_declaration_on_the_class_is_what_the_registry_reports(monkeypatch):
    monkeypatch.setattr(peftkit.LoHaConfig, "quantizable", True)
    monkeypatch.setattr(peftkit.LoraConfig, "quantizable", False)
    assert "loha" in registry.methods_with("quantizable") and "lora" not in registry.methods_with(
        "quantizable"
    )


def test_quantizable_matches_the_bitsandbytes_rows():
    """A method declaring quantizable adapts a quantized linear layer (or wraps none, or tunes only the
    norm layers a quantized model keeps in full precision: LN tuning, whose rows for linear layers then
    refuse the packed ones); one that does not declare it finds only the refusing row there."""
    bnb = pytest.importorskip("bitsandbytes")
    layer = bnb.nn.Linear4bit(64, 64)
    for peft_type in registry.registered_methods():
        row, _ = registry.dispatch(peft_type, layer)
        adapts = row is not None and "unsupported" not in row.kind
        config_cls = registry.config_class(peft_type)
        if config_cls.quantizable:
            assert adapts or row is None or config_cls.target_roles == ("norm",), (
                f"{peft_type} declares quantizable but refuses {type(layer).__name__}"
            )
        else:
            assert not adapts, f"{peft_type} adapts {type(layer).__name__}: declare quantizable = True"


def test_the_default_config_on_targets_and_its_label():
    assert registry.DEFAULT_METHOD == "lora"
    config = registry.find_method(registry.DEFAULT_METHOD).config_cls.for_targets(["query"])
    assert isinstance(config, peftkit.LoraConfig) and config.target_modules == ["query"]
    assert config.size_label() == "LoRA r=8"
    assert peftkit.IA3Config().size_label() == "IA3"  # no rank, no display name: the interchange name
    assert AdapterConfig.quantizable is False and AdapterConfig.selectable is False
