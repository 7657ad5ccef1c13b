"""Across every registered method: picking one by name, the summary it shows, the docs table.

Per-method behaviour lives in each method's own test file and its contract row; this file checks
what a user switching between methods relies on.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import peftkit
from peftkit.core import registry
from peftkit.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))
import methods_table  # noqa: E402

METHODS = registry.registered_methods()


@pytest.mark.parametrize("spelling", ["lora", "LORA", "LoRA", "lo-ra", "lo_ra"])
def test_make_config_finds_a_method_however_it_is_spelled(spelling):
    assert type(peftkit.make_config(spelling, r=4)) is peftkit.LoraConfig


def test_make_config_names_the_closest_method_and_field():
    with pytest.raises(ConfigError, match="did you mean 'lora'"):
        peftkit.make_config("lorra")
    with pytest.raises(ConfigError) as err:
        peftkit.make_config("lora", rr=3, zzz=1)
    assert len(err.value.problems) == 2 and "did you mean 'r'?" in str(err.value)
    assert "its fields are" in err.value.problems[1]


def test_every_method_config_round_trips_through_its_interchange_dict():
    for peft_type in METHODS:
        config = methods_table.default_config(peft_type)
        again = peftkit.AdapterConfig.from_dict(config.to_dict())
        assert again == config, peft_type


@pytest.mark.parametrize("peft_type", METHODS)
def test_summary_counts_exactly_what_each_method_trains(peft_type):
    model = methods_table.minilm()
    total = sum(p.numel() for p in model.parameters())
    peftkit.inject(model, methods_table.default_config(peft_type))
    summary = peftkit.trainable_summary(model, show=False)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert summary.trainable == trainable > 0
    assert summary.total == sum(p.numel() for p in model.parameters()) > total
    listed = sum(count for *_, count in summary.adapted) + sum(c for *_, c in summary.modules_to_save)
    assert listed == trainable, "the table's rows must add up to the trainable count"
    assert str(summary).splitlines()[-1].startswith(f"adapted modules: {len(summary.adapted)}")
    # every trainable tensor takes part in the forward pass (none is trained for nothing)
    model.train()
    batch = {
        "input_ids": torch.randint(0, 1000, (2, 8)),
        "attention_mask": torch.ones(2, 8, dtype=torch.long),
    }
    model(**batch).logits.sum().backward()
    unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not unused, f"trainable but not used by the forward pass: {unused[:5]}"


def test_docs_methods_table_is_current():
    doc = (ROOT / "docs" / "methods.md").read_text()
    expected = methods_table.table()
    assert expected in doc, (
        "docs/methods.md is out of date; run `.venv/bin/python scripts/methods_table.py --write`"
    )


def test_every_method_has_its_docs_page():
    pages = {p.stem for p in (ROOT / "docs").glob("*.md")}
    for peft_type in METHODS:
        module = registry.config_class(peft_type).__module__.rsplit(".", 1)[1]
        assert module in pages, f"{peft_type}: no docs/{module}.md"


def test_every_method_is_exported():
    for peft_type in METHODS:
        cls = registry.config_class(peft_type)
        assert getattr(peftkit, cls.__name__, None) is cls and cls.__name__ in peftkit.__all__


def test_methods_page_example_runs(capsys):
    doc = (ROOT / "docs" / "methods.md").read_text()
    code = doc.split("```python\n", 1)[1].split("```", 1)[0]
    exec(compile(code, "docs/methods.md", "exec"), {})
    printed = dict(line.split() for line in capsys.readouterr().out.splitlines() if line.strip())
    assert set(printed) == {"lora", "ia3", "vera", "prompt_tuning"}
    for method, trainable in printed.items():  # the adapter plus the classifier copy (770)
        assert int(trainable) == methods_table.measure(method.upper())["added"] + 770, method


def test_every_method_says_when_to_pick_it():
    # docs/methods.md lists each method with its `pick_when` line (scripts/methods_table.py)
    missing = [m for m in registry.registered_methods() if not registry.config_class(m).pick_when.strip()]
    assert not missing, f"methods without a pick_when line: {missing}"
