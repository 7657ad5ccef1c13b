"""``save_pretrained`` on an adapted transformers model writes the adapter (issue 18 item 1).

Before, it wrote the whole model with its base weights under adapter-layer names
(``query.base_layer.weight``); ``from_pretrained`` then reported the adapted layers and the head missing,
initialised them at random and predicted something else, without an error. Each test here saves through
``model.save_pretrained`` and loads the directory back three ways (transformers' ``from_pretrained``,
``peftkit.load_adapter``, the reference library's ``PeftModel.from_pretrained``), expecting the adapted
model's outputs exactly.
"""

from __future__ import annotations

import copy
import io
import subprocess
import sys
from pathlib import Path

import peft
import pytest
import torch
from safetensors.torch import load_file
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    BertConfig,
    BertForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
)

import peftkit
from peftkit.core.pretrained import SavePretrained
from peftkit.errors import AdapterNameError, UnloadableCheckpointError

ADAPTER_FILES = ["adapter_config.json", "adapter_model.safetensors"]


def _bert_base(directory: Path) -> Path:
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=60,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        max_position_embeddings=16,
        num_labels=3,
    )
    BertForSequenceClassification(config).save_pretrained(directory)
    return directory


def _llama_base(directory: Path) -> Path:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=60,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    LlamaForCausalLM(config).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory) -> Path:
    return _bert_base(tmp_path_factory.mktemp("bert"))


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    return _llama_base(tmp_path_factory.mktemp("llama"))


