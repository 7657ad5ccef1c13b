"""Tied embeddings (issue 21 item 4): merging or saving an adapter on a tied ``embed_tokens`` / ``lm_head``
pair never silently changes the other side. LoRA on a tied embedding refuses to merge unless told to untie;
a ``modules_to_save`` copy of a tied embedding leaves the config honest; trainable tokens change both sides
on purpose (tests/methods/test_trainable_tokens.py)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from transformers import LlamaForCausalLM

import peftkit
from peftkit.core import tying
from peftkit.errors import TiedWeightsError, UnsupportedLayerError
from support.tokens import logits, tiny_llama, train

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one intra-op thread is fastest


@pytest.fixture(scope="module")
def tied():
    return tiny_llama(tied=True)


def _lora(targets, **options) -> peftkit.LoraConfig:
    return peftkit.LoraConfig(r=2, lora_alpha=4, target_modules=targets, init_lora_weights=False, **options)


def test_shared_weights_are_found_by_identity(tied):
    assert list(tying.shared_weights(tied).values()) == [["model.embed_tokens.weight", "lm_head.weight"]]
    assert tying.shared_weights(tiny_llama(tied=False)) == {}
    adapted = peftkit.inject(copy.deepcopy(tied), _lora(["embed_tokens"]))  # seen through the wrapper
    assert list(tying.shared_weights(adapted).values()) == [["model.embed_tokens.weight", "lm_head.weight"]]


@pytest.mark.parametrize("target", ["embed_tokens", "lm_head"])
def test_lora_on_one_side_of_a_tie_refuses_to_merge_and_changes_nothing(tied, target):
    model = peftkit.inject(copy.deepcopy(tied), _lora([target]))
    adapted = logits(model)
    weight = model.lm_head.weight.detach().clone()
    with pytest.raises(TiedWeightsError, match=r"same tensor as .*untie=True"):
        peftkit.merge(model)
    with pytest.raises(TiedWeightsError):
        peftkit.unload(model, merge=True)
    assert torch.equal(model.lm_head.weight, weight) and torch.equal(logits(model), adapted)
    assert model.lm_head.weight is model.model.embed_tokens.weight and model.config.tie_word_embeddings


def test_untie_merges_the_adapted_side_alone_and_a_saved_model_reloads_the_same(tied, tmp_path):
    model = peftkit.inject(copy.deepcopy(tied), _lora(["embed_tokens", "q_proj"]))
    train(model)
    adapted, head = logits(model), tied.lm_head.weight.detach().clone()
    peftkit.merge(model, untie=True)
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert torch.equal(model.lm_head.weight, head)  # the output side is unchanged
    assert not model.config.tie_word_embeddings
    assert torch.allclose(logits(model), adapted, atol=1e-5)
    peftkit.unmerge(model)  # the copy stays: equal values, outputs unchanged
    assert torch.allclose(logits(model), adapted, atol=1e-5)
    plain = peftkit.unload(model, merge=True, untie=True)
    plain.save_pretrained(tmp_path / "merged")
    again = LlamaForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert not again.config.tie_word_embeddings and torch.equal(again.lm_head.weight, head)
    assert torch.allclose(logits(again), adapted, atol=1e-5)


def test_lora_on_both_sides_of_a_tie_merges_each_into_its_own_copy(tied):
    model = peftkit.inject(copy.deepcopy(tied), _lora(["embed_tokens", "lm_head"]))
    adapted = logits(model)
    with pytest.raises(TiedWeightsError, match="2 such merges"):
        peftkit.merge(model)
    plain = peftkit.unload(model, merge=True, untie=True)
    assert torch.allclose(logits(plain), adapted, atol=1e-5)


def test_a_modules_to_save_copy_of_a_tied_embedding_leaves_the_head_and_an_honest_config(tied, tmp_path):
    model = peftkit.inject(
        copy.deepcopy(tied), peftkit.LoraConfig(target_modules=["q_proj"], modules_to_save=["embed_tokens"])
    )
    train(model, lr=5e-2)
    adapted = logits(model)
    assert torch.equal(model.lm_head.weight, tied.lm_head.weight)  # only the input side trained
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plain = peftkit.unload(model, merge=True)
    assert any("tie_word_embeddings was set to False" in str(w.message) for w in caught)
    assert not plain.config.tie_word_embeddings and torch.equal(plain.lm_head.weight, tied.lm_head.weight)
    assert torch.allclose(logits(plain), adapted, atol=1e-5)
    plain.save_pretrained(tmp_path / "merged")
    again = LlamaForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert torch.allclose(logits(again), adapted, atol=1e-5)  # neither side overwrote the other


def test_unloading_without_merge_keeps_the_tie(tied):
    model = peftkit.inject(
        copy.deepcopy(tied), peftkit.LoraConfig(target_modules=["q_proj"], modules_to_save=["embed_tokens"])
    )
    plain = peftkit.unload(model)
    assert plain.lm_head.weight is plain.model.embed_tokens.weight and plain.config.tie_word_embeddings


def test_an_init_rewriting_a_tied_weight_is_refused_at_inject(tied):
    model = copy.deepcopy(tied)
    with pytest.raises(UnsupportedLayerError, match="rewrites the base weight.*shares"):
        peftkit.inject(model, _lora(["lm_head"]).replace(init_lora_weights="pissa"))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert torch.equal(model.lm_head.weight, tied.lm_head.weight)


def test_an_untied_model_merges_as_before():
    model = peftkit.inject(tiny_llama(tied=False), _lora(["embed_tokens", "lm_head"]))
    adapted = logits(model)
    peftkit.merge(model)
    assert torch.allclose(logits(model), adapted, atol=1e-5)
