"""`peftkit inspect` on a model no table covers (issue 19 item 8): a sentence-transformers MPNet directory
is shown with the classifier text-classification puts on it, every method has a default, the head is its
own section rather than candidate rows matching 0 modules, and each default says where it came from."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from peftkit.cli import main
from peftkit.core import registry
from peftkit.run.inspect import inspect_model

VOCAB = [
    "<s>",
    "<pad>",
    "</s>",
    "<unk>",
    "<mask>",
    "[UNK]",
] + "the a film movie was good bad fun dull".split()
LAYER_METHODS = [m.lower() for m in registry.registered_methods() if registry.config_class(m).wraps_layers]


@pytest.fixture(scope="module")
def mpnet_dir(tmp_path_factory) -> Path:
    """A 2-layer MPNet checkpoint saved with its masked-LM head, as a hub MPNet is, and its tokenizer."""
    from transformers import MPNetConfig, MPNetForMaskedLM, MPNetTokenizer

    folder = tmp_path_factory.mktemp("mpnet")
    (folder / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    MPNetTokenizer(vocab_file=str(folder / "vocab.txt")).save_pretrained(folder)
    torch.manual_seed(0)
    # 256 wide: the narrowest every method's defaults fit (C3A blocks of 256, MiSS shards of r=64 input
    # features, as the reference)
    config = MPNetConfig(
        vocab_size=len(VOCAB),
        hidden_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=512,
        max_position_embeddings=64,
    )
    MPNetForMaskedLM(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def st_dir(mpnet_dir, tmp_path_factory) -> Path:
    """The same checkpoint as a sentence-transformers model declaring mean pooling (all-mpnet-base-v2's layout)."""
    folder = tmp_path_factory.mktemp("st") / "mpnet"
    shutil.copytree(mpnet_dir, folder)
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    (folder / "modules.json").write_text(json.dumps(modules))
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(
        json.dumps(
            {
                "word_embedding_dimension": 256,
                "pooling_mode_mean_tokens": True,
                "pooling_mode_cls_token": False,
            }
        )
    )
    return folder


def _no_zero_matches(report) -> None:
    assert "matched 0 modules" not in str(report)
    assert not [t.spec for t in report.target_sets if t.spec.startswith("classifier")]


@pytest.mark.parametrize("task", [None, "text-classification"])
def test_a_sentence_transformers_directory_shows_the_classifier_the_task_adds(st_dir, task):
    report = inspect_model(str(st_dir), task=task)
    assert report.model_class == "PooledModelForSequenceClassification" and report.model_type == "mpnet"
    if task is None:  # not the checkpoint's MPNetForMaskedLM: the model training would adapt
        assert "sentence-transformers" in report.loaded_as and "mean pooling" in report.loaded_as
    assert [(h.name, h.shape) for h in report.head] == [("classifier", "256 -> 2")]
    assert not any(g.pattern.startswith("lm_head") for g in report.groups)
    _no_zero_matches(report)
    defaults = {d.method: d for d in report.defaults}
    for method in LAYER_METHODS:
        if method == "trainable_tokens":  # which tokens is the user's to say: no default to price
            assert defaults[method].note.startswith("needs token_indices")
            continue
        assert defaults[method].added_params is not None, (method, defaults[method].note)
        assert not any(t.startswith("classifier") for t in defaults[method].targets)
    lora = defaults["lora"]
    assert lora.source == "found by structure: attention query, attention value"
    assert lora.targets == [
        "mpnet.encoder.layer.N.attention.attn.q",
        "mpnet.encoder.layer.N.attention.attn.v",
    ]
    assert defaults["ia3"].targets[-1] == "mpnet.encoder.layer.N.output.dense"
    assert "attention query: mpnet.encoder.layer.N.attention.attn.q" in report.structure


def test_the_models_own_classification_head_is_shown_not_priced(mpnet_dir):
    # no sentence-transformers files: transformers' MPNetForSequenceClassification, whose head is two layers
    report = inspect_model(str(mpnet_dir), task="text-classification")
    assert report.model_class == "MPNetForSequenceClassification"
    assert [h.name for h in report.head] == ["classifier", "classifier.dense", "classifier.out_proj"]
    _no_zero_matches(report)
    sets = {t.spec: t for t in report.target_sets}
    assert (
        sets["dense"].modules == 4 and sets["dense"].lora_params is not None
    )  # the encoder's, not the head's


def test_inspect_says_where_each_default_came_from(mpnet_dir, tmp_path):
    from transformers import BertConfig

    BertConfig(
        vocab_size=50,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        architectures=["BertModel"],
    ).save_pretrained(tmp_path)
    sources = {d.method: d.source for d in inspect_model(str(tmp_path)).defaults}
    assert sources["lora"] == "reference default for bert"
    assert sources["ln_tuning"] == "peftkit default for bert"
    assert sources["bottleneck"] == "peftkit default for bert (houlsby)"
    mpnet = {d.method: d.source for d in inspect_model(str(mpnet_dir)).defaults}
    own_rules = ("bitfit", "trainable_tokens")  # every bias; the input embedding's rows
    assert all(mpnet[m].startswith("found by structure") for m in LAYER_METHODS if m not in own_rules)


def test_the_cli_prints_the_head_the_structure_and_the_sources(st_dir, capsys):
    assert main(["inspect", str(st_dir)]) == 0
    out = capsys.readouterr().out
    assert "loaded as task text-classification, as a sentence-transformers model" in out
    assert "head the task adds (trained in full beside any adapter: modules_to_save):\n  classifier " in out
    assert "(found by structure: attention query, attention value)" in out
    assert "no default" not in out and "matched 0 modules" not in out


def test_attention_modules_are_priced_whole_and_their_out_proj_is_not_offered():
    from peftkit.run.inspect import _adaptable, _target_sets
    from support.attention import Encoder

    model = Encoder()
    adaptable = {name: methods for name, _, methods in _adaptable(model)}
    assert "encoder.layers.0.self_attn" in adaptable and "lora" in adaptable["encoder.layers.0.self_attn"]
    assert not any(name.endswith("out_proj") for name in adaptable)  # read, never called
    sets = {s.spec: s for s in _target_sets(model, _adaptable(model))}
    assert sets["self_attn"].lora_params == 2 * 8 * (8 + 3 * 8 + 8 + 8)  # both projections, r=8
    # all-linear: two attention modules, two linear1, two linear2, and the head (no transformers config)
    assert sets["all-linear"].modules == 7 and sets["all-linear"].lora_params is not None
