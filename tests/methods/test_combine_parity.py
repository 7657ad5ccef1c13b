"""peftkit.combine against the reference library's add_weighted_adapter where its result is exact
(``cat``; ``svd`` on equal-rank plain LoRA), the reference's documented faults that peftkit avoids
(docs/combine.md's table), and combined or converted adapters through the reference's loader."""

from __future__ import annotations

import copy
import logging
import warnings

import pytest
import torch

import peftkit
from peftkit.core.inject import adapter_layers

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from transformers import BertConfig, BertModel  # noqa: E402

ATOL = 1e-5  # fp32
IDS = torch.randint(0, 40, (2, 6), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def bert():
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=16, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    model = BertModel(config, add_pooling_layer=False).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0, 0.5)
    return model


def _out(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).last_hidden_state


@pytest.fixture
def pair(bert, tmp_path):
    """Two trained-looking LoRA adapters in peftkit, and the same two loaded by the reference library."""

    def make(configs: dict[str, peftkit.LoraConfig]):
        model = copy.deepcopy(bert)
        for name, config in configs.items():
            peftkit.inject(model, config, name)
            peftkit.save_adapter(model, tmp_path / name, name)
        names = list(configs)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            reference = peft.PeftModel.from_pretrained(
                copy.deepcopy(bert), tmp_path / names[0], adapter_name=names[0]
            )
            for name in names[1:]:
                reference.load_adapter(tmp_path / name, adapter_name=name)
        return model, reference.eval()

    return make


def _plain(r: int, **fields) -> peftkit.LoraConfig:
    return peftkit.LoraConfig(
        r=r, lora_alpha=2 * r, target_modules=["query", "value"], init_lora_weights=False, **fields
    )


def _exact(bert, model, weights):
    expected = copy.deepcopy(bert)
    modules = dict(expected.named_modules())
    with torch.no_grad():
        for name, layer in adapter_layers(model):
            for adapter, w in weights.items():
                if adapter in layer.adapters:
                    modules[name].weight += w * layer.adapters[adapter].delta_weight(modules[name].weight)
    return _out(expected)


# -- parity where the reference is exact ------------------------------------------------------------


def test_cat_matches_the_reference(pair):
    model, reference = pair({"a": _plain(4), "b": _plain(2)})
    reference.add_weighted_adapter(["a", "b"], [0.6, -0.4], "cat", combination_type="cat")
    reference.set_adapter("cat")
    peftkit.combine(model, ["a", "b"], [0.6, -0.4], method="cat", name="cat")
    torch.testing.assert_close(_out(model), _out(reference), rtol=0, atol=ATOL)


def test_svd_on_equal_ranks_matches_the_reference(pair):
    model, reference = pair({"a": _plain(4), "b": _plain(4)})
    reference.add_weighted_adapter(["a", "b"], [1.0, 0.5], "svd", combination_type="svd", svd_rank=3)
    reference.set_adapter("svd")
    peftkit.combine(model, ["a", "b"], [1.0, 0.5], method="svd", rank=3, name="svd")
    torch.testing.assert_close(_out(model), _out(reference), rtol=0, atol=ATOL)


# -- the reference's faults, which peftkit's results do not share -----------------------------------


def test_the_references_linear_combines_factors_and_misses_the_sum(bert, pair):
    model, reference = pair({"a": _plain(4), "b": _plain(4)})
    expected = _exact(bert, model, {"a": 1.0, "b": 1.0})
    reference.add_weighted_adapter(["a", "b"], [1.0, 1.0], "lin", combination_type="linear")
    reference.set_adapter("lin")
    assert (_out(reference) - expected).abs().max() > 100 * ATOL  # cross terms B_a A_b appear
    peftkit.combine(model, ["a", "b"], [1.0, 1.0], method="linear", name="lin")
    torch.testing.assert_close(_out(model), expected, rtol=0, atol=ATOL)


