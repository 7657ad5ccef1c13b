"""Which modules a config selects: suffixes, regexes, all-linear, excludes, layers, patterns, heads."""

from __future__ import annotations

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

import peftkit
from peftkit.core.targeting import layer_index, pattern_value


@pytest.fixture
def bert():
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=3, num_attention_heads=2, intermediate_size=32
    )
    return BertForSequenceClassification(cfg)


@pytest.fixture
def llama():
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=50,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    return LlamaForCausalLM(cfg)


def adapted(model) -> list[str]:
    return sorted(name for name, *_ in peftkit.trainable_summary(model, show=False).adapted)


def test_suffix_and_exact_names(bert):
    peftkit.inject(
        bert, peftkit.LoraConfig(target_modules=["query", "bert.encoder.layer.0.attention.self.value"])
    )
    assert adapted(bert) == [
        "bert.encoder.layer.0.attention.self.query",
        "bert.encoder.layer.0.attention.self.value",
        "bert.encoder.layer.1.attention.self.query",
        "bert.encoder.layer.2.attention.self.query",
    ]


def test_regex_must_match_the_full_name(bert):
    peftkit.inject(bert, peftkit.LoraConfig(target_modules=r".*layer\.1\..*(query|key)"))
    assert adapted(bert) == [
        "bert.encoder.layer.1.attention.self.key",
        "bert.encoder.layer.1.attention.self.query",
    ]


def test_all_linear_skips_the_output_head(llama):
    peftkit.inject(llama, peftkit.LoraConfig(target_modules="all-linear"))
    names = adapted(llama)
    assert "lm_head" not in names and len(names) == 2 * 7
    assert {n.rsplit(".", 1)[1] for n in names} == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    }


def test_all_linear_on_a_classifier_trains_the_head_in_full(bert):
    peftkit.inject(bert, peftkit.LoraConfig(target_modules="all-linear"))
    summary = peftkit.trainable_summary(bert, show=False)
    assert "classifier" not in adapted(bert) and "bert.pooler.dense" in adapted(bert)
    assert [m[0] for m in summary.modules_to_save] == ["classifier"]
    config = peftkit.adapter_config(bert)
    assert config.modules_to_save == ["classifier"] and config.task_type == "SEQ_CLS"


def test_exclude_modules(bert):
    peftkit.inject(
        bert, peftkit.LoraConfig(target_modules=["query", "value"], exclude_modules=r".*layer\.0\..*")
    )
    assert all(".layer.0." not in n for n in adapted(bert)) and len(adapted(bert)) == 4


def test_layers_to_transform_and_pattern(llama, bert):
    peftkit.inject(
        llama, peftkit.LoraConfig(target_modules=["q_proj"], layers_to_transform=[1], layers_pattern="layers")
    )
    assert adapted(llama) == ["model.layers.1.self_attn.q_proj"]
    peftkit.inject(bert, peftkit.LoraConfig(target_modules=["value"], layers_to_transform=2))
    assert adapted(bert) == ["bert.encoder.layer.2.attention.self.value"]
    assert layer_index("model.layers.12.mlp.experts.3.w1", "layers") == 12
    assert layer_index("a.b", None) is None


def test_rank_and_alpha_patterns(bert):
    config = peftkit.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["query", "value"],
        rank_pattern={"value": 2, r"layer\.2\.attention\.self\.query": 6},
        alpha_pattern={"query": 32},
    )
    peftkit.inject(bert, config)
    layers = bert.bert.encoder.layer
    assert layers[0].attention.self.value.adapters["default"].r == 2
    assert layers[0].attention.self.query.adapters["default"].r == 4
    assert layers[2].attention.self.query.adapters["default"].r == 6
    assert layers[0].attention.self.query.adapters["default"].scaling == 32 / 4
    assert layers[0].attention.self.value.adapters["default"].scaling == 8 / 2
    assert pattern_value({"value": 2}, "x.value") == 2 and pattern_value({"value": 2}, "x.xvalue") is None


def test_default_targets_by_model_type(bert, llama):
    peftkit.inject(bert, peftkit.LoraConfig())
    assert len(adapted(bert)) == 6 and all(n.endswith(("query", "value")) for n in adapted(bert))
    peftkit.inject(llama, peftkit.LoraConfig())
    assert all(n.endswith(("q_proj", "v_proj")) for n in adapted(llama))


def test_no_default_for_unknown_models_says_what_to_set():
    with pytest.raises(peftkit.errors.NoTargetMatchedError, match="set target_modules.*'0'"):
        peftkit.inject(torch.nn.Sequential(torch.nn.Linear(2, 2)), peftkit.LoraConfig())


def test_second_adapter_can_target_already_adapted_layers(bert):
    peftkit.inject(bert, peftkit.LoraConfig(target_modules=["query"]), "a")
    peftkit.inject(bert, peftkit.LoraConfig(target_modules=["query", "key"]), "b")
    layer = bert.bert.encoder.layer[0].attention.self.query
    assert sorted(layer.adapters) == ["a", "b"] and layer.active == ["b"]
    assert type(layer.base_layer) is torch.nn.Linear
