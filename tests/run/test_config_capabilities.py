"""The run-config rules that depend on the adapter method ask what the method declares (quantizable,
selectable on its config class), so changing a declaration changes the verdict, whatever the name."""

from __future__ import annotations

import pytest

import peftkit
from peftkit.backends.config import quantize_problems
from peftkit.errors import ConfigError
from peftkit.run.config import parse_config

BASE = {
    "task": "text-classification",
    "model": {"name_or_path": "minilm"},
    "data": {"name": "rotten_tomatoes"},
}


def problems_of(data: dict) -> list[str]:
    try:
        parse_config(data)
    except ConfigError as exc:
        return exc.problems
    return []


def test_quantizing_is_refused_by_the_method_declaration_not_its_name(monkeypatch):
    quantized = {**BASE, "model": {"name_or_path": "minilm", "quantize": "nf4"}}
    refused = [p for p in problems_of({**quantized, "adapter": {"method": "loha"}}) if "quantized base" in p]
    assert refused and refused[0].startswith("model.quantize: method loha cannot train on a quantized base")
    monkeypatch.setattr(peftkit.LoraConfig, "quantizable", False)
    assert any("method lora cannot" in p for p in problems_of({**quantized, "adapter": {"method": "lora"}}))
    monkeypatch.setattr(peftkit.LoHaConfig, "quantizable", True)
    assert not any("quantized base" in p for p in quantize_problems("nf4", "loha"))


def test_full_fine_tuning_on_a_quantized_base_names_the_methods_that_can():
    (problem, *_) = quantize_problems("int8", "full")
    assert problem.startswith("model.quantize: full fine-tuning cannot train quantized weights")
    assert "ia3" in problem and "lora" in problem and "loha" not in problem
    assert quantize_problems(None, "loha") == []  # nothing to check on an unquantized base


def test_auto_targets_follow_the_selectable_declaration(monkeypatch):
    auto = {**BASE, "adapter": {"method": "ia3", "target_modules": "auto"}, "select": {"budget": 100}}
    assert any("needs method: lora (got 'ia3')" in p for p in problems_of(auto))
    monkeypatch.setattr(peftkit.IA3Config, "selectable", True)
    assert problems_of(auto) == []
    monkeypatch.setattr(peftkit.LoraConfig, "selectable", False)
    lora = {**BASE, "adapter": {"method": "lora", "target_modules": "auto"}, "select": {"budget": 100}}
    assert any("`auto` chooses targets and ranks" in p for p in problems_of(lora))


def test_saved_directions_follow_the_selectable_declaration(monkeypatch, tmp_path):
    directions = tmp_path / "init.safetensors"
    directions.write_bytes(b"")
    ia3 = {**BASE, "adapter": {"method": "ia3"}, "select": {"init_from": str(directions)}}
    assert any("need adapter.method=lora, got 'ia3'" in p for p in problems_of(ia3))
    monkeypatch.setattr(peftkit.IA3Config, "selectable", True)
    assert problems_of(ia3) == []


@pytest.mark.parametrize("method", ["lora", "ia3", "prompt_tuning", "ln_tuning"])
def test_methods_that_train_on_a_quantized_base_pass_the_rule(method):
    assert not any("quantized base" in p for p in quantize_problems("fp4", method))
