"""LoRA on torch's ``nn.MultiheadAttention`` (issue 21 item 5): the packed projection and out_proj adapted
together, all-linear on ``nn.TransformerEncoder``, the refusals. The contract rows are in
tests/contract_rows/lora_mha.py; parity with the reference library in tests/test_parity_custom_models.py."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import peftkit
from peftkit.core.inject import adapter_layers
from peftkit.errors import AdapterNameError, UnsupportedLayerError
from peftkit.methods.lora import lora_plus_param_groups
from peftkit.methods.lora_mha import LoraMultiheadAttention
from support.attention import WIDTH, Encoder, SelfAttention, build


def _lora(**options) -> peftkit.LoraConfig:
    return peftkit.LoraConfig(**{"r": 2, "lora_alpha": 4, "target_modules": ["attn"], **options})


def test_the_tensors_have_the_references_names_shapes_and_count():
    model, _ = build("MHA")
    peftkit.inject(model, _lora(r=3))
    shapes = {k: tuple(v.shape) for k, v in peftkit.adapter_state_dict(model).items()}
    assert shapes == {
        "base_model.model.attn.lora_A.weight": (3, WIDTH),
        "base_model.model.attn.lora_B.weight": (3 * WIDTH, 3),
        "base_model.model.attn.base_layer.out_proj.lora_A.weight": (3, WIDTH),
        "base_model.model.attn.base_layer.out_proj.lora_B.weight": (WIDTH, 3),
    }
    summary = peftkit.trainable_summary(model, show=False)
    # a rank-r delta on the packed (3E x E) projection and on the (E x E) output projection
    assert summary.adapted == [
        ("attn", "LoraMultiheadAttention(MultiheadAttention)", "default", 3 * 6 * WIDTH)
    ]


@pytest.mark.parametrize("kind", ["MHA", "MHABatchFirst"])
def test_the_delta_is_low_rank_on_both_weights_and_merges_exactly(kind):
    model, x = build(kind)
    base = copy.deepcopy(model.attn)
    peftkit.inject(model, _lora(init_lora_weights=False))
    adapter = model.attn.adapters["default"]
    s = 4 / 2
    a, b = adapter.in_proj.lora_A.weight, adapter.in_proj.lora_B.weight
    a2, b2 = adapter.out_proj.lora_A.weight, adapter.out_proj.lora_B.weight
    assert torch.allclose(adapter.parameter_delta("in_proj_weight"), s * b @ a)
    # out_proj's counts twice, as in every released reference version (methods/lora_mha.py)
    assert torch.allclose(adapter.parameter_delta("out_proj.weight"), 2 * s * b2 @ a2)
    expected = copy.deepcopy(base)
    with torch.no_grad():
        expected.in_proj_weight += s * b @ a
        expected.out_proj.weight += 2 * s * b2 @ a2
        want = model.head(expected(x, x, x)[0])
        assert torch.allclose(model(x), want, atol=1e-6)
        unmerged = model(x)
        peftkit.merge(model, safe=True)
        assert torch.equal(model(x), unmerged)  # the same sums, rounded once, either way
        assert torch.allclose(model.attn.base_layer.in_proj_weight, expected.in_proj_weight, atol=1e-7)
        peftkit.unmerge(model)
        assert torch.allclose(model.attn.base_layer.in_proj_weight, base.in_proj_weight, atol=1e-7)
    peftkit.unload(model, merge=True)
    assert type(model.attn) is nn.MultiheadAttention and type(model.attn.out_proj).__name__.endswith("Linear")


def test_gradients_reach_both_adapters_only():
    model, x = build("MHA")
    peftkit.inject(model, _lora(modules_to_save=None))
    model(x).pow(2).sum().backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert grads == {
        "attn.adapters.default.in_proj.lora_A.weight",
        "attn.adapters.default.in_proj.lora_B.weight",
        "attn.adapters.default.out_proj.lora_A.weight",
        "attn.adapters.default.out_proj.lora_B.weight",
    }


def test_all_linear_takes_each_attention_module_whole_and_records_the_names():
    config = peftkit.LoraConfig(r=2, target_modules="all-linear", modules_to_save=["head"])
    model = peftkit.inject(Encoder(), config)
    summary = peftkit.trainable_summary(model, show=False)
    assert [n for n, *_ in summary.adapted] == [
        f"encoder.layers.{i}.{m}" for i in range(2) for m in ("self_attn", "linear1", "linear2")
    ]
    assert not summary.skipped  # no out_proj reported: it is adapted with its attention module
    # the reference's all-linear would wrap out_proj (never called) instead: the names are recorded
    config = peftkit.adapter_config(model)
    assert config.target_modules == ["self_attn", "linear1", "linear2"] and config.target_parameters is None


def test_all_linear_leaves_the_attention_to_methods_without_a_row_for_it():
    model = peftkit.inject(Encoder(), peftkit.IA3Config(target_modules="all-linear", feedforward_modules=[]))
    summary = peftkit.trainable_summary(model, show=False)
    assert [n for n, *_ in summary.skipped] == [f"encoder.layers.{i}.self_attn.out_proj" for i in range(2)]
    assert "target the attention module" not in summary.skipped[0][2]


def test_naming_out_proj_is_refused_with_the_module_to_name_instead():
    with pytest.raises(UnsupportedLayerError, match=r"target the attention module \('self_attn'\)"):
        peftkit.inject(Encoder(), peftkit.LoraConfig(target_modules=["out_proj"]))
    # named beside its attention module, it is adapted with it
    model = peftkit.inject(Encoder(), peftkit.LoraConfig(target_modules=["self_attn", "out_proj"]))
    assert [n for n, _ in adapter_layers(model)] == [
        "encoder.layers.0.self_attn",
        "encoder.layers.1.self_attn",
    ]


def test_separate_query_key_value_weights_are_refused_when_named_skipped_by_regex():
    model = SelfAttention(kdim=4)
    with pytest.raises(UnsupportedLayerError, match="kdim=4 / vdim=4 differ from embed_dim=8"):
        peftkit.inject(model, _lora())
    peftkit.inject(model, _lora(target_modules=r"attn|head"))
    summary = peftkit.trainable_summary(model, show=False)
    assert [n for n, *_ in summary.adapted] == ["head"] and summary.skipped[0][0] == "attn"
    # all-linear reports both, and does not suggest naming an attention module LoRA cannot take
    model = peftkit.inject(SelfAttention(kdim=4), peftkit.LoraConfig(target_modules="all-linear"))
    skipped = {n: why for n, _, why in peftkit.trainable_summary(model, show=False).skipped}
    assert (
        sorted(skipped) == ["attn", "attn.out_proj"]
        and "target the attention" not in skipped["attn.out_proj"]
    )


@pytest.mark.parametrize(
    ("options", "match"),
    [({"use_dora": True}, "DoRA is not available"), ({"init_lora_weights": "pissa"}, "pissa")],
)
def test_dora_and_svd_inits_are_refused_before_the_model_changes(options, match):
    model, _ = build("MHA")
    with pytest.raises(UnsupportedLayerError, match=match):
        peftkit.inject(model, _lora(**options))
    assert type(model.attn) is nn.MultiheadAttention


def test_dropout_cannot_apply_and_a_warning_says_so():
    with pytest.warns(UserWarning, match="lora_dropout=0.1 does not apply to nn.MultiheadAttention"):
        model = peftkit.inject(Encoder(), peftkit.LoraConfig(target_modules="all-linear", lora_dropout=0.1))
    assert isinstance(model.encoder.layers[0].linear1.adapters["default"].dropout, nn.Dropout)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        peftkit.inject(build("MHA")[0], _lora())


def test_mixed_adapter_batches_refuse_it_and_say_why():
    model, x = build("MHA")
    peftkit.inject(model.eval(), _lora())
    with pytest.raises(AdapterNameError, match="returns a tuple"):
        with peftkit.per_example_adapters(model, ["default", None]):
            model(x)


def test_lora_plus_gives_both_b_matrices_the_faster_rate():
    model, _ = build("MHA")
    peftkit.inject(model, _lora())
    groups = {g["name"]: g for g in lora_plus_param_groups(model, lr=1e-3, lr_ratio=16)}
    adapter = model.attn.adapters["default"]
    assert isinstance(adapter, LoraMultiheadAttention)
    assert {id(p) for p in groups["lora_plus_B"]["params"]} == {
        id(adapter.in_proj.lora_B.weight),
        id(adapter.out_proj.lora_B.weight),
    }


@pytest.mark.parametrize("nested", [False, True], ids=["plain", "nested"])
def test_in_eval_mode_the_encoder_runs_the_adapted_attention(nested):
    # torch's fused eval-mode kernel reads in_proj_weight itself and would skip the adapter (core/inject.py)
    base = Encoder(nested=nested).eval()
    model = peftkit.inject(
        copy.deepcopy(base), peftkit.LoraConfig(target_modules=["self_attn"], init_lora_weights=False)
    )
    x, pad = torch.randn(2, 5, WIDTH), torch.zeros(2, 5, dtype=torch.bool)
    pad[0, -2:] = True
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad():
            expected = model(x, pad)
    finally:
        torch.backends.mha.set_fastpath_enabled(True)
    with torch.no_grad():
        assert (model(x, pad) - base(x, pad)).abs().max() > 1e-2
        assert torch.allclose(model(x, pad), expected, atol=1e-5)