def test_the_reference_takes_rslora_from_the_first_adapter(bert, pair):
    model, reference = pair({"a": _plain(4, use_rslora=True), "b": _plain(4)})
    expected = _exact(bert, model, {"a": 1.0, "b": 1.0})
    reference.add_weighted_adapter(["a", "b"], [1.0, 1.0], "cat", combination_type="cat")
    reference.set_adapter("cat")
    assert (_out(reference) - expected).abs().max() > 100 * ATOL  # new rank 8 scaled by 8 / sqrt(8)
    peftkit.combine(model, ["a", "b"], [1.0, 1.0], method="cat", name="cat")
    torch.testing.assert_close(_out(model), expected, rtol=0, atol=ATOL)


def test_the_reference_refuses_unequal_ranks_for_linear(bert, pair):
    model, reference = pair({"a": _plain(4), "b": _plain(2)})
    with pytest.raises(ValueError, match="same r value"):
        reference.add_weighted_adapter(["a", "b"], [1.0, 1.0], "lin", combination_type="linear")
    peftkit.combine(model, ["a", "b"], [1.0, 1.0], name="lin")
    torch.testing.assert_close(_out(model), _exact(bert, model, {"a": 1.0, "b": 1.0}), rtol=0, atol=ATOL)


def test_the_reference_ignores_a_name_that_exists(pair):
    model, reference = pair({"a": _plain(4), "b": _plain(4)})
    before = {k: v.clone() for k, v in reference.state_dict().items()}
    reference.add_weighted_adapter(["a"], [5.0], "b", combination_type="linear")  # returns, silently
    assert all(torch.equal(v, reference.state_dict()[k]) for k, v in before.items())
    with pytest.raises(peftkit.errors.AdapterNameError, match="already exists"):
        peftkit.combine(model, ["a"], [5.0], name="b")


# -- through the reference library's loader ---------------------------------------------------------


def _reference_loads(bert, directory) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.getLogger("peft").setLevel(logging.ERROR)
        return _out(peft.PeftModel.from_pretrained(copy.deepcopy(bert), directory).eval())


@pytest.mark.parametrize(
    ("method", "options"), [("linear", {}), ("ties", {"density": 0.5}), ("dare_linear", {"density": 0.7})]
)
def test_combined_adapters_load_in_the_reference_library(bert, tmp_path, method, options):
    model = copy.deepcopy(bert)
    peftkit.inject(model, _plain(4), "a")
    peftkit.inject(model, _plain(2, use_rslora=True, rank_pattern={"layer.1.attention.self.value": 3}), "b")
    peftkit.combine(model, ["a", "b"], [1.0, -0.5], method=method, name="ab", **options)
    peftkit.save_adapter(model, tmp_path / "ab", "ab")
    torch.testing.assert_close(_reference_loads(bert, tmp_path / "ab"), _out(model), rtol=0, atol=ATOL)


@pytest.mark.parametrize("source", ["ia3", "loha", "bottleneck"])
def test_converted_adapters_load_in_the_reference_library(bert, tmp_path, source):
    configs = {
        "ia3": peftkit.IA3Config(target_modules=["key", "output.dense"], feedforward_modules=["output.dense"], init_ia3_weights=False),
        "loha": peftkit.LoHaConfig(r=2, target_modules=["query", "value"], init_weights=False),
        "bottleneck": peftkit.BottleneckConfig(target_modules=["attention.output.dense"], non_linearity="identity", bottleneck_size=2),
    }  # fmt: skip
    model = copy.deepcopy(bert)
    peftkit.inject(model, configs[source], "src")
    with torch.no_grad():
        for _, layer in adapter_layers(model):
            for param in layer.adapters["src"].parameters():
                param.normal_(1.0 if source == "ia3" else 0.0, 0.3)
    expected = _out(model)
    peftkit.convert_to_lora(model, "src")
    peftkit.save_adapter(model, tmp_path / "lora", "src_lora")
    torch.testing.assert_close(_reference_loads(bert, tmp_path / "lora"), expected, rtol=0, atol=ATOL)