def _trained(model: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """Every trainable tensor moved off its init (LoRA's B starts at zero, so the delta is visible)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=generator) * 0.2)
    return model.eval()


def _ids() -> torch.Tensor:
    return torch.randint(1, 60, (3, 9), generator=torch.Generator().manual_seed(2))


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=_ids()).logits


def _assert_same(loaded: torch.nn.Module, expected: torch.Tensor, base: torch.Tensor) -> None:
    """Equal up to float rounding (a loaded adapter is frozen, which takes another, equivalent kernel path),
    where the adapter itself moves the outputs by orders of magnitude more: the comparison means something."""
    assert (expected - base).abs().max() > 1e-2
    torch.testing.assert_close(_logits(loaded), expected, rtol=1e-5, atol=1e-6)


def test_save_pretrained_writes_the_adapter_that_from_pretrained_loads(bert_dir, tmp_path):
    # The case: from_pretrained(dir) on what save_pretrained wrote must be the adapted model.
    base = _logits(BertForSequenceClassification.from_pretrained(bert_dir).eval())
    model = BertForSequenceClassification.from_pretrained(bert_dir)
    peftkit.inject(model, peftkit.LoraConfig(r=4, target_modules=["query", "value"]))
    expected = _logits(_trained(model))
    model.save_pretrained(tmp_path / "out")

    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ADAPTER_FILES
    saved = load_file(tmp_path / "out" / "adapter_model.safetensors")
    assert not any("base_layer" in key for key in saved)
    assert any(key.endswith("classifier.weight") for key in saved)  # modules_to_save: the fresh head
    assert saved.keys() == peftkit.adapter_state_dict(model).keys()

    _assert_same(AutoModelForSequenceClassification.from_pretrained(tmp_path / "out").eval(), expected, base)


@pytest.mark.parametrize("case", ["bert", "llama"])
def test_what_save_pretrained_writes_loads_in_peftkit_and_the_reference(case, bert_dir, llama_dir, tmp_path):
    base_dir, auto = (
        (bert_dir, AutoModelForSequenceClassification)
        if case == "bert"
        else (llama_dir, AutoModelForCausalLM)
    )
    targets = ["query", "value"] if case == "bert" else ["q_proj", "v_proj", "down_proj"]
    base = _logits(auto.from_pretrained(base_dir).eval())
    model = auto.from_pretrained(base_dir)
    peftkit.inject(model, peftkit.LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    expected = _logits(_trained(model))
    model.save_pretrained(tmp_path)

    _assert_same(peftkit.load_adapter(auto.from_pretrained(base_dir), tmp_path).eval(), expected, base)
    _assert_same(
        peft.PeftModel.from_pretrained(auto.from_pretrained(base_dir), tmp_path).eval(), expected, base
    )


def test_every_adapter_is_written_in_the_reference_layout(bert_dir, tmp_path):
    model = BertForSequenceClassification.from_pretrained(bert_dir)
    _trained(peftkit.inject(model, peftkit.LoraConfig(r=4, target_modules=["query", "value"])))
    _trained(peftkit.inject(model, peftkit.LoraConfig(r=2, target_modules=["key"]), "other"), seed=2)
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [*ADAPTER_FILES, "other"]
    assert sorted(p.name for p in (tmp_path / "other").iterdir()) == ADAPTER_FILES

    base = _logits(BertForSequenceClassification.from_pretrained(bert_dir).eval())
    expected = _logits(model)  # "other" is active
    theirs = peft.PeftModel.from_pretrained(
        BertForSequenceClassification.from_pretrained(bert_dir), tmp_path / "other"
    ).eval()
    _assert_same(theirs, expected, base)
    peftkit.set_active(model, "default")
    ours = peftkit.load_adapter(BertForSequenceClassification.from_pretrained(bert_dir), tmp_path).eval()
    _assert_same(ours, _logits(model), base)

    model.save_pretrained(tmp_path / "only", selected_adapters=["other"])
    assert sorted(p.name for p in (tmp_path / "only").iterdir()) == ["other"]
    with pytest.raises(AdapterNameError, match="adapters on this model"):
        model.save_pretrained(tmp_path / "x", selected_adapters=["nope"])


def test_save_pretrained_on_a_part_of_an_adapted_model_is_refused(bert_dir, tmp_path):
    model = BertForSequenceClassification.from_pretrained(bert_dir)
    peftkit.inject(model, peftkit.LoraConfig(r=4, target_modules=["query", "value"]))
    with pytest.raises(UnloadableCheckpointError, match=r"unload\(model, merge=True\)"):
        model.bert.save_pretrained(tmp_path / "inner")
    assert not (tmp_path / "inner").exists()


def test_a_full_model_comes_only_from_unload_merge(bert_dir, tmp_path):
    model = BertForSequenceClassification.from_pretrained(bert_dir)
    peftkit.inject(model, peftkit.LoraConfig(r=4, target_modules=["query", "value"]))
    expected = _logits(_trained(model))
    peftkit.unload(model, merge=True)
    assert "save_pretrained" not in model.__dict__ and "save_pretrained" not in model.bert.__dict__
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists() and not (tmp_path / "adapter_config.json").exists()
    plain = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(_logits(plain), expected, rtol=1e-5, atol=1e-5)


def test_state_dict_argument_and_the_options_that_do_not_apply(bert_dir, tmp_path):
    model = BertForSequenceClassification.from_pretrained(bert_dir)
    peftkit.inject(model, peftkit.LoraConfig(r=4, target_modules=["query", "value"]))
    # a distributed trainer passes the gathered full state dict: the adapter comes from it, not the live model
    gathered = {k: v.clone() + 1 for k, v in model.state_dict().items()}
    model.save_pretrained(tmp_path / "sd", state_dict=gathered, safe_serialization=True, max_shard_size="1GB")
    saved = load_file(tmp_path / "sd" / "adapter_model.safetensors")
    for key, live in peftkit.adapter_state_dict(model).items():
        torch.testing.assert_close(saved[key], live + 1, rtol=0, atol=0)

    partial = {k: v for k, v in model.state_dict().items() if "lora_B" not in k}
    with pytest.raises(UnloadableCheckpointError, match="lacks"):
        model.save_pretrained(tmp_path / "partial", state_dict=partial)
    with pytest.raises(UnloadableCheckpointError, match="push_to_hub"):
        model.save_pretrained(tmp_path / "hub", push_to_hub=True)
    model.save_pretrained(tmp_path / "rank1", is_main_process=False)
    for name in ("partial", "hub", "rank1"):
        assert not (tmp_path / name).exists()


def test_the_override_follows_copies_of_the_model(bert_dir, tmp_path):
    model = BertForSequenceClassification.from_pretrained(bert_dir)
    peftkit.inject(model, peftkit.LoraConfig(r=4, target_modules=["query", "value"]))
    copied = copy.deepcopy(model)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    unpickled = torch.load(buffer, weights_only=False)
    for other in (copied, unpickled):
        assert isinstance(other.__dict__["save_pretrained"], SavePretrained)
        assert other.save_pretrained.module is other and other.bert.save_pretrained.module is other.bert
    assert "save_pretrained" not in BertForSequenceClassification.from_pretrained(bert_dir).__dict__


def test_import_peftkit_does_not_import_the_trainer():
    # the integrations' libraries (peftkit[hf]) load only when their module is imported
    code = (
        "import sys, peftkit; peftkit.LoraConfig; import peftkit.api, peftkit.integrations; "
        "print([m for m in ('transformers.trainer', 'trl', 'peft', 'sentence_transformers') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_saving_a_model_whose_part_was_adapted_is_refused(tmp_path):
    # inject into model.bert, then model.save_pretrained: the class's method would write base weights
    # under adapter-layer names, which from_pretrained fills with random weights without an error
    from peftkit.errors import UnloadableCheckpointError

    model = BertForSequenceClassification.from_pretrained(_bert_base(tmp_path / "base"))
    peftkit.inject(model.bert, peftkit.LoraConfig(r=2, target_modules=["query"]))
    with pytest.raises(
        UnloadableCheckpointError, match=r"BertForSequenceClassification.save_pretrained refused.*'bert'"
    ):
        model.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out" / "model.safetensors").exists()
    model.state_dict()  # outside a transformers save, the state dict is as before (checkpoints, copies)
    copy = __import__("copy").deepcopy(model)
    peftkit.unload(model.bert, merge=True)
    model.save_pretrained(tmp_path / "merged")  # unloaded: the guard is gone, a plain model is written
    assert BertForSequenceClassification.from_pretrained(tmp_path / "merged") is not None
    with pytest.raises(UnloadableCheckpointError):  # the copy kept its own guard
        copy.save_pretrained(tmp_path / "copy")
