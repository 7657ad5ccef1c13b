"""peftkit.combine, convert_to_lora and extract_lora on tiny models: exactness of linear / cat (mixed
ranks, rsLoRA, rank and alpha patterns, negative weights, every layer kind), truncation errors, the
pruning methods wired through a model, seeded DARE, conversion from every additive method, extraction
from a fine-tuned copy, LoRA's lora_bias, and every refusal.

Parity with the reference library's add_weighted_adapter and its loader: ``test_combine_parity.py``.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers import BertConfig, BertModel

import peftkit
from peftkit.core import deltas
from peftkit.core.inject import adapter_layers
from peftkit.errors import AdapterNameError, ConfigError, NotCombinableError
from support.tiny import KINDS, build

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")

ATOL = 1e-5  # fp32


def _bert() -> BertModel:
    """A 2-layer BERT with random biases (transformers starts them at zero, which would hide bias changes)."""
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


IDS = torch.randint(0, 40, (2, 6), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def bert():
    return _bert()


def _out(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).last_hidden_state


def _lora(**fields) -> peftkit.LoraConfig:
    return peftkit.LoraConfig(init_lora_weights=False, **fields)


def _merged_by_hand(base: nn.Module, model: nn.Module, weights: dict[str, float]) -> nn.Module:
    """``base`` with ``sum w_i delta_i`` added to each weight: what a combination must compute."""
    expected = copy.deepcopy(base)
    modules = dict(expected.named_modules())
    with torch.no_grad():
        for name, layer in adapter_layers(model):
            for adapter, w in weights.items():
                if adapter in layer.adapters:
                    modules[name].weight += w * layer.adapters[adapter].delta_weight(modules[name].weight)
    return expected


def _two_adapters(bert):
    model = copy.deepcopy(bert)
    peftkit.inject(model, _lora(r=4, lora_alpha=8, target_modules=["query", "value"]), "a")
    peftkit.inject(
        model,
        _lora(
            r=2,
            lora_alpha=3,
            use_rslora=True,
            target_modules=["query", "key", "output.dense"],
            rank_pattern={"layer.1.attention.self.query": 5},
            alpha_pattern={"key": 7},
        ),
        "b",
    )
    return model


# -- linear and cat are exact ---------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["linear", "cat"])
def test_linear_and_cat_equal_the_weighted_sum_of_the_deltas(bert, method):
    model = _two_adapters(bert)
    weights = {"a": 0.7, "b": -1.3}
    expected = _out(_merged_by_hand(bert, model, weights))
    peftkit.combine(model, ["a", "b"], [0.7, -1.3], method=method, name="ab")
    assert peftkit.active_adapters(model) == ["ab"]
    torch.testing.assert_close(_out(model), expected, rtol=0, atol=ATOL)
    report = peftkit.combine_report(model, "ab")
    query = "encoder.layer.1.attention.self.query"
    assert report.modules[query].rank == 4 + 5 and report.max_relative_error == 0
    assert peftkit.adapter_config(model, "ab").rank_pattern  # ranks differ per module
    peftkit.merge(model)  # and the result merges like any LoRA
    torch.testing.assert_close(_out(model), expected, rtol=0, atol=ATOL)


@pytest.mark.parametrize("kind", KINDS)
def test_combined_output_is_the_sum_of_the_separately_weighted_adapters(kind):
    model, x = build(kind)
    model.eval()
    with torch.no_grad():
        base = model(x)
    peftkit.inject(model, _lora(r=2, lora_alpha=4, target_modules=["layer"], modules_to_save=[]), "a")
    peftkit.inject(
        model, _lora(r=3, lora_alpha=2, use_rslora=True, target_modules=["layer"], modules_to_save=[]), "b"
    )
    outs = {}
    for name in ("a", "b"):
        peftkit.set_active(model, name)
        with torch.no_grad():
            outs[name] = model(x) - base
    peftkit.combine(model, ["a", "b"], [1.5, -0.5], name="ab")
    with torch.no_grad():
        got = model(x)
    # one layer and a linear head: the output moves linearly with the layer's weight
    torch.testing.assert_close(got, base + 1.5 * outs["a"] - 0.5 * outs["b"], rtol=0, atol=ATOL)


def test_dense_deltas_of_other_methods_combine_exactly(bert):
    model = copy.deepcopy(bert)
    peftkit.inject(model, peftkit.LoHaConfig(r=2, target_modules=["query"], init_weights=False), "h")
    peftkit.inject(model, peftkit.VeraConfig(r=8, target_modules=["query", "value"], init_weights=False), "v")
    peftkit.inject(model, _lora(r=2, target_modules=["value"]), "l")
    weights = {"h": 1.0, "v": 0.5, "l": -2.0}
    expected = _out(_merged_by_hand(bert, model, weights))
    peftkit.combine(model, list(weights), list(weights.values()), name="all")
    torch.testing.assert_close(_out(model), expected, rtol=0, atol=ATOL)
    assert peftkit.combine_report(model, "all").max_relative_error < 1e-6


# -- truncation ------------------------------------------------------------------------------------------


def _written_delta(model, name, module):
    layer = dict(adapter_layers(model))[module]
    with torch.no_grad():
        return deltas.as_matrix(
            layer.base_layer, layer.adapters[name].delta_weight(layer.base_layer.weight)
        ).double()


def _summed_delta(model, weights, module):
    return sum(
        w * _written_delta(model, n, module)
        for n, w in weights.items()
        if n in dict(adapter_layers(model))[module].adapters
    )


@pytest.mark.parametrize(
    ("method", "options"),
    [("linear", {"rank": 2}), ("svd", {"rank": 3}), ("svd", {}), ("linear", {"energy": 0.9})],
)
def test_truncated_results_report_their_error(bert, method, options):
    model = _two_adapters(bert)
    weights = {"a": 1.0, "b": 0.5}
    peftkit.combine(model, list(weights), list(weights.values()), method=method, name="t", **options)
    report = peftkit.combine_report(model, "t")
    for module, approximation in report.modules.items():
        exact = _summed_delta(model, weights, module)
        written = _written_delta(model, "t", module)
        singular = torch.linalg.svdvals(exact)
        if "rank" in options:
            assert approximation.rank == min(options["rank"], approximation.exact_rank)
        elif not options:  # svd's default: the largest source rank on the module
            sources = [
                dict(adapter_layers(model))[module].adapters[n].r
                for n in weights
                if n in dict(adapter_layers(model))[module].adapters
            ]
            assert approximation.rank == min(max(sources), approximation.exact_rank)
        error = float(torch.linalg.matrix_norm(exact - written))
        assert error == pytest.approx(approximation.error, rel=1e-4, abs=1e-6)
        assert approximation.error == pytest.approx(
            float(singular[approximation.rank :].square().sum().sqrt()), rel=1e-4, abs=1e-6
        )


# -- the pruning methods, through a model -------------------------------------------------------------


@pytest.mark.parametrize("method", ["ties", "dare_linear", "dare_ties", "magnitude_prune"])
def test_pruning_methods_write_the_pruned_combination_of_the_dense_deltas(bert, method):
    model = _two_adapters(bert)
    weights = {"a": 1.0, "b": -0.6}
    peftkit.combine(
        model, list(weights), list(weights.values()), method=method, name="p", density=0.4, seed=5, rank=64
    )
    options = deltas.Options(method, density=0.4, seed=5)
    for module, layer in adapter_layers(model):
        having = [(n, w, i) for i, (n, w) in enumerate(weights.items()) if n in layer.adapters]
        dense = [_written_delta(model, n, module) for n, _, _ in having]
        expected = deltas.combine_dense(
            dense, [w for _, w, _ in having], options, module, [i for *_, i in having]
        )
        torch.testing.assert_close(_written_delta(model, "p", module), expected, rtol=0, atol=1e-5)


def test_dare_gives_the_same_adapter_for_the_same_seed(bert):
    model = _two_adapters(bert)
    for name, seed in (("s1", 1), ("s1_again", 1), ("s2", 2)):
        peftkit.combine(model, ["a", "b"], [1, 1], method="dare_ties", density=0.5, seed=seed, name=name)
    state = {n: peftkit.adapter_state_dict(model, n) for n in ("s1", "s1_again", "s2")}
    assert all(torch.equal(state["s1"][k], state["s1_again"][k]) for k in state["s1"])
    assert any(not torch.equal(state["s1"][k], state["s2"][k]) for k in state["s1"])


def test_negative_weight_subtracts_an_adapter(bert):
    model = copy.deepcopy(bert)
    peftkit.inject(model, _lora(r=2, target_modules=["query"]), "a")
    peftkit.combine(model, ["a"], [-1.0], name="minus")
    peftkit.set_active(model, ["a", "minus"])
    torch.testing.assert_close(_out(model), _out(bert), rtol=0, atol=ATOL)


# -- heads --------------------------------------------------------------------------------------------


def test_a_head_only_one_adapter_has_is_copied_and_shared_ones_are_combined():
    model, x = build("Linear")
    peftkit.inject(model, _lora(r=2, target_modules=["layer"], modules_to_save=["head"]), "a")
    peftkit.inject(model, _lora(r=2, target_modules=["layer"], modules_to_save=["head"]), "b")
    peftkit.inject(model, _lora(r=2, target_modules=["layer"]), "c")
    with torch.no_grad():
        model.head.copies["a"].weight.add_(1.0)
        model.head.copies["b"].weight[0].add_(2.0)
    original = model.head.base_layer.weight.detach().clone()
    peftkit.combine(model, ["a", "c"], [0.5, 1.0], name="ac")
    assert torch.equal(model.head.copies["ac"].weight, model.head.copies["a"].weight)  # taken as it is
    peftkit.combine(model, ["a", "b"], [1.0, 1.0], name="ab")
    torch.testing.assert_close(
        model.head.copies["ab"].weight,
        original + 1.0 + torch.nn.functional.one_hot(torch.tensor(0), 3)[:, None] * 2.0,
    )
    assert peftkit.combine_report(model, "ab").heads == {"head": "combined"}


# -- refusals ----------------------------------------------------------------------------------------


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, list(peftkit.adapter_names(model))


def _unchanged(model, snap):
    state, names = snap
    now = model.state_dict()
    return names == peftkit.adapter_names(model) and all(torch.equal(now[k], v) for k, v in state.items())


@pytest.mark.parametrize(
    ("config", "match"),
    [
        (_lora(r=2, use_dora=True, target_modules=["query"]), "convert_to_lora"),
        (peftkit.IA3Config(target_modules=["query"], feedforward_modules=[]), "convert_to_lora"),
        (
            peftkit.OFTConfig(r=0, oft_block_size=4, target_modules=["query"], init_weights=False),
            "convert_to_lora",
        ),
        (peftkit.BottleneckConfig(target_modules=["attention.output.dense"]), "non-linear activation"),
        (peftkit.LoraConfig(r=2, target_modules=["query"], init_lora_weights="pissa"), "portable=True"),
        (_lora(r=2, target_modules=["query"], bias="all"), "bias='none'"),
        (peftkit.PromptTuningConfig(num_virtual_tokens=2), "inputs or attention"),
    ],
    ids=["dora", "ia3", "oft", "nonlinear-bottleneck", "pissa", "bias-all", "prompt"],
)
def test_combine_refuses_what_has_no_exact_sum_and_names_the_fix(bert, config, match):
    model = copy.deepcopy(bert)
    peftkit.inject(model, _lora(r=2, target_modules=["query"]), "ok")
    peftkit.inject(model, config, "bad")
    snap = _snapshot(model)
    with pytest.raises(NotCombinableError, match=match):
        peftkit.combine(model, ["ok", "bad"], [1, 1])
    assert _unchanged(model, snap)


def test_convert_refuses_adapters_without_a_weight_delta(bert):
    model = copy.deepcopy(bert)
    peftkit.inject(model, peftkit.BottleneckConfig(target_modules=["attention.output.dense"]), "relu")
    with pytest.raises(NotCombinableError, match="non-linear"):
        peftkit.convert_to_lora(model, "relu")


def test_an_existing_name_is_refused_instead_of_ignored(bert):
    model = _two_adapters(bert)
    peftkit.combine(model, ["a", "b"], [1, 1], name="ab")
    snap = _snapshot(model)
    with pytest.raises(AdapterNameError, match="already exists.*delete_adapter"):
        peftkit.combine(model, ["a"], [2.0], name="ab")
    with pytest.raises(AdapterNameError, match="already exists"):
        peftkit.convert_to_lora(model, "a", name="b")
    assert _unchanged(model, snap)


def test_bad_arguments_are_reported_together(bert):
    model = _two_adapters(bert)
    with pytest.raises(ConfigError) as info:
        peftkit.combine(model, ["a", "zz", "a"], [1, float("nan")], method="ties")
    text = str(info.value)
    for part in ("unknown ['zz']", "more than once", "2 weight(s) for 3", "finite", "density"):
        assert part in text
    with pytest.raises(ConfigError, match="'cat' keeps every factor"):
        peftkit.combine(model, ["a", "b"], [1, 1], method="cat", rank=2)
    with pytest.raises(ConfigError, match="give one of them"):
        peftkit.convert_to_lora(model, "a", rank=2, energy=0.9)


def test_merged_adapters_must_be_unmerged_first(bert):
    model = _two_adapters(bert)
    peftkit.merge(model, "a")
    with pytest.raises(AdapterNameError, match="unmerge"):
        peftkit.combine(model, ["a", "b"], [1, 1])


def test_a_report_belongs_to_combined_adapters_and_leaves_with_them(bert):
    model = _two_adapters(bert)
    with pytest.raises(AdapterNameError, match="no report"):
        peftkit.combine_report(model, "a")
    peftkit.combine(model, ["a", "b"], [1, 1], name="ab")
    assert "combine a, b: 10 modules, ranks 2-9" in str(peftkit.combine_report(model, "ab"))
    peftkit.set_active(model, "a")
    peftkit.delete_adapter(model, "ab")
    assert "ab" not in model._peftkit.reports


# -- convert_to_lora from every additive method --------------------------------------------------------


def _randomise(model, name):
    with torch.no_grad():
        for _, layer in adapter_layers(model):
            if name in layer.adapters:
                for param in layer.adapters[name].parameters():
                    param.normal_(0, 0.3)


SOURCES = {
    "loha": lambda: peftkit.LoHaConfig(r=2, target_modules=["query", "value"], init_weights=False),
    "lokr": lambda: peftkit.LoKrConfig(r=2, target_modules=["query", "value"], init_weights=False),
    "vera": lambda: peftkit.VeraConfig(r=8, target_modules=["query", "value"], init_weights=False),
    "adalora": lambda: peftkit.AdaLoraConfig(
        init_r=3, target_modules=["query"], total_step=10, init_lora_weights=False
    ),
    "ia3": lambda: peftkit.IA3Config(
        target_modules=["key", "output.dense"], feedforward_modules=["output.dense"], init_ia3_weights=False
    ),
    "oft": lambda: peftkit.OFTConfig(
        r=0, oft_block_size=4, target_modules=["query", "value"], init_weights=False
    ),
    "dora": lambda: _lora(r=2, use_dora=True, target_modules=["query", "value"]),
    "bottleneck": lambda: peftkit.BottleneckConfig(
        target_modules=["attention.output.dense"], non_linearity="identity", bottleneck_size=3
    ),
    "bottleneck-parallel": lambda: peftkit.BottleneckConfig(
        target_modules=["intermediate.dense"],
        placement="parallel",
        non_linearity="identity",
        bottleneck_size=3,
    ),
}


@pytest.mark.parametrize("method", list(SOURCES))
def test_convert_is_exact_without_a_rank_and_reports_its_error_with_one(bert, method):
    model = copy.deepcopy(bert)
    peftkit.inject(model, SOURCES[method](), "src")
    if method.startswith("bottleneck"):
        _randomise(model, "src")
    expected = _out(model)
    assert not torch.allclose(expected, _out(bert), atol=1e-3)  # the adapter does something
    peftkit.convert_to_lora(model, "src")
    torch.testing.assert_close(_out(model), expected, rtol=0, atol=ATOL)
    report = peftkit.combine_report(model, "src_lora")
    assert report.max_relative_error < 1e-5
    config = peftkit.adapter_config(model, "src_lora")
    assert config.lora_bias == (method in ("ia3", "bottleneck", "bottleneck-parallel"))  # bias changes
    peftkit.convert_to_lora(model, "src", name="r1", rank=1)
    report = peftkit.combine_report(model, "r1")
    peftkit.set_active(model, "src")
    for module, approximation in report.modules.items():
        layer = dict(adapter_layers(model))[module]
        with torch.no_grad():
            delta = layer.adapters["src"].delta_weight(layer.base_layer.weight.double())
        exact = deltas.as_matrix(layer.base_layer, delta).double()
        written = _written_delta(model, "r1", module)
        relative = float(torch.linalg.matrix_norm(exact - written) / torch.linalg.matrix_norm(exact))
        assert approximation.rank == 1 and relative == pytest.approx(
            approximation.relative_error, rel=1e-3, abs=1e-6
        )


def test_energy_picks_a_rank_per_module(bert):
    model = copy.deepcopy(bert)
    peftkit.inject(model, SOURCES["vera"](), "src")
    peftkit.convert_to_lora(model, "src", energy=0.95)
    report = peftkit.combine_report(model, "src_lora")
    for approximation in report.modules.values():
        assert approximation.relative_error <= (1 - 0.95) ** 0.5 + 1e-9
        assert 1 <= approximation.rank < approximation.exact_rank


def test_a_converted_adapter_is_a_plain_lora_on_disk(bert, tmp_path):
    model = copy.deepcopy(bert)
    peftkit.inject(model, SOURCES["ia3"](), "src")
    expected = _out(model)
    peftkit.convert_to_lora(model, "src")
    peftkit.save_adapter(model, tmp_path / "lora", "src_lora")
    fresh = copy.deepcopy(bert)
    peftkit.load_adapter(fresh, tmp_path / "lora")
    torch.testing.assert_close(_out(fresh), expected, rtol=0, atol=ATOL)
    assert peftkit.read_adapter_config(tmp_path / "lora").peft_type == "LORA"


# -- extraction from a full fine-tune ------------------------------------------------------------------


def _finetuned(bert, everything: bool) -> nn.Module:
    tuned = copy.deepcopy(bert)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in tuned.named_parameters():
            if everything or ("embeddings" not in name and "LayerNorm" not in name):
                param.add_(0.05 * torch.randn(param.shape, generator=generator))
    return tuned


def test_extraction_is_exact_when_only_layers_changed(bert):
    tuned = _finetuned(bert, everything=False)
    model = copy.deepcopy(bert)
    peftkit.extract_lora(model, tuned)
    torch.testing.assert_close(_out(model), _out(tuned), rtol=0, atol=ATOL)
    report = peftkit.combine_report(model, "extracted")
    assert not report.not_carried and report.max_relative_error < 1e-5
    assert peftkit.adapter_config(model, "extracted").lora_bias  # the biases moved too


def test_extraction_at_a_rank_reports_what_it_could_not_carry(bert):
    tuned = _finetuned(bert, everything=True)
    model = copy.deepcopy(bert)
    peftkit.extract_lora(model, tuned, rank=2, target_modules=["query", "value"])
    report = peftkit.combine_report(model, "extracted")
    assert len(report.modules) == 4 and all(
        a.rank == 2 and a.relative_error > 0 for a in report.modules.values()
    )
    assert "embeddings.word_embeddings.weight" in report.not_carried
    assert "encoder.layer.0.attention.self.key.weight" in report.not_carried


def test_extraction_refuses_another_architecture(bert):
    other = BertModel(
        BertConfig(
            vocab_size=40, hidden_size=8, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32
        ),
        add_pooling_layer=False,
    )
    with pytest.raises(NotCombinableError, match="not the same architecture"):
        peftkit.extract_lora(copy.deepcopy(bert), other)
    with pytest.raises(NotCombinableError, match="equal the base's"):
        peftkit.extract_lora(copy.deepcopy(bert), copy.deepcopy(bert))


# -- lora_bias ----------------------------------------------------------------------------------------


def test_lora_bias_adds_a_scaled_bias_that_merges_and_unmerges(bert, tmp_path):
    model = copy.deepcopy(bert)
    peftkit.inject(model, _lora(r=2, lora_alpha=4, lora_bias=True, target_modules=["query"]))
    layer = model.encoder.layer[0].attention.self.query
    assert layer.adapters["default"].lora_B.bias is not None
    adapted = _out(model)
    peftkit.merge(model)
    torch.testing.assert_close(_out(model), adapted, rtol=0, atol=ATOL)
    peftkit.unmerge(model)
    torch.testing.assert_close(
        layer.base_layer.bias, bert.encoder.layer[0].attention.self.query.bias, rtol=0, atol=1e-6
    )
    peftkit.save_adapter(model, tmp_path / "b")
    fresh = copy.deepcopy(bert)
    peftkit.load_adapter(fresh, tmp_path / "b")
    torch.testing.assert_close(_out(fresh), adapted, rtol=0, atol=ATOL)


def test_lora_bias_is_refused_where_the_reference_refuses_it():
    with pytest.raises(ConfigError, match="lora_bias"):
        peftkit.LoraConfig(lora_bias=True, use_dora=True)
    model, _ = build("Embedding")
    with pytest.raises(Exception, match="not supported on embeddings"):
        peftkit.inject(model, peftkit.LoraConfig(lora_bias=True, target_modules=["layer"]))


def test_a_bias_change_beside_an_embedding_adapter_is_refused(bert):
    model = copy.deepcopy(bert)
    peftkit.inject(model, _lora(r=2, lora_bias=True, target_modules=["query"]), "biased")
    peftkit.inject(model, _lora(r=2, target_modules=["word_embeddings"]), "embedding")
    with torch.no_grad():
        model.encoder.layer[0].attention.self.query.adapters["biased"].lora_B.bias.normal_()
    snap = _snapshot(model)
    with pytest.raises(NotCombinableError, match="Combine or convert the embedding adapters separately"):
        peftkit.combine(model, ["biased", "embedding"], [1, 1])
    assert _unchanged(model, snap)
    peftkit.combine(model, ["embedding"], [0.5], name="embedding_half")  # alone it is fine
