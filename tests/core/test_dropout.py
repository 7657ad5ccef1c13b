"""The frozen base's dropout as a choice (peftkit.set_base_dropout): what each mode changes, on
transformers models and plain modules, and what it leaves alone (adapters, trained heads)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

import peftkit
from peftkit.core.dropout import set_base_dropout
from peftkit.errors import ConfigError


def tiny_bert(**overrides) -> BertForSequenceClassification:
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=50,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        **{"attention_probs_dropout_prob": 0.3, "hidden_dropout_prob": 0.3, **overrides},
    )
    return BertForSequenceClassification(config).train()


def tiny_llama(**overrides) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=50,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        **{"attention_dropout": 0.3, **overrides},
    )
    return LlamaForCausalLM(config).train()


IDS = torch.randint(1, 50, (2, 7), generator=torch.Generator().manual_seed(0))


def forward(model: nn.Module, seed: int = 0) -> torch.Tensor:
    torch.manual_seed(seed)
    return model(input_ids=IDS).logits


@pytest.mark.parametrize(
    "build, attention_off_config",
    [(tiny_bert, {"attention_probs_dropout_prob": 0.0}), (tiny_llama, {"attention_dropout": 0.0})],
    ids=["bert", "llama"],
)
def test_attention_off_is_loading_with_the_configs_attention_dropout_at_zero(build, attention_off_config):
    model = build()
    report = set_base_dropout(model, "attention_off")
    assert report.attention == 2 and report.other == 0  # one attention module per layer
    # the same random draws for everything else: hidden dropout still applies, attention's does not
    assert torch.equal(forward(model), forward(build(**attention_off_config)))
    assert not torch.equal(forward(build(), 0), forward(build(), 1)), "attention dropout was on"
    if build is tiny_bert:  # Llama has no other dropout
        assert not torch.equal(forward(model, 0), forward(model, 1)), "hidden dropout is still on"


def test_off_makes_a_training_forward_the_eval_forward_and_keep_changes_nothing():
    model, untouched = tiny_bert(), tiny_bert()
    assert set_base_dropout(untouched, "keep").as_dict() == {
        "mode": "keep",
        "attention_zeroed": 0,
        "other_zeroed": 0,
    }
    assert not torch.equal(forward(untouched, 0), forward(untouched, 1))
    report = set_base_dropout(model, "all_off")
    assert report.attention == 2 and report.other > 0
    with torch.no_grad():
        expected = copy.deepcopy(model).eval()(input_ids=IDS).logits
    assert torch.allclose(forward(model, 0), expected, atol=1e-6)


def test_skipped_modules_adapters_and_trained_copies_keep_their_dropout():
    model = tiny_bert()
    peftkit.inject(model, peftkit.LoraConfig(r=2, target_modules=["query"], lora_dropout=0.2))
    report = set_base_dropout(model, "all_off", skip=["dropout"])  # the head's dropout, before the classifier
    assert report.other > 0
    in_adapters = [m for n, m in model.named_modules() if isinstance(m, nn.Dropout) and ".adapters." in n]
    assert in_adapters and all(m.p == 0.2 for m in in_adapters)
    assert model.dropout.p == 0.3
    assert all(
        m.p == 0 for n, m in model.bert.named_modules() if isinstance(m, nn.Dropout) and ".adapters." not in n
    )


def test_plain_modules_and_multihead_attention():
    model = nn.Sequential(nn.MultiheadAttention(8, 2, dropout=0.1), nn.Dropout(0.2), nn.Linear(8, 8))
    assert set_base_dropout(model, "attention_off").attention == 1
    assert model[0].dropout == 0.0 and model[1].p == 0.2
    assert set_base_dropout(model, "all_off").other == 1 and model[1].p == 0.0


def test_an_unknown_mode_names_the_choices():
    with pytest.raises(ConfigError, match="keep, attention_off, all_off"):
        set_base_dropout(nn.Linear(2, 2), "attention")
