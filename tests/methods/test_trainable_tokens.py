"""Trainable tokens (issue 21 item 3): the standalone method and LoRA's ``trainable_token_indices``, on tiny
Llama models with tied and untied embeddings. Parity with the reference library is in
tests/test_parity_tokens.py; the contract rows in tests/contract_rows/trainable_tokens.py."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file, save_file

import peftkit
from peftkit.core.layer import AdapterLayer
from peftkit.errors import AdapterFileError, ConfigError, NoTargetMatchedError, UnsupportedLayerError
from support.tokens import NEW, VOCAB, batch, logits, tiny_llama, train

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one intra-op thread is fastest


@pytest.fixture(scope="module")
def bases():
    return {True: tiny_llama(tied=True), False: tiny_llama(tied=False)}


def _rows(model) -> torch.Tensor:
    return model.get_input_embeddings().weight.detach()[NEW].clone()


# -- the config ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "indices,problem", [([1, -2], "non-negative"), ([3, 3, 4], "more than once"), ([1, True], "integer")]
)
def test_token_indices_are_checked(indices, problem):
    with pytest.raises(ConfigError, match=problem):
        peftkit.TrainableTokensConfig(token_indices=indices)
    with pytest.raises(ConfigError, match=problem):
        peftkit.LoraConfig(trainable_token_indices={"embed_tokens": indices})


def test_all_linear_is_not_a_place_for_token_rows():
    with pytest.raises(ConfigError, match="all-linear.*embed_tokens"):
        peftkit.TrainableTokensConfig(token_indices=[1], target_modules="all-linear")


def test_no_token_indices_is_a_valid_config_but_nothing_to_inject(bases):
    # [] is the reference's default (and a run fills it from data.add_special_tokens)
    config = peftkit.TrainableTokensConfig()
    with pytest.raises(ConfigError, match="token_indices: empty"):
        peftkit.inject(copy.deepcopy(bases[False]), config)
    with pytest.raises(ConfigError, match="non-empty list"):
        peftkit.LoraConfig(trainable_token_indices=[])


def test_an_index_past_the_embedding_says_to_resize_first(bases):
    with pytest.raises(UnsupportedLayerError, match=r"past its 100 rows.*resize_token_embeddings"):
        peftkit.inject(copy.deepcopy(bases[False]), peftkit.TrainableTokensConfig(token_indices=[5, VOCAB]))


def test_the_default_target_is_the_input_embedding_recorded_by_name(bases):
    model = peftkit.inject(copy.deepcopy(bases[False]), peftkit.TrainableTokensConfig(token_indices=NEW))
    assert peftkit.adapter_config(model).target_modules == "model.embed_tokens"  # as the reference records it
    assert [n for n, m in model.named_modules() if isinstance(m, AdapterLayer)] == ["model.embed_tokens"]


# -- what is trained -------------------------------------------------------------------------------


def test_only_the_rows_of_the_tokens_train_and_the_rest_of_the_embedding_stays(bases):
    model = peftkit.inject(copy.deepcopy(bases[False]), peftkit.TrainableTokensConfig(token_indices=NEW))
    summary = peftkit.trainable_summary(model, show=False)
    assert summary.trainable == len(NEW) * 32
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train(model)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {"model.embed_tokens.adapters.default.trainable_tokens_delta"}
    with peftkit.disable(model):
        assert torch.equal(logits(model), logits(bases[False]))


def test_on_a_tied_model_the_head_follows_the_embedding_rows(bases):
    model = peftkit.inject(copy.deepcopy(bases[True]), peftkit.TrainableTokensConfig(token_indices=NEW))
    head, embed = model.lm_head, model.model.embed_tokens
    assert isinstance(head, AdapterLayer) and not list(head.adapters["default"].parameters())
    assert peftkit.trainable_summary(model, show=False).trainable == len(NEW) * 32  # one tensor, counted once
    train(model)
    values = embed.adapters["default"].trainable_tokens_delta.detach()
    hidden = torch.randn(1, 3, 32)
    with torch.no_grad():
        scores = head(hidden)
    assert torch.allclose(scores[..., NEW], hidden @ values.T, atol=1e-6)  # the new rows score the outputs
    unmerged = logits(model)
    peftkit.merge(model)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still one tensor, written once
    assert torch.equal(_rows(model), values)
    assert torch.allclose(logits(model), unmerged, atol=1e-6)
    peftkit.unmerge(model)
    assert torch.equal(_rows(model), _rows(bases[True]))


def test_naming_both_sides_of_a_tie_makes_the_second_follow_the_first(bases):
    config = peftkit.TrainableTokensConfig(token_indices=NEW, target_modules=["embed_tokens", "lm_head"])
    model = peftkit.inject(copy.deepcopy(bases[True]), config)
    assert peftkit.trainable_summary(model, show=False).trainable == len(NEW) * 32
    assert model.lm_head.adapters["default"].source is model.model.embed_tokens.adapters["default"]


def test_tied_layers_named_with_different_rows_are_refused(bases):
    config = peftkit.LoraConfig(
        target_modules=["q_proj"], trainable_token_indices={"embed_tokens": NEW, "lm_head": NEW[:2]}
    )
    with pytest.raises(UnsupportedLayerError, match="hold one weight.*same ids"):
        peftkit.inject(copy.deepcopy(bases[True]), config)


def test_inside_lora_both_train_and_save_under_the_reference_names(bases, tmp_path):
    config = peftkit.LoraConfig(r=2, target_modules=["q_proj"], trainable_token_indices=NEW)
    model = peftkit.inject(copy.deepcopy(bases[True]), config)
    train(model)
    keys = set(peftkit.adapter_state_dict(model))
    assert "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta" in keys
    assert not any("lm_head" in k for k in keys)  # the tied head is not saved: it follows on load
    peftkit.save_adapter(model, tmp_path / "a")
    again = peftkit.load_adapter(copy.deepcopy(bases[True]), tmp_path / "a")
    assert torch.equal(logits(again), logits(model))


@pytest.mark.parametrize(
    "options,match",
    [
        ({"target_modules": ["embed_tokens"]}, "adapted by target_modules"),
        ({"target_modules": ["q_proj"], "modules_to_save": ["embed_tokens"]}, "modules_to_save"),
        ({"target_modules": ["q_proj"], "trainable_token_indices": {"embeddings": NEW}}, "matched 0 modules"),
    ],
)
def test_one_module_cannot_take_two_roles_and_a_layer_must_exist(bases, options, match):
    options = {"trainable_token_indices": NEW, **options}
    error = NoTargetMatchedError if "matched" in match else UnsupportedLayerError
    with pytest.raises(error, match=match):
        peftkit.inject(copy.deepcopy(bases[False]), peftkit.LoraConfig(**options))


def test_differing_copies_of_a_tied_tensor_in_a_file_are_refused(bases, tmp_path):
    model = peftkit.inject(copy.deepcopy(bases[True]), peftkit.TrainableTokensConfig(token_indices=NEW))
    train(model)
    peftkit.save_adapter(model, tmp_path / "a")
    weights = tmp_path / "a" / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    tensors["base_model.model.lm_head.trainable_tokens_delta"] += 1
    save_file(tensors, str(weights))
    fresh = copy.deepcopy(bases[True])
    with pytest.raises(AdapterFileError, match="one tensor of this model"):
        peftkit.load_adapter(fresh, tmp_path / "a", strict=False)
    assert not isinstance(fresh.lm_head, AdapterLayer)  # left as it was


def test_two_token_adapters_are_served_in_one_batch(bases):
    model = copy.deepcopy(bases[True])
    for name, seed in (("a", 1), ("b", 2)):
        torch.manual_seed(seed)
        peftkit.inject(model, peftkit.TrainableTokensConfig(token_indices=NEW, init_weights=False), name)
    inputs = {k: v for k, v in batch().items() if k != "labels"}
    alone = {}
    for name in ("a", "b"):
        peftkit.set_active(model, name)
        with torch.no_grad():
            alone[name] = model(**inputs).logits
    with peftkit.per_example_adapters(model, ["b", "a"]), torch.no_grad():
        mixed = model(**inputs).logits
    assert torch.allclose(mixed[0], alone["b"][0], atol=1e-6) and torch.allclose(
        mixed[1], alone["a"][1], atol=1e-6
    )
